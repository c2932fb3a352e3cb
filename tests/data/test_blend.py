"""Blending: the index equals deadline order computed naively, every prefix of the stream keeps
each source's share, datasets are read through it, and splits cut documents by ratio."""

from __future__ import annotations

import os

import numpy as np
import pytest

import megamoe.data.blend as blend
from megamoe.data.blend import BlendedDataset, blend_counts, build_blend_index, split_ranges


def ref_blend(weights: list[float], n: int) -> list[tuple[int, int]]:
    """(source, k) of the first n samples: sorted by deadline (2k + 1) * round(2^20 / w), then source."""
    total = sum(weights)
    periods = [max(1, round(2**20 / (w / total))) for w in weights]
    due = [((2 * k + 1) * p, d, k) for d, p in enumerate(periods) for k in range(n + 1)]
    return [(d, k) for _, d, k in sorted(due)[:n]]


def _build(tmp_path, weights, n) -> tuple[np.ndarray, np.ndarray]:
    paths = {"dataset": str(tmp_path / "d.npy"), "sample": str(tmp_path / "s.npy")}
    build_blend_index(weights, n, paths)
    return np.load(paths["dataset"]), np.load(paths["sample"])


@pytest.mark.parametrize("weights, n", [([0.5, 0.4, 0.1], 1000), ([1, 1, 1], 10), ([3], 7),
                                        ([0.7, 0.2, 0.1, 1e-4], 3000), ([2, 3, 5, 7, 11, 13], 2000)])
def test_index_matches_reference(tmp_path, monkeypatch, weights, n) -> None:
    monkeypatch.setattr(blend, "_WINDOW", 64)  # many windows: their seams must not show
    source, k = _build(tmp_path, weights, n)
    assert source.dtype == np.int16
    assert list(zip(source.tolist(), k.tolist())) == ref_blend(weights, n)
    assert blend_counts(weights, n).tolist() == np.bincount(source, minlength=len(weights)).tolist()


def test_every_prefix_keeps_the_proportions(tmp_path) -> None:
    weights = np.array([0.5, 0.3, 0.15, 0.05])
    source, k = _build(tmp_path, weights.tolist(), 20000)
    counts = np.cumsum(np.eye(4, dtype=np.int64)[source], axis=0)  # per prefix length, per source
    expected = np.outer(np.arange(1, 20001), weights)
    assert np.abs(counts - expected).max() <= 1.5
    for d in range(4):  # each source's samples are taken in order, none twice
        assert k[source == d].tolist() == list(range(int((source == d).sum())))


def test_counts_without_building() -> None:
    assert blend_counts([0.5, 0.3, 0.2], 0).tolist() == [0, 0, 0]
    weights, n = np.array([0.6, 0.3, 0.1]), 10**9
    counts = blend_counts(weights, n)
    assert counts.sum() == n
    share = 1 / np.rint(2**20 / weights)  # what the integer periods honour exactly
    assert np.abs(counts - share / share.sum() * n).max() <= 1.5
    assert np.abs(counts / n - weights).max() <= 3e-7


class _Tagged:
    """Sample k of source d is [d, k]."""

    def __init__(self, d: int, n: int) -> None:
        self.d, self.n = d, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> np.ndarray:
        assert 0 <= k < self.n
        return np.array([self.d, k])


def test_blended_dataset_reads_through_the_index(tmp_path, monkeypatch) -> None:
    weights, n = [0.6, 0.4], 500
    counts = blend_counts(weights, n)
    ds = BlendedDataset([_Tagged(0, counts[0]), _Tagged(1, counts[1])], weights, n, str(tmp_path), True)
    assert len(ds) == n
    assert [tuple(ds[i].tolist()) for i in range(n)] == ref_blend(weights, n)
    files = sorted(os.listdir(tmp_path))
    monkeypatch.setattr(blend, "build_blend_index", lambda *a, **k: pytest.fail("rebuilt although cached"))
    BlendedDataset([_Tagged(0, counts[0]), _Tagged(1, counts[1])], weights, n, str(tmp_path), True)
    assert sorted(os.listdir(tmp_path)) == files
    with pytest.raises(ValueError, match="source 1 has"):
        BlendedDataset([_Tagged(0, n), _Tagged(1, 3)], weights, n, str(tmp_path), True)


def test_split_ranges() -> None:
    assert split_ranges("98,1,1", 100) == [range(0, 98), range(98, 99), range(99, 100)]
    assert split_ranges("10,0,0", 7) == [range(0, 7), range(7, 7), range(7, 7)]
    assert split_ranges("1/1/1", 10) == [range(0, 3), range(3, 7), range(7, 10)]
    assert sum(map(len, split_ranges("949,50,1", 12345))) == 12345
