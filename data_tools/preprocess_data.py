"""Tokenize jsonl / parquet / txt corpora into Megatron-compatible ``.bin``/``.idx`` datasets.

Flags follow Megatron-LM's ``tools/preprocess_data.py`` so existing scripts carry over::

    python -m data_tools.preprocess_data --input 'raw/zh/*.jsonl.gz' --output-prefix data/zh \\
        --json-keys text --tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer.json \\
        --append-eod --workers 16

writes ``data/zh_text_document.bin`` / ``.idx`` (one pair per ``--json-keys`` key).

The pipeline keeps Python work per document tiny so throughput stays close to the tokenizer's
own: the main process reads raw chunks (~1 MB of lines, or a parquet record batch) in file order;
workers decode, validate and batch-encode a whole chunk and return flat numpy arrays; the main
process writes them in input order, so the bytes are identical for any ``--workers``.
Outputs appear under their final names only when complete. Ctrl-C or SIGTERM stops a run at
once and removes its temporary files; so does a failed write (read-only place, full disk).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import glob
import gzip
import json
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import traceback
import zlib
from collections import Counter, deque
from dataclasses import dataclass, field
from itertools import chain
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Optional, Sequence, TypeVar

import numpy as np
from tqdm import tqdm

from megamoe.cli import exit_on_user_error
from megamoe.data.indexed import IndexedDatasetBuilder, best_dtype
from megamoe.data.tokenizer import TOKENIZER_TYPES, Tokenizer, build_tokenizer
from megamoe.errors import UserError, naming, write_error

# Input formats by file name ending.
FORMATS = {".jsonl": "json", ".jsonl.gz": "json", ".txt": "txt", ".txt.gz": "txt", ".parquet": "parquet"}
CHUNK_BYTES = 1 << 20  # lines handed to a worker at once: big enough to amortise IPC, small enough to stream
PARQUET_BATCH_ROWS = 1024
IN_FLIGHT_PER_WORKER = 4  # queued chunks per worker: enough that one slow chunk does not idle the others


# --------------------------------------------------------------------------- inputs

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
        for count, _ in enumerate(stream, 1):
            pass
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


# --------------------------------------------------------------------------- parsing

@dataclass(frozen=True)
class Reject:
    """A document that could not be used, and why (``kind`` is what the summary counts)."""

    path: str
    line: int
    kind: str
    message: str
    raw: str  # the record as text, for the rejects file

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"

    def to_json(self) -> str:
        """One line of the rejects file."""
        return json.dumps({"path": self.path, "line": self.line, "reason": self.message, "raw": self.raw},
                          ensure_ascii=False)


@dataclass
class Parsed:
    """The usable documents of a chunk: one text column per key, aligned by document."""

    columns: list[list[str]]
    lines: list[int]
    rejects: list[Reject] = field(default_factory=list)
    empty: int = 0


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


# What a record parser returns: (texts, None) for a usable document, (None, (kind, message)) for a
# bad one, (None, None) for a blank one.
ParseResult = tuple[Optional[Sequence[str]], Optional[tuple[str, str]]]

_DECODER = json.JSONDecoder()


def _is_blank(text: str) -> bool:
    return not text or text.isspace()


def _decode_utf8(raw: bytes) -> tuple[Optional[str], Optional[tuple[str, str]]]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, ("invalid UTF-8", f"invalid UTF-8 at byte {exc.start}")


def _parse_json_line(raw: bytes, keys: Sequence[str]) -> ParseResult:
    line, bad = _decode_utf8(raw)
    if line is None:
        return None, bad
    try:  # fast path: raw_decode skips json.loads' extra whitespace scans (about half its cost)
        obj, end = _DECODER.raw_decode(line)
        if end != len(line) and not line[end:].isspace():
            raise ValueError("trailing data")
    except ValueError:  # rare: leading whitespace, a blank line or a real error; json.loads decides
        if _is_blank(line):
            return None, None
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            return None, ("malformed JSON", f"malformed JSON: {exc.msg} at column {exc.colno}")
    if not isinstance(obj, dict):
        return None, ("not a JSON object", f"expected a JSON object, got {_JSON_TYPES.get(type(obj), 'a value')}")
    texts = []
    for key in keys:
        if key not in obj:
            return None, ("missing key", f"missing key {key!r} (keys: {', '.join(map(repr, list(obj)[:8]))})")
        value = obj[key]
        if not isinstance(value, str):
            return None, ("non-string value", f"{key!r} is {_JSON_TYPES.get(type(value), 'a value')}, not a string")
        texts.append(value)
    return texts, None


def _parse_txt_line(raw: bytes, keys: Sequence[str]) -> ParseResult:
    text, bad = _decode_utf8(raw.rstrip(b"\r\n"))
    return (None, bad) if text is None else ([text], None)


def _parse_parquet_row(row: tuple, keys: Sequence[str]) -> ParseResult:
    null = next((key for key, value in zip(keys, row) if value is None), None)
    return (row, None) if null is None else (None, ("non-string value", f"{null!r} is null, not a string"))


def _raw_record(record: Any, keys: Sequence[str]) -> str:
    """A bad record as text for the rejects file: the line itself, or the parquet row as JSON."""
    if isinstance(record, bytes):
        return record.decode("utf-8", errors="replace").rstrip("\r\n")
    return json.dumps(dict(zip(keys, record)), ensure_ascii=False)


_PARSERS = {"json": _parse_json_line, "txt": _parse_txt_line, "parquet": _parse_parquet_row}


def parse_chunk(chunk: Chunk, keys: Sequence[str]) -> Parsed:
    """Decode and validate a chunk; bad records become Rejects, blank documents are counted.

    A document is kept only if every key is non-blank, so the per-key datasets stay aligned."""
    out = Parsed([[] for _ in keys], [])
    parse = _PARSERS[chunk.fmt]
    records = zip(*(a.to_pylist() for a in chunk.records)) if chunk.fmt == "parquet" else chunk.records
    for line, record in enumerate(records, chunk.first_line):
        texts, bad = parse(record, keys)
        if bad is not None:
            out.rejects.append(Reject(chunk.path, line, bad[0], bad[1], _raw_record(record, keys)))
        elif texts is None or any(map(_is_blank, texts)):
            out.empty += 1
        else:
            for column, text in zip(out.columns, texts):
                column.append(text)
            out.lines.append(line)
    return out


def _encodable(text: str) -> bool:
    """False for strings holding lone surrogates (JSON "\\udc80" escapes), which no tokenizer accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --------------------------------------------------------------------------- tokenizing (in workers)

