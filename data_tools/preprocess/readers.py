"""Finding the input files and reading them as raw chunks, in file order.

Text files (.jsonl, .txt, optionally .gz) are read as lists of lines, about CHUNK_BYTES at a
time; parquet files one record batch of the key columns at a time. Nothing is decoded here:
that happens in the workers (:mod:`.parsers`).

A :class:`Piece` is a whole file or a byte range of one (a shard's share, see :mod:`.plan`). A
range holds the records that *start* in it: the lines whose first byte, or the parquet row
groups whose first column chunk, lies in ``[start, end)``. So any set of ranges that tile a file
reads every record exactly once, in order, wherever the cuts fall. Compressed text (.gz) cannot
be entered in the middle and is only ever read whole.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Optional, Sequence

from megamoe.errors import UserError

# Input formats by file name ending.
FORMATS = {".jsonl": "json", ".jsonl.gz": "json", ".txt": "txt", ".txt.gz": "txt", ".parquet": "parquet"}
CHUNK_BYTES = 1 << 20  # lines handed to a worker at once: big enough to amortise IPC, small enough to stream
PARQUET_BATCH_ROWS = 1024


def input_format(path: Path) -> Optional[str]:
    """"json", "txt" or "parquet" from the file name, or None for an unsupported file."""
    name = path.name.lower()
    return next((fmt for suffix, fmt in FORMATS.items() if name.endswith(suffix)), None)


def _check_format(path: Path) -> Path:
    if input_format(path) is None:
        raise UserError(f"{path}: unsupported input type; expected one of {', '.join(FORMATS)}")
    return path


def expand_inputs(specs: Sequence[str]) -> list[Path]:
    """Files named by each spec (a file, a glob, or a directory searched recursively), in a fixed order."""
    paths: list[Path] = []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(p for p in Path(spec).rglob("*") if p.is_file() and input_format(p))
            if not found:
                raise UserError(f"{spec}: directory holds no {', '.join(FORMATS)} files")
            paths += found
        elif glob.has_magic(spec):
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True) if os.path.isfile(m))
            if not matches:
                raise UserError(f"no files match {spec!r}")
            paths += [_check_format(p) for p in matches]
        elif os.path.isfile(spec):
            paths.append(_check_format(Path(spec)))
        else:
            raise UserError(f"input not found: {spec}")
    return paths


def splittable(path: Path) -> bool:
    """Whether a file can be read in byte ranges: plain text and parquet can, gzip cannot."""
    return not path.name.lower().endswith(".gz")


@dataclass(frozen=True)
class Piece:
    """A file, or the records of it that start in bytes ``[start, end)``."""

    path: Path
    start: int = 0
    end: Optional[int] = None  # None: to the end of the file

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.end is None

    def size(self) -> int:
        """Bytes on disk that this piece covers."""
        size = self.path.stat().st_size
        return size if self.end is None else max(0, min(self.end, size) - self.start)

    def __str__(self) -> str:
        return str(self.path) if self.whole else f"{self.path} (bytes {self.start:,}–{self.end:,})"


@dataclass
class Chunk:
    """Raw records handed to a worker: lines of a text file, or the key columns of a parquet batch."""

    path: str
    first_line: int  # 1-based line (parquet: row) number of records[0]; of a text range: from its first line
    fmt: str
    records: Any  # list[bytes] for json/txt; list[pyarrow.Array], one per key, for parquet
    input_bytes: int  # on-disk bytes this chunk advances the file by (progress only)


# What reading a damaged file raises: an OSError (gzip.BadGzipFile is one), EOFError for a
# truncated .gz, zlib.error for corrupt compressed data.
READ_ERRORS = (OSError, EOFError, zlib.error)


@contextlib.contextmanager
def _open_lines(path: Path) -> Iterator[tuple[IO[bytes], IO[bytes]]]:
    """(the file on disk, its lines: decompressed for .gz)."""
    with open(path, "rb") as raw:
        yield raw, gzip.GzipFile(fileobj=raw) if path.name.lower().endswith(".gz") else raw


def _line_chunks(piece: Piece, fmt: str) -> Iterator[Chunk]:
    path, end = piece.path, piece.end if piece.end is not None else float("inf")
    with _open_lines(path) as (raw, stream):
        line, pos = 1, _first_line_at(raw, piece.start)
        try:
            while pos < end and (lines := stream.readlines(CHUNK_BYTES)):
                now = raw.tell()
                if now > end:  # read past the range: keep the lines that start in it
                    lines = _starting_before(lines, end - pos)
                yield Chunk(str(path), line, fmt, lines, min(now, end) - pos)
                line, pos = line + len(lines), now
        except READ_ERRORS as exc:
            raise UserError(_unreadable(path, exc)) from exc


def _first_line_at(raw: IO[bytes], start: int) -> int:
    """Move ``raw`` to the first line that starts at or after byte ``start``; returns where that is."""
    if start:
        raw.seek(start - 1)
        raw.readline()  # the rest of the line that byte start - 1 belongs to: an earlier range's
    return raw.tell()


def _starting_before(lines: list[bytes], limit: int) -> list[bytes]:
    """The leading ``lines`` that start less than ``limit`` bytes after the first one does."""
    at = 0
    for i, line in enumerate(lines):
        if at >= limit:
            return lines[:i]
        at += len(line)
    return lines


def lines_before(path: Path, start: int) -> int:
    """How many lines of a text file start before byte ``start``: what turns a range's line
    numbers into the file's. It reads the file up to there, so it is for error paths only."""
    if not start:
        return 0
    count, left = 1, start - 1  # line 1 starts at 0; each newline before byte start - 1 starts another
    with open(path, "rb") as f:
        while left and (block := f.read(min(left, 16 << 20))):
            count += block.count(b"\n")
            left -= len(block)
    return count


