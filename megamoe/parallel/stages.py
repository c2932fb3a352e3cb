"""Pipeline-stage geometry: which global stages a pipeline rank holds, and which layers a stage holds.

The model's decoder layers are cut into S = pp × virtual_stages stages, stage s holding a
contiguous run of layers (how many each: the split, megamoe.estimators.balance). Stages are
placed on the pp pipeline ranks in one of two layouts:

* **loop** (1F1B, interleaved 1F1B, interleaved zero bubble): rank r holds stages r, r + pp,
  r + 2·pp, … — each micro-batch loops over the ranks virtual_stages times;
* **V** (ZB-V, DualPipeV: exactly two stages per rank): rank r holds stages r and 2·pp − 1 − r —
  a micro-batch goes down the ranks and comes back up, so rank 0 holds both the first stage
  (the embedding) and the last (the head and the loss).

Layers keep their global names whatever the split or layout, so checkpoints load across both.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

from megamoe.config.choices import V_SCHEDULES
from megamoe.config.schema import Config

Number = TypeVar("Number", int, float)


def num_stages(cfg: Config) -> int:
    """S = pp × virtual_stages."""
    return cfg.parallel.pp * cfg.parallel.virtual_stages


def stage_indices(cfg: Config, pp_rank: int) -> list[int]:
    """The global stage indices this pipeline rank holds, in order: a loop (r, r + pp, …), or a V
    (r, 2·pp − 1 − r), where the first and the last stage share rank 0."""
    pp = cfg.parallel.pp
    if cfg.parallel.schedule in V_SCHEDULES:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [chunk * pp + pp_rank for chunk in range(cfg.parallel.virtual_stages)]


def rank_ends(cfg: Config, pp_rank: int) -> tuple[bool, bool]:
    """Does pipeline rank ``pp_rank`` hold the first stage (the embedding), the last (the head)?"""
    stages = stage_indices(cfg, pp_rank)
    return 0 in stages, num_stages(cfg) - 1 in stages


def rank_totals(cfg: Config, per_stage: Sequence[Number]) -> list[Number]:
    """Sum a per-stage quantity (layers, FLOPs) over the stages of each pipeline rank."""
    return [sum(per_stage[s] for s in stage_indices(cfg, r)) for r in range(cfg.parallel.pp)]


def rank_layer_indices(cfg: Config, per_stage: Sequence[int]) -> list[list[int]]:
    """The global layers of each pipeline rank, in stage order, under the split ``per_stage`` (layers per stage)."""
    ranges = layer_ranges(per_stage)
    return [[i for s in stage_indices(cfg, r) for i in ranges[s]] for r in range(cfg.parallel.pp)]


def layer_ranges(layers: Sequence[int]) -> list[range]:
    """The global layer indices of each stage: [3, 5] → [range(0, 3), range(3, 8)]."""
    ends = [sum(layers[:s + 1]) for s in range(len(layers))]
    return [range(end - n, end) for n, end in zip(layers, ends)]