@dataclass
class Encoded:
    """A chunk's documents as flat token arrays (one per key) plus its bookkeeping."""

    path: str  # the input file they came from
    tokens: list[np.ndarray]
    lengths: list[np.ndarray]
    rejects: list[Reject]
    empty: int
    input_bytes: int

    @property
    def documents(self) -> int:
        return len(self.lengths[0])


class ChunkEncoder:
    """Parses and tokenizes chunks; one lives in each worker process."""

    def __init__(self, keys: Sequence[str], tokenizer: Tokenizer, append_eod: bool) -> None:
        self.keys = list(keys)
        self.tokenizer = tokenizer
        self.append_eod = append_eod
        self.dtype = best_dtype(tokenizer.vocab_size)

    def __call__(self, chunk: Chunk) -> Encoded:
        parsed = parse_chunk(chunk, self.keys)
        ids = self._encode(parsed, chunk.path)
        tokens, lengths = zip(*map(self._flatten, ids))
        parsed.rejects.sort(key=lambda r: r.line)
        return Encoded(chunk.path, list(tokens), list(lengths), parsed.rejects, parsed.empty, chunk.input_bytes)

    def _encode(self, parsed: Parsed, path: str) -> list[list[list[int]]]:
        """Batch-encode every column; documents a tokenizer refuses (lone surrogates) become rejects."""
        try:
            return [self.tokenizer.encode_batch(column) for column in parsed.columns]
        except Exception:
            bad = {i for column in parsed.columns for i, text in enumerate(column) if not _encodable(text)}
            if not bad:
                raise
        for i in sorted(bad):
            raw = json.dumps({key: column[i] for key, column in zip(self.keys, parsed.columns)})  # \u-escapes them
            parsed.rejects.append(Reject(path, parsed.lines[i], "invalid UTF-8",
                                         "invalid UTF-8: a lone surrogate escape", raw))
        good = [i for i in range(len(parsed.lines)) if i not in bad]
        parsed.columns = [[column[i] for i in good] for column in parsed.columns]
        parsed.lines = [parsed.lines[i] for i in good]
        return [self.tokenizer.encode_batch(column) for column in parsed.columns]

    def _flatten(self, docs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        if self.append_eod:
            for doc in docs:
                doc.append(self.tokenizer.eod_id)
        lengths = np.fromiter(map(len, docs), dtype=np.int32, count=len(docs))
        tokens = np.fromiter(chain.from_iterable(docs), dtype=self.dtype, count=int(lengths.sum()))
        return tokens, lengths


_ENCODER: Optional[ChunkEncoder] = None


def _init_encoder(keys: Sequence[str], tokenizer_args: tuple[str, Optional[str], Optional[str]], append_eod: bool) -> None:
    # One tokenizer thread per worker: --workers is the parallelism knob, and HF's own thread pool
    # would oversubscribe the cores (it is also unsafe after fork).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    global _ENCODER
    _ENCODER = ChunkEncoder(keys, build_tokenizer(*tokenizer_args), append_eod)


def _encode_chunk(chunk: Chunk) -> Encoded:
    assert _ENCODER is not None, "worker not initialised"
    return _ENCODER(chunk)


# --------------------------------------------------------------------------- worker processes

T = TypeVar("T")
R = TypeVar("R")

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def _stop_signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back until the block ends: a worker forked meanwhile inherits the hold,
    so the parent's handler (copied by fork) can never run in it."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _serve(fn: Callable[[T], R], initializer: Callable[..., None], initargs: tuple,
           tasks: Connection, results: Connection, parent_ends: list[Connection]) -> None:
    """A worker's life: items in, ``(result, None)`` or ``(None, exception)`` out, until the parent goes.

    Ctrl-C signals the whole process group: workers ignore SIGINT and leave stopping to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    for conn in parent_ends:  # so that the parent's end, even by kill -9, closes the pipes and ends this process
        conn.close()
    initializer(*initargs)
    with contextlib.suppress(EOFError, BrokenPipeError):  # the parent is gone
        while True:
            results.send(_call(fn, tasks.recv()))


def _call(fn: Callable[[T], R], item: T) -> tuple[Optional[R], Optional[Exception]]:
    try:
        return fn(item), None
    except Exception as exc:  # the parent raises it; the note keeps where it happened
        exc.add_note(f"in worker process {os.getpid()}:\n{traceback.format_exc()}")
        return None, exc


def _send_all(outbox: queue.SimpleQueue, tasks: Connection) -> None:
    """Send the items put in ``outbox`` until None comes, or the worker is gone."""
    with tasks, contextlib.suppress(BrokenPipeError):
        while (item := outbox.get()) is not None:
            tasks.send(item)


class _Worker:
    """A worker process, and a thread of this process that sends it items.

    Every worker has pipes of its own (multiprocessing.Pool's workers share queues, with locks a
    worker can die holding), so stopping workers at any moment cannot leave this process waiting.
    Items go out on a thread because a send waits until the worker takes the item, and the worker
    may first wait for this process to take a result."""

    def __init__(self, fn: Callable[[T], R], initializer: Callable[..., None], initargs: tuple,
                 others: Sequence["_Worker"]) -> None:
        task_end, self._tasks = multiprocessing.Pipe(duplex=False)
        self._results, result_end = multiprocessing.Pipe(duplex=False)
        parent_ends = [conn for worker in (*others, self) for conn in (worker._tasks, worker._results)]
        self._process = multiprocessing.Process(
            target=_serve, args=(fn, initializer, initargs, task_end, result_end, parent_ends), daemon=True)
        self._process.start()
        task_end.close()
        result_end.close()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=_send_all, args=(self._outbox, self._tasks), daemon=True)
        self._sender.start()

    def submit(self, item: Any) -> None:
        self._outbox.put(item)

    def result(self) -> Any:
        """The result of the oldest item submitted (its exception is raised here)."""
        try:
            value, exc = self._results.recv()
        except EOFError:
            raise self._died() from None
        if exc is not None:
            raise exc
        return value

    def _died(self) -> UserError:
        self._process.join(timeout=5)
        code = self._process.exitcode
        killed = code is not None and code < 0
        how = f"killed by signal {-code}: {signal.strsignal(-code)}" if killed else f"exit code {code}"
        return UserError(f"worker process {self._process.pid} stopped unexpectedly ({how}); "
                         f"if the machine ran out of memory, use fewer --workers")

    def stop(self) -> None:
        self._process.kill()
        self._process.join()
        self._outbox.put(None)  # ends the sender if it waits for an item; one in a send has its pipe broken
        self._sender.join()
        self._results.close()


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int,
                initializer: Callable[..., None], initargs: tuple) -> Iterator[R]:
    """``fn`` over ``items`` in ``workers`` processes, results in input order.

    Item i goes to worker i % workers, at most IN_FLIGHT_PER_WORKER per worker ahead of the
    result being collected, so memory stays bounded (``Pool.imap`` would read the whole input
    ahead). Closing the generator kills the workers. One worker runs in this process.
    """
    if workers == 1:
        initializer(*initargs)
        yield from map(fn, items)
        return
    pool: list[_Worker] = []
    try:
        with _stop_signals_held():  # a Ctrl-C meanwhile arrives once every worker is in the pool, to be stopped
            for _ in range(workers):
                pool.append(_Worker(fn, initializer, initargs, pool))
        pending: deque[_Worker] = deque()
        for i, item in enumerate(items):
            if len(pending) == IN_FLIGHT_PER_WORKER * workers:
                yield pending.popleft().result()
            pool[i % workers].submit(item)
            pending.append(pool[i % workers])
        while pending:
            yield pending.popleft().result()
    finally:
        for worker in pool:
            worker.stop()


# --------------------------------------------------------------------------- writing

def output_prefix(prefix: str, key: str) -> str:
    """Megatron-LM's naming: ``{prefix}_{key}_document``."""
    return f"{prefix}_{key}_document"


