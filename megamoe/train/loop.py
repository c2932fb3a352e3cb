"""The training loop. One step, top to bottom:

1. every data-parallel rank takes its slice of the global batch, split into micro-batches;
2. the micro-batches run forward and backward — through the pipeline schedule when pp > 1,
   through a plain accumulation loop when pp = 1 (MoE aux losses add their gradient inside the
   backward pass, so they never travel to the last stage);
3. gradients are summed over dp (dense) or edp (experts) and divided by dp; the tied embedding's
   two copies (first and last stage) are summed;
4. the global gradient norm (each parameter counted once) decides skip / clip; AdamW steps;
5. the loss and the expert load are reduced for the console line and metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from megamoe.checkpoint.saver import CheckpointSaver
from megamoe.checkpoint.state import TrainingState, checkpoint_before, load_checkpoint, resume
from megamoe.data.blend import Dataset
from megamoe.data.loader import GlobalBatchLoader, build_datasets, data_eod_id, data_stream
from megamoe.errors import NonFiniteError, SharedError
from megamoe.estimators.flops import attention_flops_per_token, fwd_flops_per_token
from megamoe.nn.casts import shared_casts
from megamoe.nn.compile import compile_blocks
from megamoe.nn.moe.experts import expert_parameters
from megamoe.nn.moe.layer import MoEAuxLossBackward, MoELayer
from megamoe.parallel.expert import AllToAllExchange
from megamoe.parallel.grads import GradChunk, GradSync, clip_grads_, global_grad_norm
from megamoe.parallel.mesh import ProcessGrid, init_grid, shutdown
from megamoe.parallel.pipeline import (
    Schedules,
    StageModule,
    TiedEmbedding,
    build_schedules,
    build_stage_modules,
    masked_labels,
)
from megamoe.parallel.stall import CollectiveStall, Progress, announce, diagnose, is_communication_failure
from megamoe.train.downstream import DownstreamEval
from megamoe.train.metrics import MetricsLogger, detect_peak_flops, expert_load_summary, mfu
from megamoe.train.optim import build_optimizer
from megamoe.train.run_dir import claim_run_dir
from megamoe.train.schedule import lr_at, set_lr
from megamoe.train.spikes import SpikeGuard


@dataclass
class SkippedSteps:
    """Steps whose update was dropped for a non-finite loss or gradient norm (on_nonfinite=skip).

    A few isolated skips are harmless; a streak means the run has diverged and will not come
    back by itself, so ``limit`` consecutive skips stop it.
    """

    limit: int
    steps: list[int] = field(default_factory=list)
    streak: int = 0

    def record(self, step: int, skipped: bool) -> None:
        self.streak = self.streak + 1 if skipped else 0
        if not skipped:
            return
        self.steps.append(step)
        if self.streak >= self.limit:
            raise NonFiniteError(
                f"train.max_skipped_steps: the last {self.streak} steps ({step - self.streak + 1}-{step}) all had a "
                f"non-finite loss or gradient norm and were skipped; the run has diverged: lower train.lr or "
                f"resume from an earlier checkpoint (checkpoint.resume=PATH)")

    def summary(self) -> str:
        if not self.steps:
            return "no step skipped"
        shown = ", ".join(map(str, self.steps[:20])) + (", ..." if len(self.steps) > 20 else "")
        return f"{len(self.steps)} step(s) skipped for a non-finite loss or gradient norm: {shown}"


@dataclass
class ExpertLoad:
    """Tokens routed to each expert during one step, per MoE layer (filled by forward hooks)."""

    layers: dict[int, MoELayer]
    counts: dict[int, Tensor] = field(default_factory=dict)
    recording: bool = True

    def __post_init__(self) -> None:
        for index, layer in self.layers.items():
            layer.register_forward_hook(lambda module, args, out, i=index: self._add(i, module))

    def _add(self, index: int, layer: MoELayer) -> None:
        # Activation checkpointing re-runs forward inside backward: count each token once.
        in_backward = torch._C._current_graph_task_id() != -1
        if self.recording and not in_backward:
            tokens = layer.last_stats.tokens_per_expert
            self.counts[index] = self.counts.get(index, torch.zeros_like(tokens)) + tokens

    def reduce(self, group: Optional[dist.ProcessGroup]) -> dict[int, Tensor]:
        """Counts summed over the data-parallel group (the whole global batch); resets."""
        counts, self.counts = self.counts, {}
        if group is not None and counts:
            keys = sorted(counts)
            stacked = torch.stack([counts[k] for k in keys])
            dist.all_reduce(stacked, group=group)
            counts = dict(zip(keys, stacked.unbind(0)))
        return counts


@dataclass
class Trainer:
    """Everything one rank needs to run steps; built by :func:`build_trainer`.

    ``state`` is what a checkpoint saves and restores (models, optimizer, data position, step);
    the rest is rebuilt from the config at every start.
    """

    state: TrainingState
    modules: list[StageModule]  # the pipeline's wrappers of state.models
    grad_sync: GradSync
    dense_params: list[nn.Parameter]  # replicated over dp
    expert_params: list[nn.Parameter]  # replicated over edp, sharded over ep
    valid: dict
    expert_load: ExpertLoad
    tied: TiedEmbedding  # this rank's ends of a tied embedding split over stages, if any
    eod_id: Optional[int]  # restarts position ids when data.reset_position_ids
    progress: Progress = field(default_factory=Progress)  # the operation in flight, for stall reports
    schedules: Optional[Schedules] = None  # built on first use (pp > 1)

    cfg = property(lambda self: self.state.cfg)
    grid = property(lambda self: self.state.grid)
    optimizer = property(lambda self: self.state.optimizer)
    loader = property(lambda self: self.state.data)

    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    @property
    def num_microbatches(self) -> int:
        t = self.cfg.train
        return t.global_batch // (t.micro_batch * self.grid.dp)

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        return torch.bfloat16 if precision(self.cfg, self.grid.device) == "bf16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is not None:
            return torch.autocast(self.grid.device.type, dtype=self.autocast_dtype)
        return contextlib.nullcontext()

    def parameters(self) -> Iterator[nn.Parameter]:
        for module in self.modules:
            yield from module.parameters()


def precision(cfg: DictConfig, device: torch.device) -> str:
    """bf16 on CUDA, fp32 on CPU, unless train.precision says otherwise."""
    if cfg.train.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return cfg.train.precision


def build_trainer(cfg: DictConfig, grid: ProcessGrid) -> Trainer:
    exchange = AllToAllExchange(cfg.moe.num_experts, grid.ep_group) if grid.ep > 1 else None
    with torch.device(grid.device):  # built in place: no host copy of the weights (and fake tensors cannot move)
        modules = build_stage_modules(cfg, grid.pp_rank, exchange)
    models = [module.model for module in modules]
    for model in models:
        model.reset_parameters(cfg.seed)
        if cfg.train.compile == "block":
            compile_blocks(model)
    chunks = [grad_chunk(model) for model in reversed(models)]  # the order their backward ends
    experts = [p for chunk in reversed(chunks) for p in chunk.expert]
    dense = [p for chunk in reversed(chunks) for p in chunk.dense]
    grad_sync = GradSync(chunks, grid.dp_group, grid.edp_group, cfg.parallel.grad_bucket_mb,
                         cfg.parallel.overlap_grad_reduce)
    embeddings = [p for model in models for p in model.embedding_parameters()]
    optimizer = build_optimizer(nn.ModuleList(models), cfg.train, embeddings)
    train, valid, _ = build_datasets(cfg, is_builder=grid.rank == 0)
    eod_id = data_eod_id(cfg)
    state = TrainingState(cfg, grid, models, optimizer, rank_loader(cfg, grid, train, eod_id), data_stream(cfg))
    moe_layers = {layer.layer_index: layer for model in models for layer in model.moe_layers()}
    return Trainer(state, modules, grad_sync, dense, experts, valid, ExpertLoad(moe_layers), TiedEmbedding.of(models),
                   eod_id)


def grad_chunk(model: nn.Module) -> GradChunk:
    """A stage module's parameters, split into the experts (averaged over edp) and the rest (dp)."""
    experts = expert_parameters(model)
    expert_ids = {id(p) for p in experts}
    return GradChunk(model, [p for p in model.parameters() if id(p) not in expert_ids], experts)


