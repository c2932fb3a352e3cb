"""One optimizer step, and the validation loss. One step, top to bottom:

1. every data-parallel rank takes its slice of the global batch, split into micro-batches;
2. the runner runs them forward and backward (megamoe.train.runner: through the pipeline
   schedule when pp > 1, a plain accumulation loop when pp = 1; MoE aux losses add their
   gradient inside the backward pass, so they never travel to the last stage);
3. gradients are summed over dp (dense) or edp (experts) and divided by dp; the tied
   embedding's two copies (first and last stage) are summed;
4. the global gradient norm (each parameter counted once) decides skip / clip; the optimizer steps;
5. the loss, and on reported steps the routing statistics, are reduced for the callbacks.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from megamoe.config.choices import OnNonFinite
from megamoe.errors import NonFiniteError
from megamoe.parallel.grads import clip_grads_, global_grad_norm
from megamoe.train.router_stats import LayerRouting
from megamoe.train.runner import Batch
from megamoe.train.schedule import lr_at, set_lr
from megamoe.train.trainer import Trainer, rank_loader


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did, the same on every rank; the loop hands it to each callback."""

    step: int
    loss: float  # mean token loss of the global batch
    grad_norm: float
    lr: float
    skipped: bool  # a non-finite loss or gradient norm: no update
    slowest_rank: int  # whose forward/backward took longest: a straggler shows here before it hangs
    slowest_rank_s: float
    time_s: float  # this rank's wall time of the step
    # this rank's MoE layers' routing summed over dp; only on reported steps (or with the aux-free bias)
    routing: dict[int, LayerRouting] = field(default_factory=dict)


def train_step(trainer: Trainer, microbatches: list[Batch], report_routing: bool = True) -> StepResult:
    """One optimizer step over this rank's micro-batches of the global batch (collective)."""
    cfg, grid = trainer.cfg, trainer.grid
    step_started = time.perf_counter()
    lr = lr_at(trainer.step + 1, cfg.train)
    set_lr(trainer.optimizer, lr)
    at = trainer.progress.at
    trainer.progress.step = trainer.step + 1
    at("forward/backward")
    trainer.grad_sync.start_step(grid.dp * trainer.runner.grad_divisor(len(microbatches)))
    started = time.perf_counter()
    outputs = trainer.runner.run(microbatches, train=True)
    busy_s = time.perf_counter() - started
    at("loss all-gather")
    loss, slowest_rank, slowest_s = _gather_step(trainer, outputs, busy_s)
    at("gradient all-reduce")
    trainer.grad_sync.finish()
    trainer.tied.sum_grads(grid.embed_group)
    at("gradient-norm all-reduce")
    norm = float(global_grad_norm(trainer.dense_params, trainer.expert_params, grid.dp, grid.edp,
                                  None if grid.world_size == 1 else dist.group.WORLD, trainer.tied.copies()))
    trainer.step += 1
    skipped = not (math.isfinite(loss) and math.isfinite(norm))
    if skipped and cfg.train.on_nonfinite == OnNonFinite.STOP:
        raise NonFiniteError(f"step {trainer.step}: non-finite loss {loss} or grad norm {norm} "
                             "(train.on_nonfinite=stop; train.on_nonfinite=skip drops such updates instead)")
    if not skipped:
        clip_grads_(list(trainer.parameters()), cfg.train.clip_grad, torch.tensor(norm))
        trainer.optimizer.step()
    routing = {}
    if report_routing or cfg.moe.aux_free_bias:
        at("routing all-reduce")
        routing = trainer.router_stats.reduce(grid.dp_group)
    trainer.router_stats.clear()
    if cfg.moe.aux_free_bias and not skipped:
        for index, layer in routing.items():
            trainer.router_stats.layers[index].update_expert_bias(layer.tokens_per_expert)
    trainer.progress.step_time_s = time.perf_counter() - step_started
    return StepResult(trainer.step, loss, norm, lr, skipped, slowest_rank, slowest_s, trainer.progress.step_time_s,
                      routing)


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


@contextlib.contextmanager
def evaluating(trainer: Trainer, operation: str) -> Iterator[None]:
    """Modules in eval mode (no router noise, no dropout) and routing not recorded while inside;
    training mode and recording come back however the block ends."""
    trainer.progress.at(operation)
    trainer.router_stats.recording = False
    for module in trainer.modules:
        module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module in trainer.modules:
            module.train()
        trainer.router_stats.recording = True


def validation_loss(trainer: Trainer) -> dict[str, float]:
    """Validation loss per data source (per language), over train.eval_iters global batches each (collective)."""
    grid, iters = trainer.grid, trainer.cfg.train.eval_iters
    results = {}
    with evaluating(trainer, "evaluation"):
        for name, dataset in trainer.valid.items():
            batches = iter(rank_loader(trainer.cfg, grid, dataset, trainer.eod_id))
            losses = [_gather_step(trainer, trainer.runner.run(next(batches), train=False), 0.0)[0]
                      for _ in range(iters)]
            results[name] = sum(losses) / len(losses)
    return results