def rejects_file_path(prefix: str) -> str:
    """Where --skip-bad-docs writes the documents it skipped."""
    return f"{prefix}.rejects.jsonl"


@dataclass
class Summary:
    """What a run did; printed at the end and returned to callers (benchmarks, tests)."""

    outputs: list[str]
    rejects_path: str  # where skipped bad documents went (--skip-bad-docs)
    inputs: list[str] = field(default_factory=list)
    input_size: int = 0  # bytes of all inputs on disk
    documents: int = 0
    tokens: int = 0
    empty: int = 0
    rejected: Counter = field(default_factory=Counter)
    found: Counter = field(default_factory=Counter)  # documents written or rejected, by input file
    input_bytes: int = 0  # bytes of the inputs done so far
    bytes_written: int = 0
    elapsed: float = 0.0

    def add(self, enc: Encoded) -> None:
        self.documents += enc.documents
        self.tokens += sum(len(t) for t in enc.tokens)
        self.empty += enc.empty
        self.rejected.update(r.kind for r in enc.rejects)
        self.found[enc.path] += enc.documents + len(enc.rejects)
        self.input_bytes += enc.input_bytes

    def empty_inputs(self) -> list[str]:
        """Input files with no documents (nothing, or only blank lines and empty texts)."""
        return [path for path in self.inputs if not self.found[path]]

    def rates(self) -> str:
        el = max(self.elapsed, 1e-9)
        return f"{self.documents / el:,.0f} docs/s, {self.tokens / el:,.0f} tokens/s"

    def output_files(self) -> str:
        return ", ".join(p + ".bin/.idx" for p in self.outputs)

    def report(self) -> str:
        rejected = sum(self.rejected.values())
        reasons = "".join(f"\n    {kind}: {n:,}" for kind, n in sorted(self.rejected.items()))
        if rejected:
            reasons += f"\n    (written to {self.rejects_path})"
        return "\n".join([
            f"preprocessed {len(self.inputs)} file(s) → {self.output_files()}",
            f"  documents  {self.documents:,} written, {self.empty:,} empty skipped, {rejected:,} rejected{reasons}",
            f"  tokens     {self.tokens:,}",
            f"  written    {self.bytes_written / 1e6:,.2f} MB",
            f"  elapsed    {self.elapsed:,.1f} s ({self.rates()}, "
            f"{self.input_bytes / max(self.elapsed, 1e-9) / 1e6:,.1f} MB/s of input)",
        ])

    def expected_bytes(self, itemsize: int) -> Optional[int]:
        """The size of all outputs, extrapolated from the share of the inputs done (None before any)."""
        if not self.input_bytes:
            return None
        scale = self.input_size / self.input_bytes
        index = IndexedDatasetBuilder.index_bytes(round(self.documents * scale))
        return round(self.tokens * scale) * itemsize + len(self.outputs) * index

    def unfinished(self) -> str:
        """The line for an interrupted run: what it did not write, and how far it had got."""
        total = round(self.documents * self.input_size / max(self.input_bytes, 1))
        done = f"{self.documents:,} of ~{total:,} documents done" if self.documents else "no documents done yet"
        return f"interrupted: {self.output_files()} not written ({done}); nothing was left behind"