def rank_loader(cfg: DictConfig, grid: ProcessGrid, dataset: Dataset, eod_id: Optional[int]) -> GlobalBatchLoader:
    """This data-parallel rank's micro-batches of ``dataset``, ids checked against the model's vocabulary."""
    return GlobalBatchLoader(dataset, cfg.train.global_batch, cfg.train.micro_batch, grid.dp_rank, grid.dp,
                             eod_id=eod_id, reset_position_ids=cfg.data.reset_position_ids,
                             vocab_size=cfg.model.vocab_size)


def _forward_local(trainer: Trainer, tokens: Tensor, position_ids: Tensor) -> Tensor:
    """pp = 1: run this rank's stage modules in sequence (one, or several virtual stages); the
    last one's final-normed hidden states."""
    x: Tensor | tuple[Tensor, Tensor] = tokens
    for module in trainer.modules:
        x = module(*x) if isinstance(x, tuple) else module(x, position_ids)
    return x  # type: ignore[return-value]


@shared_casts()
def _run_microbatches(trainer: Trainer, microbatches: list[dict[str, Tensor]], train: bool) -> Optional[Tensor]:
    """Forward (and backward when ``train``) all micro-batches; the mean loss on the last stage, else None.

    The last stage module computes head and loss together, by chunks of tokens
    (:meth:`StageModule.loss`): no micro-batch's logits are ever held whole. The expert banks'
    bf16 weight copies are made once for all the micro-batches (:func:`shared_casts`).
    """
    device, n = trainer.grid.device, len(microbatches)
    batch = {k: torch.cat([mb[k] for mb in microbatches]).to(device) for k in microbatches[0]}
    labels = masked_labels(batch["labels"], batch["loss_mask"])
    if trainer.grid.pp == 1:
        MoEAuxLossBackward.set_loss_scale(1.0 / n)
        losses = []
        with torch.set_grad_enabled(train):
            for i, (tokens, pos, target) in enumerate(zip(*(t.chunk(n) for t in (batch["tokens"], batch["position_ids"],
                                                                                  labels)))):
                with trainer.autocast():
                    loss = trainer.modules[-1].loss(_forward_local(trainer, tokens, pos), target)
                if train:
                    if i == n - 1:  # the last backward: buckets may start reducing as their gradients are final
                        for module in trainer.modules:
                            trainer.grad_sync.arm(module.model)
                    (loss / n).backward()
                losses.append(loss.detach())
        return torch.stack(losses).mean()
    MoEAuxLossBackward.set_loss_scale(1.0)  # the gradient sync divides the micro-batch sum by n
    if trainer.schedules is None:
        trainer.schedules = build_schedules(trainer.cfg, trainer.grid, trainer.modules, n, trainer.grad_sync)
    run = trainer.schedules.train.step if train else trainer.schedules.evaluate.eval
    losses: list[Tensor] = []
    holds_first, holds_last = trainer.modules[0].is_first, trainer.modules[-1].is_last  # both on a V's rank 0
    args = (batch["tokens"], batch["position_ids"]) if holds_first else ()
    target = labels if holds_last else None
    # return_outputs=False: the last stage keeps no micro-batch's output past its backward
    with torch.set_grad_enabled(train), trainer.autocast():
        run(*args, target=target, losses=losses, return_outputs=False)
    return torch.stack([l.detach().float() for l in losses]).mean() if holds_last else None


