"""The shard plan: contiguous shares in input order that tile every file, balanced by size."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from data_tools.preprocess.plan import plan_shares
from data_tools.preprocess.readers import Piece


def _files(tmp_path: Path, sizes: dict[str, int]) -> list[Path]:
    paths = []
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(b"x" * size)
        paths.append(tmp_path / name)
    return paths


def _spans(shares: list[list[Piece]]) -> list[tuple[Path, int, int]]:
    """Every piece as (file, start, end), shard after shard."""
    return [(p.path, p.start, p.path.stat().st_size if p.end is None else p.end) for share in shares for p in share]


def _check_tiling(paths: list[Path], shares: list[list[Piece]]) -> None:
    """In shard order, the pieces run through the files in order, each file from its start to its end."""
    spans = _spans(shares)
    assert [path for path, _, _ in spans] == sorted((path for path, _, _ in spans), key=paths.index)
    for path in paths:
        mine = [(a, b) for p, a, b in spans if p == path]
        assert mine[0][0] == 0 and mine[-1][1] == path.stat().st_size
        assert all(b == a for (_, b), (a, _) in zip(mine, mine[1:]))


@pytest.mark.parametrize("num_shards", [1, 2, 5, 64])
def test_plain_text_is_cut_into_equal_byte_ranges(tmp_path: Path, num_shards: int) -> None:
    paths = _files(tmp_path, {"a.jsonl": 1000, "b.jsonl": 37, "c.parquet": 4000, "d.txt": 963})
    shares = plan_shares(paths, num_shards)
    _check_tiling(paths, shares)
    sizes = [sum(p.size() for p in share) for share in shares]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 6000
    assert plan_shares(paths, num_shards) == shares  # deterministic


def test_gzip_files_stay_whole_and_cuts_move_to_their_nearer_end(tmp_path: Path) -> None:
    paths = _files(tmp_path, {"a.jsonl": 100, "b.jsonl.gz": 1000, "c.jsonl": 900})
    shares = plan_shares(paths, 4)  # cuts aimed at 500 (in b: to 100), 1000 (in b: to 1100), 1500 (in c)
    assert shares == [[Piece(paths[0])], [Piece(paths[1])], [Piece(paths[2], 0, 400)], [Piece(paths[2], 400, 900)]]
    _check_tiling(paths, shares)
    assert plan_shares(paths[1:2], 3) == [[], [Piece(paths[1])], []]  # one gzip file: one shard does it all


def test_empty_files_belong_to_exactly_one_shard(tmp_path: Path) -> None:
    paths = _files(tmp_path, {"a.jsonl": 0, "b.jsonl": 10, "c.jsonl": 0, "d.jsonl": 10, "e.jsonl": 0})
    shares = plan_shares(paths, 2)
    # c.jsonl sits at stream offset 10, where shard 1's share begins
    assert [[p.path.name for p in share] for share in shares] == [["a.jsonl", "b.jsonl"],
                                                                  ["c.jsonl", "d.jsonl", "e.jsonl"]]


@pytest.mark.parametrize("seed", range(20))
def test_random_inputs_are_tiled(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    names = [f"{i:02d}." + rng.choice(["jsonl", "jsonl.gz", "txt", "parquet"]) for i in range(rng.randrange(1, 8))]
    paths = _files(tmp_path, {name: rng.choice([0, 1, 10, 1000]) for name in names})
    shares = plan_shares(paths, rng.randrange(1, 12))
    if sum(p.stat().st_size for p in paths):
        _check_tiling([p for p in paths if p.stat().st_size], [[p for p in s if p.size()] for s in shares])
    assert sorted(p.path for share in shares for p in share if p.whole or p.start == 0) == sorted(paths)