def _write(builders: list[IndexedDatasetBuilder], enc: Encoded) -> None:
    for builder, tokens, lengths in zip(builders, enc.tokens, enc.lengths):
        builder.add_documents(tokens, lengths)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _write_error(exc: OSError, needed_bytes: Optional[int]) -> str:
    """One line for a failed write, with the fix that fits it."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    fix = "free some space or choose another --output-prefix" if full else "choose a writable --output-prefix"
    return write_error(exc, fix, needed_bytes)


class WriteFailed(Exception):
    """Writing the outputs failed (a read-only place, a full disk); the temporaries are removed.

    preprocess() reports it only once the workers are gone too: they hold the files open (fork
    copied the descriptors), so until then removing them frees no space."""

    def __init__(self, error: OSError, needed_bytes: Optional[int]) -> None:
        super().__init__(error, needed_bytes)
        self.error, self.needed_bytes = error, needed_bytes


class Outputs:
    """What a run writes: one dataset per key, and a rejects file if it rejects documents.

    Everything stays under temporary names until :meth:`commit`; any failure removes it all, and
    a failed write raises WriteFailed."""

    def __init__(self, summary: Summary, dtype: np.dtype) -> None:
        self._summary = summary  # the run so far: it sizes the output, should the disk fill
        self._itemsize = dtype.itemsize
        self._rejects_tmp = summary.rejects_path + ".tmp"
        self._rejects: Optional[IO[str]] = None  # opened at the first rejected document
        self._builders: list[IndexedDatasetBuilder] = []
        with self._writing():
            for prefix in summary.outputs:
                self._builders.append(IndexedDatasetBuilder(prefix, dtype))

    def write(self, enc: Encoded) -> None:
        with self._writing():
            if enc.rejects:
                with naming(self._rejects_tmp):
                    self._rejects_file().writelines(r.to_json() + "\n" for r in enc.rejects)
            _write(self._builders, enc)

    def _rejects_file(self) -> IO[str]:
        if self._rejects is None:
            self._rejects = open(self._rejects_tmp, "w", encoding="utf-8")
        return self._rejects

    def commit(self) -> None:
        """Move everything into place. A rejects file stays only if this run rejected documents:
        one that an earlier run left on this prefix would pass for this run's."""
        with self._writing():
            if self._rejects is not None:
                with naming(self._rejects_tmp):
                    self._rejects.close()  # first: a full disk may show only when it flushes
            for builder in self._builders:
                builder.finalize()
            if self._rejects is None:
                _remove(self._summary.rejects_path)
            else:
                os.replace(self._rejects_tmp, self._summary.rejects_path)

    def abort(self) -> None:
        """Remove every temporary file; files of earlier runs stay as they were."""
        for builder in self._builders:
            builder.abort()
        if self._rejects is not None:
            with contextlib.suppress(OSError):  # flushing onto a full disk fails; the file goes all the same
                self._rejects.close()
            _remove(self._rejects_tmp)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """On any failure remove the temporaries; a failed write becomes WriteFailed."""
        try:
            yield
        except BaseException as exc:
            self.abort()
            if isinstance(exc, OSError):
                raise WriteFailed(exc, self._summary.expected_bytes(self._itemsize)) from exc
            raise

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException], tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