def _world_mean_of_last_stage(trainer: Trainer, loss: Optional[Tensor]) -> float:
    """Average the last stage's per-dp-rank losses and share the result with every rank."""
    return _gather_step(trainer, loss, 0.0)[0]


def _gather_step(trainer: Trainer, loss: Optional[Tensor], busy_s: float) -> tuple[float, int, float]:
    """(the mean of the last stage's per-dp-rank losses, the rank whose forward/backward took
    longest, and how long), on every rank — one all-gather of two numbers per rank, where the
    loss alone needs an all-reduce anyway: the straggler heartbeat costs no extra collective."""
    grid = trainer.grid
    row = torch.tensor([0.0 if loss is None else float(loss) / grid.dp, busy_s], dtype=torch.float64,
                       device=grid.device)
    rows = [row] if grid.world_size == 1 else [torch.empty_like(row) for _ in range(grid.world_size)]
    if grid.world_size > 1:
        dist.all_gather(rows, row)
    table = torch.stack(rows).cpu()
    slowest = int(table[:, 1].argmax())
    return float(table[:, 0].sum()), slowest, float(table[slowest, 1])


def train_step(trainer: Trainer, microbatches: list[dict[str, Tensor]], report_expert_load: bool = True) -> dict[str, float]:
    """One optimizer step; returns loss, grad norm, lr, whether the update was skipped, the rank
    whose forward/backward took longest (a straggler shows up here before it hangs) and its
    seconds, and the step's dp-summed expert counts — reduced only when reported or needed by the
    aux-free bias, so ordinary steps pay no extra collective."""
    cfg, grid = trainer.cfg, trainer.grid
    lr = lr_at(trainer.step + 1, cfg.train)
    set_lr(trainer.optimizer, lr)
    at = trainer.progress.at
    trainer.progress.step = trainer.step + 1
    at("forward/backward")
    # pp = 1 scales each micro-batch loss by 1/n; the pipeline leaves the n micro-batches summed
    trainer.grad_sync.start_step(grid.dp * (len(microbatches) if grid.pp > 1 else 1))
    started = time.perf_counter()
    outputs = _run_microbatches(trainer, microbatches, train=True)
    busy_s = time.perf_counter() - started
    at("loss all-gather")
    loss, slowest_rank, slowest_s = _gather_step(trainer, outputs, busy_s)
    at("gradient all-reduce")
    trainer.grad_sync.finish()
    trainer.tied.sum_grads(grid.embed_group)
    params = list(trainer.parameters())
    exclude = trainer.tied.copies()
    at("gradient-norm all-reduce")
    norm = float(global_grad_norm(trainer.dense_params, trainer.expert_params,
                                  grid.dp, grid.edp, None if grid.world_size == 1 else dist.group.WORLD, exclude))
    trainer.step += 1
    skipped = not (math.isfinite(loss) and math.isfinite(norm))
    if skipped and cfg.train.on_nonfinite == "stop":
        raise NonFiniteError(f"step {trainer.step}: non-finite loss {loss} or grad norm {norm} "
                             "(train.on_nonfinite=stop; train.on_nonfinite=skip drops such updates instead)")
    if not skipped:
        clip_grads_(params, cfg.train.clip_grad, torch.tensor(norm))
        trainer.optimizer.step()
    if report_expert_load or cfg.moe.aux_free_bias:
        at("expert-load all-reduce")
        counts = trainer.expert_load.reduce(grid.dp_group)
    else:
        counts, trainer.expert_load.counts = {}, {}
    if cfg.moe.aux_free_bias and not skipped:
        for index, layer_counts in counts.items():
            trainer.expert_load.layers[index].update_expert_bias(layer_counts)
    return {"loss": loss, "grad_norm": norm, "lr": lr, "skipped": skipped, "expert_counts": counts,
            "slowest_rank": slowest_rank, "slowest_rank_s": slowest_s}


