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

A stage costs the sum of its layers (+ the head on the last stage) and a pipeline rank the sum
of its stages (it runs every one of its chunks for each micro-batch). A layer costs what its
FFN kind costs: an MoE layer (router, top-k experts, shared experts) or, where
``moe.layer_freq`` puts one, a dense layer (the dense SwiGLU); when all layers are alike a
stage costs n × layer.

**Memory**, for the tie-break only: megamoe.estimators.memory's estimate of each pipeline rank
(model states, weight copies, activations at the schedule's peak with recompute, the head's
and the pipeline's buffers) on the fewest GPUs the config allows, for the MoE and dense layers
the rank holds.

Not modelled: communication (pipeline send / receive, the experts' all-to-all, the tied
embedding's gradient all-reduce), the optimizer step, and kernels that run further from peak
than others (a vocabulary-wide head matmul is usually more efficient than small expert GEMMs).
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from megamoe.config.choices import StageBalance
from megamoe.config.layers import moe_layer_flags
from megamoe.config.schema import Config
from megamoe.estimators import flops, memory
from megamoe.models import family_of
from megamoe.parallel.stages import layer_ranges, num_stages, rank_ends, rank_layer_indices, stage_indices


def stage_layers(cfg: Config) -> list[int]:
    """Layers of every global stage under the config's split (a validated config)."""
    p = cfg.parallel
    if p.layers_per_stage is not None:
        return list(p.layers_per_stage)
    if p.stage_balance == StageBalance.AUTO:
        return balanced_split(cfg)
    return [cfg.model.num_layers // num_stages(cfg)] * num_stages(cfg)


def rank_layers(cfg: Config, pp_rank: int) -> memory.LayerMix:
    """The decoder layers pipeline rank ``pp_rank`` holds over all its stages, by FFN kind."""
    return _rank_mixes(cfg, stage_layers(cfg))[pp_rank]


def _rank_mixes(cfg: Config, layers: Sequence[int]) -> list[memory.LayerMix]:
    """Each pipeline rank's layers, by kind, under the split ``layers``."""
    return [memory.layer_mix(cfg, held) for held in rank_layer_indices(cfg, layers)]


def rank_memory(cfg: Config, grid: memory.GridShape, pp_rank: int, imbalance: float = 1.0) -> memory.RankMemory:
    """memory.rank_memory's estimate of pipeline rank ``pp_rank`` under the config's split
    (and the expert imbalance, megamoe.estimators.routing)."""
    return memory.rank_memory(cfg, grid, pp_rank, rank_layers(cfg, pp_rank), imbalance)


def memory_per_gpu(cfg: Config, world_size: Optional[int] = None,
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

    layer: int  # one decoder layer of model.ffn_type's kind (an MoE layer of a mixed model): fwd, bwd and recompute
    head: int  # the output head on the last stage: 4 × its forward
    dense_layer: int  # one layer with the dense FFN (a dense model's layer; moe.layer_freq's dense ones)

    def holding(self, layers: int, head: bool) -> int:
        """The cost of a stage, or a pipeline rank, holding ``layers`` layers of a model whose layers
        are all alike (:func:`stage_costs` adds up any) and maybe the head."""
        return layers * self.layer + head * self.head


def part_costs(cfg: Config) -> PartCosts:
    """An MoE and a dense layer's and the head's costs from flops.py's matmul weights per layer and attention scores."""
    scores = flops.attention_flops_per_token(cfg, cfg.train.seq_len) // cfg.model.num_layers
    head = 2 * flops.parameter_breakdown(cfg)["head"].matmul
    attention_block = 2 * sum(part.matmul for part in family_of(cfg).attention_parts(cfg.model).values()) + scores

    def layer(moe_layer: bool) -> int:
        forward = 2 * sum(part.matmul for part in flops.layer_breakdown(cfg, moe_layer).values()) + scores
        recompute = {"none": 0, "selective": attention_block, "full": forward}[cfg.train.activation_checkpointing]
        return 3 * forward + recompute

    return PartCosts(layer=layer(memory.model_kind(cfg, None)), head=4 * head, dense_layer=layer(False))


def layer_costs(cfg: Config) -> list[int]:
    """Training FLOPs per token of each decoder layer, by global index."""
    costs = part_costs(cfg)
    return [costs.layer if moe else costs.dense_layer for moe in moe_layer_flags(cfg.model, cfg.moe)]


def stage_costs(cfg: Config, layers: Sequence[int]) -> list[int]:
    """Training FLOPs per token of each global stage holding ``layers[s]`` layers."""
    per_layer, head = layer_costs(cfg), part_costs(cfg).head
    ranges = layer_ranges(layers)
    return [sum(per_layer[i] for i in ranges[s]) + head * (s == len(layers) - 1) for s in range(len(layers))]


def imbalance(costs: Sequence[float]) -> float:
    """The slowest's cost ÷ the mean (1 = perfectly balanced)."""
    return max(costs) * len(costs) / sum(costs)


@dataclass(frozen=True)
class RankBytes:
    """memory.rank_memory's estimate of one pipeline rank as a function of its MoE and dense
    layers: linear in each count, plus a term that depends on which kinds it holds (the working
    sets of one layer of each), so it is evaluated at 1 and 2 layers of each kind and 1 + 1."""

    per_moe: float
    per_dense: float
    fixed: dict[tuple[bool, ...], float]  # by LayerMix.kinds()

    def __call__(self, layers: memory.LayerMix) -> float:
        return self.fixed[layers.kinds()] + layers.moe * self.per_moe + layers.dense * self.per_dense

    def of_counts(self, moe: np.ndarray, dense: np.ndarray) -> np.ndarray:
        """:meth:`__call__` over arrays of layer counts, with the same arithmetic (inf where there is no layer)."""
        fixed = np.select([(moe > 0) & (dense > 0), moe > 0, dense > 0],
                          [self.fixed.get(kinds, np.inf) for kinds in ((True, False), (True,), (False,))], np.inf)
        return fixed + moe * self.per_moe + dense * self.per_dense

    def of_kind(self, kind: bool, count: int) -> float:
        """``count`` layers of one kind (on the same line at 0 layers)."""
        return self.fixed[(kind,)] + count * (self.per_moe if kind else self.per_dense)

    @classmethod
    def of_rank(cls, cfg: Config, grid: memory.GridShape, pp_rank: int, kinds: set[bool]) -> "RankBytes":
        """Evaluated for the layer kinds ``kinds`` the model has."""

        def estimate(moe: int, dense: int) -> float:
            return memory.rank_memory(cfg, grid, pp_rank, memory.LayerMix(moe, dense)).total

        def of_kind(kind: bool, count: int) -> float:
            return estimate(count, 0) if kind else estimate(0, count)

        slope = {kind: of_kind(kind, 2) - of_kind(kind, 1) for kind in kinds}
        fixed: dict[tuple[bool, ...], float] = {(kind,): of_kind(kind, 1) - slope[kind] for kind in kinds}
        if len(kinds) == 2:
            fixed[(True, False)] = estimate(1, 1) - slope[True] - slope[False]
        return cls(slope.get(True, 0.0), slope.get(False, 0.0), fixed)


def _rank_bytes_models(cfg: Config) -> list[RankBytes]:
    """Each pipeline rank's :class:`RankBytes` on the fewest GPUs the config allows (memory.grid_shape)."""
    grid, kinds = memory.grid_shape(cfg), set(moe_layer_flags(cfg.model, cfg.moe))
    return [RankBytes.of_rank(cfg, grid, r, kinds) for r in range(grid.pp)]


def rank_bytes(cfg: Config, layers: Sequence[int]) -> list[float]:
    """memory.rank_memory's estimate of each pipeline rank under the split ``layers`` (the tie-break)."""
    return [model(mix) for model, mix in zip(_rank_bytes_models(cfg), _rank_mixes(cfg, layers))]


# ---- the balanced split ---------------------------------------------------------------------


def _cap(values: Sequence[float], limit: float) -> int:
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


def _tighten(table: Sequence[Sequence[float]], caps: list[int], feasible: Callable[[list[int]], bool]) -> list[int]:
    """``caps`` lowered by the smallest limit on ``table``'s values (a row per stage or rank, a
    value per layer count) that still leaves a feasible split."""

    def capped(limit: float) -> list[int]:
        return [min(cap, _cap(values, limit)) for cap, values in zip(caps, table)]

    limits = sorted({value for values in table for value in values})
    return capped(limits[bisect.bisect_left(limits, True, key=lambda limit: feasible(capped(limit)))])


def balanced_split(cfg: Config) -> list[int]:
    """The split of model.num_layers over the S stages that minimises, in this order: the slowest
    pipeline rank's compute, the slowest stage's compute (the same with one stage per rank), the
    fullest rank's memory; among splits equal in all three, earlier stages get fewer layers.

    When all layers are alike it is exact and fast (no enumeration of splits): each criterion's
    best value is found by bisecting the values it can take. A limit caps the layers of each
    stage or rank (costs grow with the layers), and caps are feasible when every stage can get
    ≥ 1 layer and the ranges add up to L.

    A stack that mixes MoE and dense layers (``moe.layer_freq``) costs by which layers a stage
    holds, not how many. With one stage per pipeline rank it is still exact: a bottleneck
    dynamic program over the stage boundaries (each stage's cost for every (first, end) layer
    pair, O(S·L²) vectorised) gives each criterion's best value, and the earliest-smallest split
    among those that reach it. With several stages per rank a rank's cost adds up stages far
    apart, which no such program follows: the split is then the better of two local optima,
    reached by passing single layers between stages while that improves the criteria
    (:meth:`_Segments.improved`) from the split that treats every layer as an MoE layer and from
    the one that balances the stages; tests/estimators/test_balance.py checks it against every
    split of small stacks.

    Memoised on the config's content (:func:`rank_memory` asks once per pipeline rank).
    """
    key = repr(cfg)  # the content of a DictConfig or of a plain schema object (neither hashes cheaply)
    if key not in _SPLITS:
        _SPLITS[key] = _balanced_split(cfg)
    return list(_SPLITS[key])


_SPLITS: dict[str, tuple[int, ...]] = {}


def _balanced_split(cfg: Config) -> tuple[int, ...]:
    if len(set(moe_layer_flags(cfg.model, cfg.moe))) == 1:
        return _uniform_split(cfg)
    segments = _Segments(cfg)
    if cfg.parallel.virtual_stages == 1:
        return segments.one_stage_per_rank()
    ends = np.array([segments.improved(start) for start in (_uniform_split(cfg), segments.stage_balanced())])
    return tuple(segments.best(ends, segments.criteria)[0].tolist())


def _uniform_split(cfg: Config) -> tuple[int, ...]:
    """All layers alike: caps on the layers of each stage and rank (the docstring of :func:`balanced_split`)."""
    pp, num_layers, count = cfg.parallel.pp, cfg.model.num_layers, num_stages(cfg)
    ranks = [stage_indices(cfg, r) for r in range(pp)]
    costs, each = part_costs(cfg), range(num_layers + 1)
    rank_compute = [[costs.holding(n, head=rank_ends(cfg, r)[1]) for n in each] for r in range(pp)]
    stage_compute = [[costs.holding(n, head=s == count - 1) for n in each] for s in range(count)]
    kind = memory.model_kind(cfg, None)
    rank_memory = [[model.of_kind(kind, n) for n in each] for model in _rank_bytes_models(cfg)]

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


class _Segments:
    """A mixed stack's costs of every stage for every run of layers [x, y): compute tables (one
    per stage: the last adds the head) and, with one stage per rank, memory tables (rank s =
    stage s), as (L + 1) × (L + 1) arrays, inf where x >= y (a stage holds at least one layer)."""

    def __init__(self, cfg: Config) -> None:
        self.count, self.num_layers = num_stages(cfg), cfg.model.num_layers
        flags = moe_layer_flags(cfg.model, cfg.moe)
        self.compute_prefix = np.concatenate([[0], np.cumsum(layer_costs(cfg), dtype=np.int64)])
        self.dense_prefix = np.concatenate([[0], np.cumsum([not moe for moe in flags], dtype=np.int64)])
        self.head = part_costs(cfg).head
        self.owner = np.zeros((self.count, cfg.parallel.pp), dtype=np.int64)  # stage → the rank holding it
        for r in range(cfg.parallel.pp):
            self.owner[stage_indices(cfg, r), r] = 1
        self.moves = np.array([np.eye(self.count, dtype=np.int64)[a] - np.eye(self.count, dtype=np.int64)[b]
                               for a, b in itertools.permutations(range(self.count), 2)]).reshape(-1, self.count)
        self.rank_bytes = _rank_bytes_models(cfg)
        x, y = np.meshgrid(np.arange(self.num_layers + 1), np.arange(self.num_layers + 1), indexing="ij")
        self.valid = x < y
        self.dense = np.where(self.valid, self.dense_prefix[y] - self.dense_prefix[x], 0)  # of the run [x, y)
        self.moe = np.where(self.valid, y - x, 0) - self.dense

    def compute(self, stage: int) -> np.ndarray:
        table = self.compute_prefix[None, :] - self.compute_prefix[:, None] + self.head * (stage == self.count - 1)
        return np.where(self.valid, table.astype(np.float64), np.inf)

    def memory(self, rank: int) -> np.ndarray:
        return self.rank_bytes[rank].of_counts(self.moe, self.dense)

    def _bottleneck(self, tables: list[np.ndarray]) -> float:
        """The least possible largest table value of a split (stage s's cost from tables[s])."""
        best = np.full(self.num_layers + 1, np.inf)
        best[0] = -np.inf
        for table in tables:
            best = np.maximum(best[:, None], table).min(axis=0)
        return float(best[self.num_layers])

    def _earliest_smallest(self, tables: list[np.ndarray]) -> tuple[int, ...]:
        """The split whose stages get the fewest layers, earliest first, among those with every table value finite."""
        ends = np.arange(self.num_layers + 1) == self.num_layers
        finishes = [ends]  # finishes[k][x]: stages S - k .. S - 1 can hold layers x .. L - 1
        for table in reversed(tables):
            finishes.append((np.isfinite(table) & finishes[-1][None, :]).any(axis=1))
        split, x = [], 0
        for s, table in enumerate(tables):
            y = int(np.argmax(np.isfinite(table[x]) & finishes[self.count - 1 - s]))
            split.append(y - x)
            x = y
        return tuple(split)

    def one_stage_per_rank(self) -> tuple[int, ...]:
        """Exact: the least slowest stage, then the least fullest rank, then the earliest-smallest split."""
        compute = [self.compute(s) for s in range(self.count)]
        limit = self._bottleneck(compute)
        tables = [np.where(table <= limit, self.memory(s), np.inf) for s, table in enumerate(compute)]
        limit = self._bottleneck(tables)
        return self._earliest_smallest([np.where(table <= limit, table, np.inf) for table in tables])

    def stage_balanced(self) -> tuple[int, ...]:
        """The earliest-smallest split among those with the least slowest stage (ranks not considered)."""
        compute = [self.compute(s) for s in range(self.count)]
        limit = self._bottleneck(compute)
        return self._earliest_smallest([np.where(table <= limit, table, np.inf) for table in compute])

    def costs(self, splits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each row of ``splits`` [n, S]: each pipeline rank's compute, each stage's, each rank's memory."""
        ends = np.concatenate([np.zeros((len(splits), 1), dtype=np.int64), np.cumsum(splits, axis=1)], axis=1)
        stage = self.compute_prefix[ends[:, 1:]] - self.compute_prefix[ends[:, :-1]]
        stage[:, -1] += self.head
        dense = (self.dense_prefix[ends[:, 1:]] - self.dense_prefix[ends[:, :-1]]) @ self.owner
        moe = splits @ self.owner - dense
        rank_bytes = np.stack([model.of_counts(m, d) for model, m, d in zip(self.rank_bytes, moe.T, dense.T)], axis=1)
        return stage @ self.owner, stage, rank_bytes

    def criteria(self, splits: np.ndarray) -> np.ndarray:
        """:func:`balanced_split`'s criteria of each row of ``splits``, in order (lower is better), one row each."""
        ranks, stage, rank_bytes = self.costs(splits)
        return np.column_stack([ranks.max(axis=1), stage.max(axis=1), rank_bytes.max(axis=1), splits])

    def _sorted_lists(self, splits: np.ndarray) -> np.ndarray:
        """The ranks' compute slowest first, then the stages', then the ranks' memory, then the split."""
        return np.column_stack([-np.sort(-values, axis=1) for values in self.costs(splits)] + [splits])

    def _maxima_first(self, splits: np.ndarray) -> np.ndarray:
        return np.column_stack([self.criteria(splits)[:, :3], self._sorted_lists(splits)])

    def best(self, splits: np.ndarray, order: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, tuple]:
        """The row of ``splits`` that ``order`` ranks first, and its key."""
        keys = order(splits)
        first = np.lexsort(keys.T[::-1])[0]
        return splits[first], tuple(keys[first].tolist())

    def improved(self, split: Sequence[int]) -> np.ndarray:
        """``split`` after the best move while one improves the criteria. A move passes one layer from
        a stage to any other (the stages between them shift by one layer: a run of boundaries moves).

        Three rounds, each from where the last stopped: first the whole sorted lists (ranks'
        compute slowest first, then the stages', then the ranks' memory), so that relieving one
        of several slowest ranks counts as progress; then each list's maximum first, the rest of
        the lists breaking ties; then :meth:`criteria` itself (the split is the last tie-break)."""
        current = np.array([split], dtype=np.int64)
        for order in (self._sorted_lists, self._maxima_first, self.criteria):
            key = tuple(order(current)[0].tolist())
            while True:
                moved = current + self.moves
                moved = moved[(moved >= 1).all(axis=1)]
                if not len(moved):
                    break
                candidate, candidate_key = self.best(moved, order)
                if candidate_key >= key:
                    break
                current, key = candidate[None, :], candidate_key
        return current[0]
