"""Blending sources by weight: which source, and which of its samples, fills each position.

Source ``d``'s ``k``-th sample gets the deadline ``(k + 1/2) / w_d`` (weights summing to 1)
and the blend reads samples in deadline order, ties to the lower source. Among the first
``t`` positions every source then holds ``round(w_d * tau)`` samples for a common ``tau``
close to ``t``: each prefix of the stream is within about one sample per source of its
target share. Megatron-Core picks, position by position, the source with the largest
deficit ``w_d * (t + 1) - count_d`` — a sequential C++ loop; deadline order gives a like
guarantee but can be built in independent windows with numpy, in bounded memory.

Deadlines are exact integers, ``(2k + 1) * P_d`` with period ``P_d = round(2^20 / w_d)``, and
the source id is packed into the low bits: one plain integer sort of a window orders it by
(deadline, source), with no float ties to worry about. Rounding the periods moves a share by
at most ``w_d / 2^21`` relative (~100 of 490M samples); and as the resolution is fixed, the
order of the first ``t`` positions depends on the weights alone, not on the blend's length.
"""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence

import numpy as np
from tqdm import tqdm

from megamoe.data.samples import DEFAULT_WAIT_TIMEOUT_S, INDEX_FORMAT, NpyWriter, cached_arrays, index_dtype

_PERIOD_BITS = 20  # weight resolution: periods are 2^20 / w_d, rounded
_WINDOW = 1 << 18  # positions per vectorised step (about): temporaries stay in cache


class Dataset(Protocol):
    """What blending, FIM and the loader read: a length, and a sample (int64 tokens) by index."""

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> np.ndarray: ...
    def describe_token(self, i: int, token_id: int) -> str: ...  # the source and document it came from


def normalize_weights(weights: Sequence[float] | np.ndarray) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.all(w > 0):
        raise ValueError(f"blend weights must be a non-empty list of positive numbers, got {list(weights)}")
    return w / w.sum()


class _Deadlines:
    """The integer deadlines ``(2k + 1) * P_d`` of every source's samples."""

    def __init__(self, weights: Sequence[float] | np.ndarray, num_samples: int) -> None:
        w = normalize_weights(weights)
        self.periods = np.maximum(np.rint(2.0**_PERIOD_BITS / w), 1).astype(np.int64)
        self.src_bits = max(1, (len(w) - 1).bit_length())
        if len(w) > 2**15 or (4 * (num_samples + _WINDOW + len(w)) << (_PERIOD_BITS + self.src_bits)) >= 2**63:
            raise ValueError(f"{num_samples} samples from {len(w)} sources do not fit 64-bit deadlines")

    def count_before(self, tau: int) -> np.ndarray:
        """Per source, how many of its samples have a deadline ``(2k + 1) P < tau``."""
        return ((max(tau, 1) - 1) // self.periods + 1) // 2

    def merge(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Samples ``lo[d] <= k < hi[d]`` of each source ``d``: (source, k) in (deadline, source) order."""
        packed = np.empty(int((hi - lo).sum()), dtype=np.int64)
        at = 0
        for d, (a, b) in enumerate(zip(lo.tolist(), hi.tolist())):
            part = packed[at:at + b - a]
            part[:] = np.arange(2 * a + 1, 2 * b, 2, dtype=np.int64)  # 2k + 1
            part *= int(self.periods[d]) << self.src_bits
            part |= d
            at += b - a
        packed.sort()
        source = (packed & ((1 << self.src_bits) - 1)).astype(np.int16)
        k = (packed >> self.src_bits) // self.periods[source] // 2
        return source, k


def blend_counts(weights: Sequence[float] | np.ndarray, num_samples: int) -> np.ndarray:
    """How many samples each source contributes to the first ``num_samples`` of the blend."""
    dl = _Deadlines(weights, num_samples)
    lo, hi = 0, 4 * (num_samples + len(dl.periods) + 1) << _PERIOD_BITS  # bisect: first tau with enough
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if dl.count_before(mid).sum() < num_samples else (lo, mid)
    before = dl.count_before(lo - 1)  # the rest are the samples due exactly at lo - 1, by source
    source, _ = dl.merge(before, dl.count_before(lo))
    return before + np.bincount(source[:num_samples - int(before.sum())], minlength=len(dl.periods))


def build_blend_index(weights: Sequence[float] | np.ndarray, num_samples: int, paths: Mapping[str, str],
                      progress: bool = False) -> None:
    """Write ``dataset`` (source of each position, int16) and ``sample`` (index within it)."""
    dl = _Deadlines(weights, num_samples)
    counts = blend_counts(weights, num_samples)
    dataset_w = NpyWriter(paths["dataset"], np.int16)
    sample_w = NpyWriter(paths["sample"], index_dtype(int(counts.max(initial=0))))
    step = _WINDOW << (_PERIOD_BITS + 1)  # deadline time of ~_WINDOW positions
    lo, tau = np.zeros(len(counts), dtype=np.int64), 0
    with tqdm(total=num_samples, unit="sample", unit_scale=True, desc="blend index", disable=not progress) as bar:
        while dataset_w.rows < num_samples:
            tau += step
            hi = dl.count_before(tau)
            source, k = dl.merge(lo, hi)
            take = min(len(source), num_samples - dataset_w.rows)
            dataset_w.write(source[:take])
            sample_w.write(k[:take])
            bar.update(take)
            lo = hi
    dataset_w.close()
    sample_w.close()


class BlendedDataset:
    """Samples drawn from ``datasets`` in proportion to ``weights``; the choice is cached.

    ``datasets[d]`` must hold at least ``blend_counts(weights, num_samples)[d]`` samples.
    The index depends on nothing but the weights and the length, so it is shared by every
    run that blends with the same weights.
    """

    def __init__(self, datasets: Sequence[Dataset], weights: Sequence[float] | np.ndarray, num_samples: int,
                 cache_dir: str, is_builder: bool, wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S) -> None:
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights)
        if len(self.datasets) != len(self.weights):
            raise ValueError(f"{len(self.datasets)} datasets but {len(self.weights)} weights")
        self.counts = blend_counts(self.weights, num_samples)
        short = [d for d, ds in enumerate(self.datasets) if len(ds) < self.counts[d]]
        if short:
            raise ValueError(f"source {short[0]} has {len(self.datasets[short[0]])} samples, the blend needs "
                             f"{self.counts[short[0]]}; size it with blend_counts()")
        self.num_samples = num_samples = int(num_samples)
        desc = {"kind": "blend", "format": INDEX_FORMAT, "weights": self.weights.tolist(), "num_samples": num_samples}
        arrays = cached_arrays(desc, cache_dir, "blend", ("dataset", "sample"),
                               lambda paths: build_blend_index(self.weights, num_samples, paths, progress=True),
                               is_builder, wait_timeout_s)
        self.dataset_index, self.dataset_sample_index = arrays["dataset"], arrays["sample"]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]

    def describe_token(self, i: int, token_id: int) -> str:
        return self.datasets[int(self.dataset_index[i])].describe_token(int(self.dataset_sample_index[i]), token_id)


def split_ranges(split: str, num_docs: int) -> list[range]:
    """Contiguous document ranges for train / valid / test from a ratio like ``"98,1,1"``."""
    parts = [float(x) for x in split.replace("/", ",").split(",")]
    bounds = np.round(np.cumsum([0.0, *parts]) / sum(parts) * num_docs).astype(np.int64)
    return [range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