def evaluate(trainer: Trainer) -> dict[str, float]:
    """Validation loss per data source (per language), over train.eval_iters global batches each."""
    t, grid = trainer.cfg.train, trainer.grid
    trainer.progress.at("evaluation")
    trainer.expert_load.recording = False
    results = {}
    for name, dataset in trainer.valid.items():
        batches = iter(rank_loader(trainer.cfg, grid, dataset, trainer.eod_id))
        losses = [_world_mean_of_last_stage(trainer, _run_microbatches(trainer, next(batches), train=False))
                  for _ in range(t.eval_iters)]
        results[name] = sum(losses) / len(losses)
    trainer.expert_load.recording = True
    return results


def _expert_counts_on_rank0(trainer: Trainer, counts: dict[int, Tensor]) -> dict[int, Tensor]:
    """Gather every stage's per-layer expert counts (already dp-summed) into one table per layer."""
    cfg = trainer.cfg
    if cfg.model.ffn_type != "moe":
        return {}
    trainer.progress.at("expert-load gather")
    table = torch.zeros(cfg.model.num_layers, cfg.moe.num_experts, dtype=torch.float64, device=trainer.grid.device)
    if trainer.grid.dp_rank == 0:
        for index, layer_counts in counts.items():
            table[index] = layer_counts.double()
    if trainer.grid.world_size > 1:
        dist.all_reduce(table)
    return dict(enumerate(table.cpu()))


def run(cfg: DictConfig) -> None:
    """Train for cfg.train.steps steps with the layout of cfg.parallel on the launched processes."""
    grid = init_grid(cfg.parallel.pp, cfg.parallel.ep, cfg.parallel.collective_timeout_s, cfg.parallel.backend)
    announce(grid.rank, grid.world_size)
    stalled = False
    try:
        _train(cfg, grid)
    except CollectiveStall:
        stalled = True  # the group is broken: tearing it down could block on the missing rank
        raise
    finally:
        if not stalled:
            shutdown()


