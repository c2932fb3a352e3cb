"""Byte ranges of an input: any cuts, wherever they fall, read every record once, in order."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools.preprocess import readers
from data_tools.preprocess.readers import Piece, lines_before, read_chunks


def _tiles(size: int, rng: random.Random, cuts: int) -> list[Piece]:
    """Pieces that tile a file of ``size`` bytes at random cuts (repeats give empty pieces)."""
    points = sorted(rng.randrange(size + 1) for _ in range(cuts))
    bounds = [0, *points, size]
    return [Piece(Path(), a, b) for a, b in zip(bounds, bounds[1:])]


def _records(piece: Piece) -> list[tuple[int, bytes]]:
    """(line number in the file, line) for each record of a text piece."""
    chunks = list(read_chunks([piece], ["text"]))
    base = lines_before(piece.path, piece.start)
    return [(base + chunk.first_line + i, line) for chunk in chunks for i, line in enumerate(chunk.records)]


@pytest.mark.parametrize("seed", range(6))
def test_text_ranges_tile_the_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    rng = random.Random(seed)
    monkeypatch.setattr(readers, "CHUNK_BYTES", rng.choice([1, 64, 1 << 20]))  # ranges ending mid-chunk, or not
    lines = [b"x" * rng.choice([0, 1, 5, 80]) + b"\n" for _ in range(200)] + [b"no newline at the end"]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(lines))
    size = path.stat().st_size
    starts = [0, *[sum(map(len, lines[:i])) for i in range(1, len(lines))]]
    cuts = rng.sample(starts, 3) + [rng.randrange(size) for _ in range(5)]  # at line starts and anywhere
    bounds = [0, *sorted(cuts), size]
    got = [record for a, b in zip(bounds, bounds[1:]) for record in _records(Piece(path, a, b))]
    assert got == list(enumerate(lines, 1))


def test_a_whole_piece_reads_like_the_file(tmp_path: Path) -> None:
    path = tmp_path / "in.txt"
    path.write_bytes(b"a\nbb\n\nccc\n")
    assert _records(Piece(path)) == _records(Piece(path, 0, path.stat().st_size)) == [
        (1, b"a\n"), (2, b"bb\n"), (3, b"\n"), (4, b"ccc\n")]
    assert str(Piece(path)) == str(path) and str(Piece(path, 2, 5)) == f"{path} (bytes 2–5)"


@pytest.mark.parametrize("seed", range(4))
def test_parquet_ranges_tile_the_row_groups(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    path = tmp_path / "in.parquet"
    texts = [f"row {i} " + "w" * rng.randrange(50) for i in range(300)]
    pq.write_table(pa.table({"id": list(range(300)), "text": texts}), path, row_group_size=rng.choice([7, 40]))
    got = []
    for piece in _tiles(path.stat().st_size, rng, cuts=6):
        piece = Piece(path, piece.start, piece.end)
        for chunk in read_chunks([piece], ["text"]):
            got += [(chunk.first_line + i, text) for i, text in enumerate(chunk.records[0].to_pylist())]
    assert got == list(enumerate(texts, 1))


def test_gzip_is_not_splittable() -> None:
    assert not readers.splittable(Path("a.jsonl.gz")) and not readers.splittable(Path("a.TXT.GZ"))
    assert readers.splittable(Path("a.jsonl")) and readers.splittable(Path("a.parquet"))
