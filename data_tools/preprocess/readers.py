"""Finding the input files and reading them as raw chunks, in file order.

Text files (.jsonl, .txt, optionally .gz) are read as lists of lines, about CHUNK_BYTES at a
time; parquet files one record batch of the key columns at a time. Nothing is decoded here:
that happens in the workers (:mod:`.parsers`).
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


@dataclass
class Chunk:
    """Raw records handed to a worker: lines of a text file, or the key columns of a parquet batch."""

    path: str
    first_line: int  # 1-based line (parquet: row) number of records[0]
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


def _line_chunks(path: Path, fmt: str) -> Iterator[Chunk]:
    with _open_lines(path) as (raw, stream):
        line, pos = 1, 0
        try:
            while lines := stream.readlines(CHUNK_BYTES):
                now = raw.tell()
                yield Chunk(str(path), line, fmt, lines, now - pos)
                line, pos = line + len(lines), now
        except READ_ERRORS as exc:
            raise UserError(_unreadable(path, exc)) from exc


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


def _parquet_chunks(path: Path, keys: Sequence[str]) -> Iterator[Chunk]:
    import pyarrow as pa
    import pyarrow.parquet as pq

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
    size, rows = path.stat().st_size, max(pf.metadata.num_rows, 1)
    row, done = 0, 0
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=list(keys)):
            row += batch.num_rows
            yield Chunk(str(path), row - batch.num_rows + 1, "parquet",
                        [batch.column(k) for k in keys], size * row // rows - done)
            done = size * row // rows
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: row {row + 1}: cannot read ({exc})") from exc


def read_chunks(paths: Iterable[Path], keys: Sequence[str]) -> Iterator[Chunk]:
    """Every record of every file, in order, grouped into chunks."""
    for path in paths:
        fmt = input_format(path)
        if fmt == "parquet":
            yield from _parquet_chunks(path, keys)
        else:
            yield from _line_chunks(path, fmt)