def _train(cfg: DictConfig, grid: ProcessGrid) -> None:
    torch.manual_seed(cfg.seed + grid.rank)
    run_dir = Path(cfg.run.dir)
    is_writer = grid.rank == 0
    lock = claim_run_dir(cfg, grid)
    try:
        trainer = build_trainer(cfg, grid)
        resume(trainer.state)
        if is_writer:
            _forget_steps_after(run_dir, trainer.step)
        logger = MetricsLogger(run_dir, is_writer, cfg.logging.wandb, cfg.train.steps, OmegaConf.to_container(cfg))
        try:
            _steps(trainer, logger)
        except Exception as exc:
            if grid.world_size == 1 or not is_communication_failure(exc):
                raise
            raise diagnose(grid.rank, grid.world_size, trainer.progress, cfg.parallel.collective_timeout_s, exc) from exc
        logger.finish()
    finally:
        if lock is not None:
            lock.close()


def _steps(trainer: Trainer, logger: MetricsLogger) -> None:
    """Train until cfg.train.steps (or a preemption signal), logging, evaluating and saving."""
    cfg, grid = trainer.cfg, trainer.grid
    tokens_per_step = cfg.train.global_batch * cfg.train.seq_len
    flops_per_token = 3 * (fwd_flops_per_token(cfg) + attention_flops_per_token(cfg, cfg.train.seq_len))
    peak = detect_peak_flops(grid.device)
    skipped = SkippedSteps(cfg.train.max_skipped_steps)
    spike = cfg.train.spike
    spikes = SpikeGuard(spike.window, spike.sigmas, spike.patience) if spike.enabled else None
    rollbacks = 0
    saver = CheckpointSaver(trainer.state)
    downstream = DownstreamEval(cfg)  # reads the task files now: a bad one stops the run before step 1
    first_step, started = trainer.step + 1, time.perf_counter()
    batches = iter(trainer.loader)
    with Preemption() as preemption, contextlib.ExitStack() as finally_:
        finally_.callback(saver.wait)  # a save in the background ends before the run does
        while trainer.step < cfg.train.steps:
            step = trainer.step + 1
            is_log_step = step % cfg.train.log_interval == 0 or step == cfg.train.steps
            start = time.perf_counter()
            result = train_step(trainer, next(batches), report_expert_load=cfg.logging.expert_load and is_log_step)
            elapsed = time.perf_counter() - start
            trainer.progress.step_time_s = elapsed
            record = {
                "step": step, "loss": result["loss"], "lr": result["lr"], "grad_norm": result["grad_norm"],
                "skipped": result["skipped"], "tokens_per_s": tokens_per_step / elapsed,
                "consumed_samples": trainer.loader.consumed_samples, "step_time_s": elapsed,
                "slowest_rank": result["slowest_rank"], "slowest_rank_s": result["slowest_rank_s"],
            }
            if peak is not None:
                record["mfu"] = mfu(record["tokens_per_s"] / grid.world_size, flops_per_token, peak)
            if cfg.logging.expert_load and is_log_step:
                record.update(expert_load_summary(_expert_counts_on_rank0(trainer, result["expert_counts"])))
            logger.log_step(step, record)
            if is_log_step or result["skipped"]:
                logger.console(step, record)
            if spikes is not None and spikes.observe(step, result["loss"]):
                rollbacks += 1
                saver.wait()
                roll_back(trainer, spikes, logger, rollbacks)
                batches = iter(trainer.loader)  # from the position past the skipped window
                continue
            skipped.record(step, result["skipped"])
            if trainer.valid and (step % cfg.train.eval_interval == 0 or step == cfg.train.steps):
                logger.log_eval(step, evaluate(trainer))
            if downstream.due(step):
                logger.log_downstream(step, downstream.run(trainer))
            if _checkpoint_and_maybe_stop(trainer, preemption, saver, skipped, spikes):
                break
    if grid.rank == 0 and trainer.step >= first_step:
        took = datetime.timedelta(seconds=round(time.perf_counter() - started))
        print(f"trained steps {first_step}-{trainer.step} of {cfg.train.steps} in {took}; {skipped.summary()}", flush=True)


