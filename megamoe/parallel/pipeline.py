"""Pipeline parallelism: which layers a rank builds, and the schedule that runs them.

Stage s of S = pp × virtual_stages holds a contiguous run of layers, as many as the config's
split gives it (even, explicit or balanced: megamoe.estimators.balance); which stages a rank
holds, in a loop or a V, is megamoe.parallel.stages. Each stage builds only its own layers.
Stages pass ``(hidden, position_ids)`` along, because position ids may restart after each
end-of-document token and every layer's RoPE needs them.

The engine is ``torch.distributed.pipelining`` (:data:`SCHEDULES`). The zero-bubble ones split
a stage's backward into an input pass, from the stage's outputs to its inputs, and a later
weight pass that resumes from the gradients the input pass saved where the weights join that
path (torch's stage_backward_input / stage_backward_weight). MoEAuxLossBackward sits on a MoE
layer's output, so the input pass runs it: the aux losses' gradient flows into the input
gradient and into the router's saved gradients, once. The first stage, whose inputs (token
ids) take no gradient, runs its whole backward in the weight pass. With pp = 1 there is no
pipeline: the trainer runs micro-batches in a plain gradient-accumulation loop, which is the
same math without any point-to-point traffic.

With ``data.reset_attention_mask`` the stages also pass the document ids [b, s] along, after
the position ids (which show where documents start only with ``reset_position_ids``), and each
stage builds its layers' document mask from them: every shape stays static (:func:`_example_io`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.distributed.pipelining import (
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

from megamoe.compat import (
    HookedPipelineStage,
    PipelineSchedule,
    PipelineScheduleRuntime,
    PipelineStageBase,
    forwards_only,
)
from megamoe.config.choices import V_SCHEDULES, Schedule
from megamoe.estimators.balance import stage_layers
from megamoe.models import build_stage
from megamoe.nn.decoder import Decoder
from megamoe.nn.loss import IGNORE_INDEX, chunked_lm_loss
from megamoe.nn.moe.dispatcher import TokenExchange
from megamoe.parallel.grads import GradSync
from megamoe.parallel.mesh import ProcessGrid
from megamoe.parallel.stages import layer_ranges, stage_indices

# parallel.schedule → torch's schedule for several stages per rank (1f1b runs one: Schedule1F1B).
SCHEDULES: dict[str, type[PipelineScheduleRuntime]] = {
    Schedule.INTERLEAVED_1F1B: ScheduleInterleaved1F1B,
    Schedule.INTERLEAVED_ZERO_BUBBLE: ScheduleInterleavedZeroBubble,
    Schedule.ZBV_ZERO_BUBBLE: ScheduleZBVZeroBubble,
    Schedule.DUALPIPEV: ScheduleDualPipeV,
}


class StageModule(nn.Module):
    """One pipeline stage: a contiguous slice of the decoder, speaking the stage protocol."""

    def __init__(self, model: Decoder, is_first: bool, is_last: bool) -> None:
        super().__init__()
        self.model = model
        self.is_first, self.is_last = is_first, is_last

    def forward(self, x: Tensor, position_ids: Tensor, document_ids: Optional[Tensor] = None
                ) -> Tensor | tuple[Tensor, ...]:
        """Hidden states: passed on with the position ids (and the document ids), or — on the last
        stage — final-normed, for :meth:`loss` (the head runs there, chunked, so no stage outputs logits)."""
        out = self.model.hidden_states(x, position_ids=position_ids, document_ids=document_ids)
        if self.is_last:
            return out
        return (out, position_ids) if document_ids is None else (out, position_ids, document_ids)

    def loss(self, hidden: Tensor, labels: Tensor) -> Tensor:
        """Mean token cross-entropy of one micro-batch from the last stage's output (the
        pipeline's loss_fn); ``labels`` hold IGNORE_INDEX where the loss mask is 0."""
        return chunked_lm_loss(hidden, self.model.head_weight, labels, labels != IGNORE_INDEX)


def build_stage_modules(cfg: DictConfig, pp_rank: int, exchange: Optional[TokenExchange] = None) -> list[StageModule]:
    """Build (only) the layers of this rank's stages; parameters keep their global names."""
    ranges = layer_ranges(stage_layers(cfg))
    last_stage = len(ranges) - 1
    modules = []
    for s in stage_indices(cfg, pp_rank):
        model = build_stage(cfg, ranges[s], pre_process=s == 0, post_process=s == last_stage, exchange=exchange)
        modules.append(StageModule(model, is_first=s == 0, is_last=s == last_stage))
    return modules


