"""How many decoder layers each pipeline stage holds, and the cost model that balances them.

Stage s of S = pp × virtual_stages holds a contiguous run of layers (which pipeline rank holds
which stages: megamoe.parallel.stages). The split is ``parallel.stage_balance=even`` (L / S
layers each), an explicit ``parallel.layers_per_stage``, or ``stage_balance=auto``
(:func:`balanced_split`). The estimators below the split (megamoe.estimators.memory) take a
rank's layer count as an argument; :func:`rank_memory` and :func:`memory_per_gpu` give them
the config's split.

**Compute**, in training FLOPs per token (megamoe.estimators.flops's conventions, attention scores
at train.seq_len included):

* a decoder layer: forward, backward (2 × forward), and what train.activation_checkpointing
  recomputes — full: the layer's forward again; selective: the attention block's (LFA,
  q/k/v/o, scores);
* the output head: 4 × its forward matmul — forward, the chunked cross-entropy's recompute of
  the logits in the backward, and the backward;
* the embedding (a lookup; its backward a scatter-add), the final norm and the loss: 0, like
  every element-wise op.

All decoder layers are alike, so a stage costs n × layer (+ the head on the last stage) and a
pipeline rank the sum of its stages (it runs every one of its chunks for each micro-batch).

**Memory**, for the tie-break only: megamoe.estimators.memory's estimate of each pipeline rank
(model states, weight copies, activations at the schedule's peak with recompute, the head's
and the pipeline's buffers) on the fewest GPUs the config allows.

Not modelled: communication (pipeline send / receive, the experts' all-to-all, the tied
embedding's gradient all-reduce), the optimizer step, and kernels that run further from peak
than others (a vocabulary-wide head matmul is usually more efficient than small expert GEMMs).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from omegaconf import DictConfig

from megamoe.estimators import flops, memory
from megamoe.models import family_of
from megamoe.parallel.stages import num_stages, rank_ends, rank_totals, stage_indices


def stage_layers(cfg: DictConfig) -> list[int]:
    """Layers of every global stage under the config's split (a validated config)."""
    p = cfg.parallel
    if p.layers_per_stage is not None:
        return list(p.layers_per_stage)
    if p.stage_balance == "auto":
        return balanced_split(cfg)
    return [cfg.model.num_layers // num_stages(cfg)] * num_stages(cfg)


def rank_layers(cfg: DictConfig, pp_rank: int) -> int:
    """Decoder layers pipeline rank ``pp_rank`` holds, over all its stages."""
    return rank_totals(cfg, stage_layers(cfg))[pp_rank]


def rank_memory(cfg: DictConfig, grid: memory.GridShape, pp_rank: int, imbalance: float = 1.0) -> memory.RankMemory:
    """memory.rank_memory's estimate of pipeline rank ``pp_rank`` under the config's split
    (and the expert imbalance, megamoe.estimators.routing)."""
    return memory.rank_memory(cfg, grid, pp_rank, rank_layers(cfg, pp_rank), imbalance)


def memory_per_gpu(cfg: DictConfig, world_size: Optional[int] = None,
                   imbalance: float = 1.0) -> tuple[memory.GridShape, memory.RankMemory]:
    """The grid and the estimate of its fullest GPU (the pipeline rank with the largest total)
    under the config's split, on ``world_size`` GPUs (by default the fewest the config allows),
    with expert imbalance ``imbalance``."""
    grid = memory.grid_shape(cfg, world_size)
    ranks = [rank_memory(cfg, grid, r, imbalance) for r in range(grid.pp)]
    return grid, max(ranks, key=lambda r: r.total)


# ---- the cost model -------------------------------------------------------------------------


@dataclass(frozen=True)
class PartCosts:
    """Training FLOPs per token of the parts a stage can hold (the module docstring says what counts)."""

    layer: int  # one decoder layer: forward, backward and recompute
    head: int  # the output head on the last stage: 4 × its forward

    def holding(self, layers: int, head: bool) -> int:
        """The cost of a stage, or a pipeline rank, holding ``layers`` layers and maybe the head."""
        return layers * self.layer + head * self.head


def part_costs(cfg: DictConfig) -> PartCosts:
    """A layer's and the head's costs from flops.py's per-part matmul weights and attention scores."""
    rows = flops.parameter_breakdown(cfg)
    num_layers = cfg.model.num_layers
    scores = flops.attention_flops_per_token(cfg, cfg.train.seq_len) // num_layers
    head = 2 * rows["head"].matmul
    layer = (flops.fwd_flops_per_token(cfg) - head) // num_layers + scores
    attention_block = 2 * sum(part.matmul for part in family_of(cfg).attention_parts(cfg.model).values()) + scores
    recompute = {"none": 0, "selective": attention_block, "full": layer}[cfg.train.activation_checkpointing]
    return PartCosts(layer=3 * layer + recompute, head=4 * head)


def stage_costs(cfg: DictConfig, layers: Sequence[int]) -> list[int]:
    """Training FLOPs per token of each global stage holding ``layers[s]`` layers."""
    costs = part_costs(cfg)
    return [costs.holding(n, head=s == len(layers) - 1) for s, n in enumerate(layers)]


def imbalance(costs: Sequence[float]) -> float:
    """The slowest's cost ÷ the mean (1 = perfectly balanced)."""
    return max(costs) * len(costs) / sum(costs)


def _memory_lines(cfg: DictConfig) -> list[tuple[float, float]]:
    """(bytes per layer, fixed bytes) of each pipeline rank in memory.rank_memory's estimate, on
    the fewest GPUs the config allows (memory.grid_shape). The estimate grows linearly with the
    rank's layers, so it is evaluated at 1 and 2 layers per stage."""
    grid, v = memory.grid_shape(cfg), cfg.parallel.virtual_stages
    one, two = ([memory.rank_memory(cfg, grid, r, per_stage * v).total for r in range(grid.pp)] for per_stage in (1, 2))
    return [((b - a) / v, 2 * a - b) for a, b in zip(one, two)]


def rank_bytes(cfg: DictConfig, layers: Sequence[int]) -> list[float]:
    """memory.rank_memory's estimate of each pipeline rank under the split ``layers`` (the tie-break)."""
    return [fixed + n * per_layer for (per_layer, fixed), n in zip(_memory_lines(cfg), rank_totals(cfg, layers))]


# ---- the balanced split ---------------------------------------------------------------------


def _cap(values: list[float], limit: float) -> int:
    """The most layers with ``values[n] <= limit`` (values grow with n; -1 when even 0 layers exceed it)."""
    return bisect.bisect_right(values, limit) - 1


def _fits(low: list[int], high: list[int], rank_caps: list[int], ranks: list[list[int]], num_layers: int) -> bool:
    """Is there a split with low[s] <= n_s <= high[s], at most rank_caps[r] layers on rank r, num_layers in all?

    Integer ranges add up to integer ranges, so it is enough to compare the sums of their ends.
    """
    total_low = total_high = 0
    for stages, cap in zip(ranks, rank_caps):
        if any(high[s] < low[s] for s in stages):
            return False
        rank_low, rank_high = sum(low[s] for s in stages), min(cap, sum(high[s] for s in stages))
        if rank_low > rank_high:
            return False
        total_low, total_high = total_low + rank_low, total_high + rank_high
    return total_low <= num_layers <= total_high


def _tighten(table: list[list[float]], caps: list[int], feasible: Callable[[list[int]], bool]) -> list[int]:
    """``caps`` lowered by the smallest limit on ``table``'s values (a row per stage or rank, a
    value per layer count) that still leaves a feasible split."""

    def capped(limit: float) -> list[int]:
        return [min(cap, _cap(values, limit)) for cap, values in zip(caps, table)]

    limits = sorted({value for values in table for value in values})
    return capped(limits[bisect.bisect_left(limits, True, key=lambda limit: feasible(capped(limit)))])


def balanced_split(cfg: DictConfig) -> list[int]:
    """The split of model.num_layers over the S stages that minimises, in this order: the slowest
    pipeline rank's compute, the slowest stage's compute (the same with one stage per rank), the
    fullest rank's memory; among splits equal in all three, earlier stages get fewer layers.

    Exact and fast (no enumeration of splits): each criterion's best value is found by bisecting
    the values it can take. A limit caps the layers of each stage or rank (costs grow with the
    layers), and caps are feasible when every stage can get ≥ 1 layer and the ranges add up to L.
    Memoised on the config's content (:func:`rank_memory` asks once per pipeline rank).
    """
    key = repr(cfg)  # the content of a DictConfig or of a plain schema object (neither hashes cheaply)
    if key not in _SPLITS:
        _SPLITS[key] = _balanced_split(cfg)
    return list(_SPLITS[key])


_SPLITS: dict[str, tuple[int, ...]] = {}


def _balanced_split(cfg: DictConfig) -> tuple[int, ...]:
    pp, num_layers, count = cfg.parallel.pp, cfg.model.num_layers, num_stages(cfg)
    ranks = [stage_indices(cfg, r) for r in range(pp)]
    costs, each = part_costs(cfg), range(num_layers + 1)
    rank_compute = [[costs.holding(n, head=rank_ends(cfg, r)[1]) for n in each] for r in range(pp)]
    stage_compute = [[costs.holding(n, head=s == count - 1) for n in each] for s in range(count)]
    rank_memory = [[fixed + n * per_layer for n in each] for per_layer, fixed in _memory_lines(cfg)]

    ones = [1] * count
    stage_caps, rank_caps = [num_layers] * count, [num_layers] * pp
    rank_caps = _tighten(rank_compute, rank_caps, lambda caps: _fits(ones, stage_caps, caps, ranks, num_layers))
    stage_caps = _tighten(stage_compute, stage_caps, lambda caps: _fits(ones, caps, rank_caps, ranks, num_layers))
    rank_caps = _tighten(rank_memory, rank_caps, lambda caps: _fits(ones, stage_caps, caps, ranks, num_layers))

    split: list[int] = []
    for s in range(count):
        rest = ones[s + 1:]
        split.append(next(n for n in range(1, stage_caps[s] + 1)
                          if _fits(split + [n] + rest, split + [n] + stage_caps[s + 1:], rank_caps, ranks, num_layers)))
    return tuple(split)