class Preemption:
    """SIGTERM / SIGUSR1 (SLURM preemption, scancel, a cluster's grace signal) → stop cleanly.

    The handler only records the signal; after every step the ranks all-reduce the flag, so all
    of them finish the same step, save, and return (exit code 0) even if only some were signalled.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __enter__(self) -> "Preemption":
        self.received: Optional[int] = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def requested(self, grid: ProcessGrid) -> bool:
        flag = torch.tensor([float(self.received is not None)], device=grid.device)
        if grid.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _checkpoint_and_maybe_stop(trainer: Trainer, preemption: Preemption, saver: CheckpointSaver,
                               skipped: SkippedSteps, spikes: Optional[SpikeGuard] = None) -> bool:
    """Save every checkpoint.interval steps, at the last step, and on preemption (then: stop,
    once the save is on disk, in the background or not).

    Not while the latest steps were skipped for non-finite values or look like a loss spike: the
    state may be the one that diverged, and saving it would rotate the good checkpoints out
    (``checkpoint.keep``).
    """
    step, cfg = trainer.step, trainer.cfg
    trainer.progress.at("preemption check")
    stop = preemption.requested(trainer.grid)
    saved = None
    if stop or step % cfg.checkpoint.interval == 0 or step == cfg.train.steps:
        if skipped.streak or (spikes is not None and spikes.suspect):
            why = "skipped for non-finite values" if skipped.streak else "above the loss-spike limit"
            outcome = f"not saved: the last {skipped.streak or spikes.streak} step(s) were {why}"
            if trainer.grid.rank == 0:
                print(f"checkpoint: step {step} {outcome}", flush=True)
        else:
            trainer.progress.at("checkpoint save")
            saved = saver.save()
            if stop:
                saved = saved or saver.wait()
            outcome = "the checkpoint is saved" if saved else "no checkpoint was saved (see above)"
    if stop and trainer.grid.rank == 0:
        name = signal.Signals(preemption.received).name if preemption.received else "a signal on another rank"
        print(f"stopping after step {step} on {name}; {outcome}", flush=True)
    return stop


def roll_back(trainer: Trainer, spikes: SpikeGuard, logger: MetricsLogger, rollbacks: int) -> None:
    """Load the newest checkpoint from before the spike and move the data past every batch read
    since it (plus train.spike.skip_batches more); the run then goes on from there (collective)."""
    cfg, state = trainer.cfg, trainer.state
    spike, detected_at, read_to = cfg.train.spike, trainer.step, trainer.loader.consumed_samples
    if rollbacks > spike.max_rollbacks:
        raise SharedError(f"train.spike.max_rollbacks: loss spike at step {detected_at} after {spike.max_rollbacks} "
                          "rollbacks in this run: it is not one bad batch; lower train.lr or inspect the data")
    target = checkpoint_before(state, spikes.spike_start)
    if target is None:
        raise SharedError(f"train.spike: loss spike at step {detected_at}, but no checkpoint before step "
                          f"{spikes.spike_start} to roll back to; save more often (checkpoint.interval)")
    load_checkpoint(state, target)
    skip_to = read_to + spike.skip_batches * cfg.train.global_batch
    skipped_from = trainer.loader.consumed_samples
    trainer.loader.consumed_samples = skip_to
    spike_start = spikes.spike_start
    spikes.rolled_back()
    if trainer.grid.rank == 0:
        _forget_steps_after(Path(cfg.run.dir), trainer.step)
    logger.log_event("spikes", {"detected_at": detected_at, "spike_start": spike_start, "rolled_back_to": trainer.step,
                                "skipped_samples": [skipped_from, skip_to]},
                     f"loss spike at step {detected_at}: rolled back to step {trainer.step} ({target.name}) and "
                     f"skipped samples {skipped_from}-{skip_to} ({(skip_to - skipped_from) // cfg.train.global_batch} "
                     "batches)")


def _forget_steps_after(run_dir: Path, step: int) -> None:
    """Drop the metrics an interrupted run logged past the step this run starts from (all of them
    on a fresh start), so that metrics.jsonl / eval.jsonl read as one run whose steps continue."""
    def logged_until(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except ValueError:  # a line torn by a kill in mid-write
            return False

    for path in (run_dir / "metrics.jsonl", run_dir / "eval.jsonl", run_dir / "downstream.jsonl"):
        if path.is_file():
            kept = [line for line in path.read_text().splitlines(keepends=True) if logged_until(line)]
            path.with_suffix(".tmp").write_text("".join(kept))
            os.replace(path.with_suffix(".tmp"), path)