def _unreadable(path: Path, exc: Exception) -> str:
    """The error for a damaged file, at the line where its readable data ends."""
    hint = "; the file is truncated" if isinstance(exc, EOFError) else ""
    return f"{path}:{_whole_lines(path) + 1}: cannot read ({exc}){hint}"


def _whole_lines(path: Path) -> int:
    """How many whole lines of a damaged file can be read. A failed readlines() drops the lines
    it had read, so this second pass (on the error path only) finds where the damage is."""
    count = 0
    with _open_lines(path) as (_, stream), contextlib.suppress(*READ_ERRORS):
        for _ in stream:
            count += 1
    return count


def _parquet_chunks(piece: Piece, keys: Sequence[str]) -> Iterator[Chunk]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = piece.path
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: not a readable parquet file ({exc})") from exc
    schema = pf.schema_arrow
    for key in keys:
        if key not in schema.names:
            raise UserError(f"{path}: no column {key!r} (columns: {', '.join(schema.names)}); choose with --json-keys")
        kind = schema.field(key).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
            raise UserError(f"{path}: column {key!r} holds {kind}, not text")
    meta = pf.metadata
    groups = [g for g in range(meta.num_row_groups) if piece.whole or _starts_in(piece, _row_group_start(meta, g))]
    if not groups:
        return
    before = sum(meta.row_group(g).num_rows for g in range(groups[0]))  # rows of earlier ranges
    size, rows = piece.size(), max(sum(meta.row_group(g).num_rows for g in groups), 1)
    row, done = 0, 0
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=groups, columns=list(keys)):
            row += batch.num_rows
            yield Chunk(str(path), before + row - batch.num_rows + 1, "parquet",
                        [batch.column(k) for k in keys], size * row // rows - done)
            done = size * row // rows
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: row {before + row + 1}: cannot read ({exc})") from exc


def _row_group_start(meta: Any, group: int) -> int:
    """The file offset of a parquet row group's first column chunk (its dictionary page, if any)."""
    columns = (meta.row_group(group).column(c) for c in range(meta.row_group(group).num_columns))
    return min(c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset for c in columns)


def _starts_in(piece: Piece, offset: int) -> bool:
    return piece.start <= offset and (piece.end is None or offset < piece.end)


def read_chunks(inputs: Iterable[Path | Piece], keys: Sequence[str]) -> Iterator[Chunk]:
    """Every record of every file or piece, in order, grouped into chunks."""
    for item in inputs:
        piece = item if isinstance(item, Piece) else Piece(item)
        if input_format(piece.path) == "parquet":
            yield from _parquet_chunks(piece, keys)
        else:
            yield from _line_chunks(piece, input_format(piece.path))