@dataclass(frozen=True)
class TiedEmbedding:
    """This rank's ends of a tied embedding that the stages split: stage 0's ``embed.weight`` and
    the last stage's ``lm_head.weight`` copy (None where the rank holds no such end)."""

    embedding: Optional[nn.Parameter] = None
    head_copy: Optional[nn.Parameter] = None

    @classmethod
    def of(cls, models: Sequence[Decoder]) -> "TiedEmbedding":
        ends = {model.pre_process: end for model in models if (end := model.tied_parameter()) is not None}
        return cls(ends.get(True), ends.get(False))

    def sum_grads(self, group: Optional[dist.ProcessGroup]) -> None:
        """Give both copies the sum of their gradients, so they stay equal: an all-reduce over
        ``group`` (the first and the last stage's ranks), or a local sum where this rank holds
        both ends (rank 0 of a V schedule; pp = 1 with virtual stages)."""
        if self.embedding is not None and self.head_copy is not None:
            assert self.embedding.grad is not None and self.head_copy.grad is not None  # after the backward
            self.embedding.grad += self.head_copy.grad
            self.head_copy.grad.copy_(self.embedding.grad)
        elif self.embedding is not None or self.head_copy is not None:
            end = self.embedding if self.embedding is not None else self.head_copy
            assert end is not None and end.grad is not None  # after the backward
            dist.all_reduce(end.grad, group=group)

    def copies(self) -> set[nn.Parameter]:
        """What the gradient norm leaves out: the head copy, a duplicate of the embedding."""
        return {self.head_copy} if self.head_copy is not None else set()


def stage_inputs(batch: dict[str, Tensor]) -> tuple[Tensor, ...]:
    """What the first stage takes from a micro-batch: token ids, position ids and — when the run
    keeps attention inside documents (the loader then adds them) — document ids."""
    return tuple(batch[key] for key in ("tokens", "position_ids", "document_ids") if key in batch)


def masked_labels(labels: Tensor, loss_mask: Tensor) -> Tensor:
    """Fold the loss mask into the labels (ignored positions = -100) so one tensor travels."""
    return labels.masked_fill(loss_mask == 0, IGNORE_INDEX)


def _example_io(cfg: DictConfig, module: StageModule, stage: int,
                num_stages: int) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Meta tensors with each stage's input / output shapes and dtypes (static pipeline metadata).

    Given these, torch's PipelineStage skips its shape-inference pass, which would otherwise run
    every stage once on the first micro-batch (or on uninitialised buffers) — and an MoE layer
    would count those tokens as routed.
    """
    b, s, m = cfg.train.micro_batch, cfg.train.seq_len, cfg.model
    dtype = next(module.parameters()).dtype
    meta = lambda *shape, dtype=dtype: torch.empty(shape, dtype=dtype, device="meta")  # noqa: E731
    ids = (meta(b, s, dtype=torch.int64),) * (2 if cfg.data.reset_attention_mask else 1)  # positions[, documents]
    hidden = meta(b, s, m.hidden_size).requires_grad_()
    inputs = (meta(b, s, dtype=torch.int64) if stage == 0 else hidden, *ids)  # the ids need no gradient
    if stage == num_stages - 1:
        return inputs, (hidden,)  # the final-normed hidden states (fp32, like the residual stream)
    return inputs, (hidden, *ids)


class Schedules(NamedTuple):
    """The schedule a training step runs, and the one whose ``eval()`` runs its forward passes."""

    train: PipelineSchedule
    evaluate: PipelineSchedule


def build_schedules(cfg: DictConfig, grid: ProcessGrid, modules: list[StageModule], num_microbatches: int,
                    grad_sync: GradSync) -> Schedules:
    """Wrap the stage modules in PipelineStages and the configured schedule.

    Each stage arms its chunk of ``grad_sync`` for its last backward (a full backward, or the
    weight pass where the first stage runs its whole backward) and flushes the chunk when the
    schedule reduces its gradients (:class:`megamoe.compat.HookedPipelineStage`).

    ``scale_grads=False``: the micro-batch gradients stay summed and ``grad_sync`` divides them
    by the micro-batch count with the data-parallel average (torch would divide in place at the
    end of the backward, under a reduction already in flight). The loss is the last stage's
    :meth:`StageModule.loss` (never called on the other ranks). The V schedules set the stages'
    V mapping themselves; :func:`stage_indices` built the same one.
    """
    num_stages = cfg.parallel.pp * cfg.parallel.virtual_stages
    stages: list[PipelineStageBase] = []
    for module, s in zip(modules, stage_indices(cfg, grid.pp_rank)):
        inputs, outputs = _example_io(cfg, module, s, num_stages)
        stages.append(HookedPipelineStage(module, lambda stage: grad_sync.arm(stage.model),
                                          lambda stage: grad_sync.flush(stage.model), stage_index=s,
                                          num_stages=num_stages, device=grid.device, input_args=inputs,
                                          output_args=outputs, group=grid.pp_group))
    loss_fn = modules[-1].loss
    if cfg.parallel.schedule == Schedule.ONE_F_ONE_B:
        single = Schedule1F1B(stages[0], n_microbatches=num_microbatches, loss_fn=loss_fn, scale_grads=False)
        return Schedules(single, single)

    def schedule() -> PipelineScheduleRuntime:
        return SCHEDULES[cfg.parallel.schedule](stages, n_microbatches=num_microbatches, loss_fn=loss_fn,
                                                scale_grads=False)

    train = schedule()
    return Schedules(train, forwards_only(schedule()) if cfg.parallel.schedule in V_SCHEDULES else train)
