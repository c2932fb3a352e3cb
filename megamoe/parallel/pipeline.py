"""Pipeline parallelism: which layers a rank builds, and the schedule that runs them.

Stage s of S = pp × virtual_stages holds a contiguous run of layers, as many as the config's
split gives it (even, explicit or balanced: megamoe.parallel.balance). Pipeline rank r holds the
stages r, r + pp, r + 2·pp, … (the loop layout that torch's interleaved 1F1B expects). Each
stage builds only its own layers. Stages pass ``(hidden, position_ids)`` along, because
position ids may restart after each end-of-document token and every layer's RoPE needs them.

The engine is ``torch.distributed.pipelining`` (Schedule1F1B / ScheduleInterleaved1F1B).
With pp = 1 there is no pipeline: the trainer runs micro-batches in a plain gradient-
accumulation loop, which is the same math without any point-to-point traffic.
"""

from __future__ import annotations

from typing import Optional

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B
from torch.distributed.pipelining.schedules import _PipelineSchedule

from megamoe.models import build_stage
from megamoe.nn.decoder import Decoder
from megamoe.nn.loss import IGNORE_INDEX, chunked_lm_loss
from megamoe.nn.moe.dispatcher import TokenExchange
from megamoe.parallel.balance import layer_ranges, stage_indices, stage_layers
from megamoe.parallel.mesh import ProcessGrid


class StageModule(nn.Module):
    """One pipeline stage: a contiguous slice of the decoder, speaking the stage protocol."""

    def __init__(self, model: Decoder, is_last: bool) -> None:
        super().__init__()
        self.model = model
        self.is_last = is_last

    def forward(self, x: Tensor, position_ids: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Hidden states: passed on with the position ids, or — on the last stage — final-normed,
        for :meth:`loss` (the head runs there, chunked, so no stage outputs logits)."""
        out = self.model.hidden_states(x, position_ids=position_ids)
        return out if self.is_last else (out, position_ids)

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
        modules.append(StageModule(model, is_last=s == last_stage))
    return modules


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
    positions = meta(b, s, dtype=torch.int64)  # travels along, needs no gradient
    hidden = meta(b, s, m.hidden_size).requires_grad_()
    inputs = (meta(b, s, dtype=torch.int64) if stage == 0 else hidden, positions)
    if stage == num_stages - 1:
        return inputs, (hidden,)  # the final-normed hidden states (fp32, like the residual stream)
    return inputs, (hidden, positions)


def build_schedule(cfg: DictConfig, grid: ProcessGrid, modules: list[StageModule],
                   num_microbatches: int) -> _PipelineSchedule:
    """Wrap the stage modules in torch PipelineStages and the configured schedule.

    ``scale_grads=True``: gradients are divided by the number of micro-batches after the
    backward passes, so each micro-batch loss is a plain mean (as in the pp = 1 loop). The loss
    is the last stage's :meth:`StageModule.loss` (never called on the other ranks).
    """
    num_stages = cfg.parallel.pp * cfg.parallel.virtual_stages
    stages = []
    for module, s in zip(modules, stage_indices(cfg, grid.pp_rank)):
        inputs, outputs = _example_io(cfg, module, s, num_stages)
        stages.append(PipelineStage(module, stage_index=s, num_stages=num_stages, device=grid.device,
                                    input_args=inputs, output_args=outputs, group=grid.pp_group))
    loss_fn = modules[-1].loss
    if cfg.parallel.schedule == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(stages, n_microbatches=num_microbatches, loss_fn=loss_fn)
    return Schedule1F1B(stages[0], n_microbatches=num_microbatches, loss_fn=loss_fn)
