"""Cutting the inputs into ``--num-shards`` shares: contiguous, in input order, balanced by size.

The input files, in their order, are laid end to end as one stream of bytes of total size S;
shard i's share is the stretch ``[i·S/N, (i+1)·S/N)`` of it. A cut that falls inside a gzip
file moves to that file's nearer end (gzip cannot be entered in the middle); anywhere else it
stays where it is, and the readers give each line or parquet row group to the range its first
byte lies in. So the shards, concatenated in index order, hold every document once and in input
order: their merge is byte for byte what one run over the same inputs writes. The plan depends
only on the inputs' order and sizes, so every task of an array computes the same one on its own.
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate
from pathlib import Path
from typing import Sequence

from data_tools.preprocess.readers import Piece, splittable


def plan_shares(paths: Sequence[Path], num_shards: int) -> list[list[Piece]]:
    """The pieces of the inputs that each of ``num_shards`` shards tokenizes, shard by shard."""
    sizes = [path.stat().st_size for path in paths]
    starts = list(accumulate(sizes, initial=0))  # where each file begins in the stream; the last is S
    total = starts[-1]
    cuts = [0, *(_cut(i * total // num_shards, paths, starts) for i in range(1, num_shards)), total]
    shares: list[list[Piece]] = [[] for _ in range(num_shards)]
    for path, size, start in zip(paths, sizes, starts):
        shard = min(bisect_right(cuts, start) - 1, num_shards - 1)  # the share this file begins in
        if size == 0:  # an empty file still belongs somewhere: its warning comes from that shard
            shares[shard].append(Piece(path))
        while shard < num_shards and cuts[shard] < start + size:
            lo, hi = max(cuts[shard], start) - start, min(cuts[shard + 1], start + size) - start
            if lo < hi:
                shares[shard].append(Piece(path) if (lo, hi) == (0, size) else Piece(path, lo, hi))
            shard += 1
    return shares


def _cut(target: int, paths: Sequence[Path], starts: list[int]) -> int:
    """Where the cut aimed at stream offset ``target`` goes: there, unless inside a gzip file."""
    i = bisect_right(starts, target) - 1  # the file that holds byte ``target``
    if i >= len(paths) or target == starts[i] or splittable(paths[i]):
        return target
    begin, end = starts[i], starts[i + 1]
    return begin if target - begin <= end - target else end