# --------------------------------------------------------------------------- command line

def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="files, globs or directories of .jsonl[.gz], .parquet, .txt[.gz] (one document per line)")
    p.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help="JSON fields / parquet columns to tokenize (default: text)")
    p.add_argument("--tokenizer-type", required=True, help=f"one of {', '.join(TOKENIZER_TYPES)}")
    p.add_argument("--tokenizer-model", default=None,
                   help="tokenizer.json (HuggingFaceTokenizer) or .model (SentencePieceTokenizer)")
    p.add_argument("--eod-token", default=None, help="end-of-document token, if the tokenizer's own is not found")
    p.add_argument("--append-eod", action="store_true", help="end every document with the eod token")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--skip-bad-docs", action="store_true",
                   help="skip malformed documents, count them, and write them to {prefix}.rejects.jsonl (default: stop)")
    p.add_argument("--log-interval", type=int, default=100, help="update progress every N documents (default 100)")
    args = p.parse_args(argv)
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if len(set(args.json_keys)) != len(args.json_keys):
        raise UserError(f"--json-keys repeats a key: {' '.join(args.json_keys)}")
    return args


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a run; raised once its temporary files are gone, with the line to show."""


class StopSignals:
    """Within: SIGINT (Ctrl-C) and SIGTERM (a batch system's kill) raise KeyboardInterrupt. The
    first one wins and later ones are ignored, so that the cleanup it starts runs to the end."""

    def __enter__(self) -> "StopSignals":
        self.received = signal.SIGINT  # a KeyboardInterrupt raised any other way counts as Ctrl-C
        self._previous = {s: signal.signal(s, self._stop) for s in STOP_SIGNALS}
        return self

    def _stop(self, signum: int, frame: object) -> None:
        self.received = signal.Signals(signum)
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process that the signal ended."""
        return 128 + self.received


def _input_paths(args: argparse.Namespace) -> list[Path]:
    """The input files, checked against the --json-keys they must hold."""
    paths = expand_inputs(args.input)
    if len(args.json_keys) > 1 and any(input_format(p) == "txt" for p in paths):
        raise UserError("a .txt input holds one document per line with no fields; give a single --json-keys key")
    return paths


def _no_documents(paths: Sequence[Path]) -> str:
    if len(paths) == 1:
        return f"{paths[0]} holds no documents; nothing was written"
    names = ", ".join(map(str, paths[:3])) + (", ..." if len(paths) > 3 else "")
    return f"none of the {len(paths)} inputs ({names}) holds a document; nothing was written"


def preprocess(args: argparse.Namespace) -> Summary:
    """Run the whole pipeline. Raises UserError (one line) for a user mistake, and for a bad
    document unless --skip-bad-docs; Interrupted for Ctrl-C, once nothing is left behind."""
    summary = Summary([output_prefix(args.output_prefix, key) for key in args.json_keys],
                      rejects_file_path(args.output_prefix))
    try:
        _tokenize(args, summary)
    except KeyboardInterrupt:
        raise Interrupted(summary.unfinished()) from None
    except WriteFailed as failed:
        raise UserError(_write_error(failed.error, failed.needed_bytes)) from failed.error
    return summary


def _tokenize(args: argparse.Namespace, summary: Summary) -> None:
    """Tokenize the inputs into the outputs, filling in ``summary``."""
    tokenizer_args = (args.tokenizer_type, args.tokenizer_model, args.eod_token)
    tokenizer = build_tokenizer(*tokenizer_args)  # fail fast here, not in a worker
    paths = _input_paths(args)
    summary.inputs = [str(p) for p in paths]
    summary.input_size = sum(p.stat().st_size for p in paths)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:  # on any error: workers stopped, temporaries removed
        outputs = stack.enter_context(Outputs(summary, best_dtype(tokenizer.vocab_size)))
        bar = stack.enter_context(tqdm(total=summary.input_size, unit="B", unit_scale=True,
                                       desc="tokenizing", dynamic_ncols=True))
        encoded = stack.enter_context(contextlib.closing(ordered_map(
            _encode_chunk, read_chunks(paths, args.json_keys), args.workers,
            _init_encoder, (args.json_keys, tokenizer_args, args.append_eod))))
        shown_docs, shown_bytes = 0, 0
        for enc in encoded:
            if enc.rejects and not args.skip_bad_docs:
                raise UserError(f"{enc.rejects[0]} (pass --skip-bad-docs to skip and count such documents)")
            outputs.write(enc)
            summary.add(enc)
            if summary.documents - shown_docs >= args.log_interval:
                summary.elapsed = time.perf_counter() - start
                bar.set_postfix_str(summary.rates(), refresh=False)
                bar.update(summary.input_bytes - shown_bytes)
                shown_docs, shown_bytes = summary.documents, summary.input_bytes
        bar.update(summary.input_bytes - shown_bytes)
        if len(summary.empty_inputs()) == len(paths):
            raise UserError(_no_documents(paths))
    summary.elapsed = time.perf_counter() - start
    summary.bytes_written = sum(os.path.getsize(f"{p}{ext}") for p in summary.outputs for ext in (".bin", ".idx"))


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> Summary:
    args = parse_args(argv)
    with StopSignals() as stop:
        try:
            summary = preprocess(args)
        except Interrupted as exc:
            print(exc, file=sys.stderr)
            sys.exit(stop.exit_code)
    for path in summary.empty_inputs():
        print(f"warning: {path} holds no documents", file=sys.stderr)
    print(summary.report())
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
