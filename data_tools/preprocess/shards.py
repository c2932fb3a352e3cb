"""Preprocessing split into shards (one per SLURM array task), and their merge.

``--shard-index I --num-shards N`` tokenizes share I of the inputs (:mod:`.plan`) into
``{prefix}.shards/shard-0000I-of-0000N_{key}_document.bin/.idx`` (and ``.rejects.jsonl``), then
writes ``shard-0000I-of-0000N.done.json``: what the shard was made from (tokenizer, flags,
inputs, its share), its counts, and the size and sha256 of each of its files. The marker is
written last, so it alone says a shard is complete: a run killed at any point leaves none, and
what it did leave is overwritten by the rerun. A rerun of a complete shard checks it against
its marker and does nothing.

``--merge-shards`` concatenates the N shards, in index order, into ``{prefix}_{key}_document``:
byte for byte what one run over the same inputs writes. It refuses, in one line naming them,
while shards are missing, were made with another tokenizer, other flags or other inputs, or
no longer match their markers.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from tqdm import tqdm

from data_tools.merge_datasets import merge
from data_tools.preprocess.pipeline import Interrupted, input_paths, no_documents, tokenize_pieces
from data_tools.preprocess.plan import plan_shares
from data_tools.preprocess.readers import Piece
from data_tools.preprocess.summary import Summary
from data_tools.preprocess.writer import WriteFailed, output_prefix, rejects_file_path, remove_if_present
from megamoe.errors import UserError, naming

MARKER_FORMAT = "megamoe preprocess shard, version 1"
FLAGS = {"json_keys": "--json-keys", "append_eod": "--append-eod", "skip_bad_docs": "--skip-bad-docs"}


@dataclass(frozen=True)
class Shard:
    """Where shard ``index`` of ``count`` of the run writing ``{output_prefix}_*`` keeps its files."""

    output_prefix: str
    index: int
    count: int

    @property
    def directory(self) -> str:
        return f"{self.output_prefix}.shards"

    @property
    def prefix(self) -> str:
        return os.path.join(self.directory, f"shard-{self.index:05d}-of-{self.count:05d}")

    @property
    def marker(self) -> str:
        return f"{self.prefix}.done.json"

    def dataset(self, key: str) -> str:
        return output_prefix(self.prefix, key)

    def __str__(self) -> str:
        return f"shard {self.index} of {self.count}"


def recipe(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that decides a shard's bytes besides its share: the tokenizer (by content) and flags."""
    model = args.tokenizer_model
    return {"tokenizer": {"type": args.tokenizer_type, "model": model,
                          "model_sha256": sha256_of(model) if model else None, "eod_token": args.eod_token},
            "flags": {name: getattr(args, name) for name in FLAGS}}


def inputs_digest(paths: Sequence[Path]) -> str:
    """Names, sizes and modification times of the inputs, in order: the plan depends on nothing else."""
    stats = [(os.path.abspath(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def sha256_of(path: str, stop: Optional[threading.Event] = None) -> str:
    """The file's sha256, as ``sha256sum`` prints it ("" if ``stop`` is set before the end)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            if stop is not None and stop.is_set():
                return ""
            digest.update(block)
    return digest.hexdigest()


def _files_of(shard: Shard, summary: Summary) -> dict[str, dict[str, Any]]:
    """Size and sha256 of each file a shard run wrote, by name within the shard directory."""
    paths = [f"{p}{ext}" for p in summary.outputs for ext in (".bin", ".idx")]
    paths += [summary.rejects_path] if os.path.exists(summary.rejects_path) else []
    return {os.path.basename(p): {"bytes": os.path.getsize(p), "sha256": sha256_of(p)} for p in paths}


def _read_marker(shard: Shard) -> Optional[dict[str, Any]]:
    """A shard's done marker, or None if there is none (or it is not one of ours)."""
    try:
        with open(shard.marker, encoding="utf-8") as f:
            marker = json.load(f)
    except (FileNotFoundError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT else None


def _write_marker(shard: Shard, marker: dict[str, Any]) -> None:
    """Write the marker under a temporary name, flush it to disk, then rename it into place."""
    tmp = shard.marker + ".tmp"
    try:
        with naming(tmp), open(tmp, "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, shard.marker)
    except BaseException:
        remove_if_present(tmp)
        raise


@contextlib.contextmanager
def _writing() -> Iterator[None]:
    """A failed write outside the tokenizing (the shard directory, its lock, marker, the merge)
    is one line, as one inside it is."""
    try:
        yield
    except OSError as exc:
        raise UserError(WriteFailed(exc, None).message()) from exc


def _difference(marker: Optional[dict[str, Any]], expected: dict[str, Any]) -> Optional[str]:
    """Why a marker does not describe the shard that ``expected`` describes, or None if it does.
    The reasons are the phrases the merge lists shards under."""
    if marker is None:
        return "missing"
    if marker["recipe"]["tokenizer"]["model_sha256"] != expected["recipe"]["tokenizer"]["model_sha256"] or (
            marker["recipe"]["tokenizer"]["type"] != expected["recipe"]["tokenizer"]["type"]):
        return "made with another tokenizer"
    flags = [FLAGS[name] for name, value in expected["recipe"]["flags"].items()
             if marker["recipe"]["flags"].get(name) != value]
    if marker["recipe"]["tokenizer"]["eod_token"] != expected["recipe"]["tokenizer"]["eod_token"]:
        flags.append("--eod-token")
    if flags:
        return f"made with other flags ({', '.join(flags)})"
    if marker["inputs_sha256"] != expected["inputs_sha256"]:
        return "made from other inputs (files added, removed or changed since)"
    return None


def _damage(shard: Shard, marker: dict[str, Any], checksums: bool,
            stop: Optional[threading.Event] = None) -> Optional[str]:
    """The first file of a complete shard that no longer matches its marker (size, and sha256
    with ``checksums``), or None."""
    for name, record in marker["files"].items():
        path = os.path.join(shard.directory, name)
        if not os.path.isfile(path) or os.path.getsize(path) != record["bytes"]:
            return name
        if checksums and sha256_of(path, stop) != record["sha256"]:
            return name
    return None


@dataclass
class ShardRun:
    """What ``--shard-index`` did: ``summary`` is None when the shard was already complete."""

    shard: Shard
    marker: dict[str, Any]
    summary: Optional[Summary]
    redone_because: Optional[str] = None  # why an existing marker did not count

    def report(self) -> str:
        counts = f"{self.marker['documents']:,} documents, {self.marker['tokens']:,} tokens"
        if self.summary is None:
            return f"{self.shard} is already complete ({self.shard.marker}: {counts}); nothing to do"
        redone = f" (redone: the earlier one was {self.redone_because})" if self.redone_because else ""
        return f"{self.summary.report()}\n  done       {self.shard} complete{redone}: {self.shard.marker}"


def run_shard(args: argparse.Namespace) -> ShardRun:
    """Tokenize this task's share into its shard and write the done marker; a no-op for a complete shard."""
    shard = Shard(args.output_prefix, args.shard_index, args.num_shards)
    paths = input_paths(args)
    share = plan_shares(paths, args.num_shards)[args.shard_index]
    expected = {"format": MARKER_FORMAT, "shard": shard.index, "num_shards": shard.count, "recipe": recipe(args),
                "inputs_sha256": inputs_digest(paths), "share": [_piece_record(p) for p in share]}
    _refuse_other_splits(shard)
    with _writing(), naming(shard.directory):
        os.makedirs(shard.directory, exist_ok=True)
    with _exclusive(shard):
        marker = _read_marker(shard)
        reason = _difference(marker, expected) if marker is not None else None
        if marker is not None and reason is None:
            damaged = _damage(shard, marker, checksums=True)
            if damaged is None:
                return ShardRun(shard, marker, None)
            reason = f"done, but {damaged} no longer matches its marker"
        with _writing():
            remove_if_present(shard.marker)  # before any of its files is replaced
        summary = tokenize_pieces(args, share, shard.prefix, require_documents=False)
        marker = {**expected, "documents": summary.documents, "tokens": summary.tokens, "empty": summary.empty,
                  "rejected": dict(summary.rejected), "files": _files_of(shard, summary)}
        with _writing():
            _write_marker(shard, marker)
    return ShardRun(shard, marker, summary, reason)


def _piece_record(piece: Piece) -> dict[str, Any]:
    return {"path": str(piece.path), "start": piece.start, "end": piece.end}


def _refuse_other_splits(shard: Shard) -> None:
    """A shard directory holds one split: a task that got another --num-shards (say, from a
    partial array resubmitted without it) stops before it tokenizes a share of the wrong size."""
    pattern = re.compile(r"shard-\d+-of-(\d+)\.done\.json")
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(shard.directory)):
            match = pattern.fullmatch(name)
            if match and int(match[1]) != shard.count:
                raise UserError(f"{shard.directory} holds shards of a {int(match[1])}-shard split ({name}); "
                                f"pass --num-shards {int(match[1])} to redo one of them, or move "
                                f"{shard.directory} away to start a {shard.count}-shard split")


@contextlib.contextmanager
def _exclusive(shard: Shard) -> Iterator[None]:
    """Hold the shard's lock: two tasks writing one shard (a resubmission while the first still
    runs) would interleave their bytes. The lock ends with the process, however it ends."""
    with _writing(), naming(shard.prefix + ".lock"), open(shard.prefix + ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                yield  # a filesystem without locks: go on unguarded
                return
            raise UserError(f"{shard} is being written by another process right now ({lock.name} is locked); "
                            f"wait for it, or stop it first") from None
        yield


# --------------------------------------------------------------------------- merging


@dataclass
class Merged:
    """What ``--merge-shards`` wrote."""

    outputs: list[str]
    shards: int
    documents: int
    tokens: int
    rejected: int
    rejects_path: Optional[str]
    bytes_written: int
    elapsed: float

    def report(self) -> str:
        rejects = f", {self.rejected:,} rejected (in {self.rejects_path})" if self.rejected else ""
        return (f"merged {self.shards} shards → {', '.join(p + '.bin/.idx' for p in self.outputs)}: "
                f"{self.documents:,} documents, {self.tokens:,} tokens{rejects}, "
                f"{self.bytes_written / 1e6:,.2f} MB in {self.elapsed:.1f} s")


def merge_shards(args: argparse.Namespace) -> Merged:
    """Check that every shard is complete and made like this run would make it, then concatenate them."""
    start = time.perf_counter()
    paths = input_paths(args)
    shards = [Shard(args.output_prefix, i, args.num_shards) for i in range(args.num_shards)]
    markers = _checked_markers(args, paths, shards)
    if not sum(marker["documents"] for marker in markers):
        raise UserError(no_documents([Piece(p) for p in paths]))
    outputs = [output_prefix(args.output_prefix, key) for key in args.json_keys]
    try:
        with _writing():
            for key, out in zip(args.json_keys, outputs):
                merge([shard.dataset(key) for shard in shards], out)
            rejects = _merge_rejects(shards, rejects_file_path(args.output_prefix))
    except KeyboardInterrupt:
        files = ", ".join(p + ".bin/.idx" for p in outputs)
        raise Interrupted(f"interrupted: the merge into {files} stopped; what it had not finished was removed, "
                          f"run it again") from None
    return Merged(outputs, len(shards), sum(m["documents"] for m in markers), sum(m["tokens"] for m in markers),
                  sum(sum(m["rejected"].values()) for m in markers), rejects,
                  sum(os.path.getsize(p + ext) for p in outputs for ext in (".bin", ".idx")),
                  time.perf_counter() - start)


def _checked_markers(args: argparse.Namespace, paths: Sequence[Path], shards: Sequence[Shard]) -> list[dict]:
    """Every shard's marker, once all are present, made as ``args`` would make them, and their files
    intact (sizes and sha256, read on ``--workers`` threads); else one UserError naming the others."""
    expected = {"recipe": recipe(args), "inputs_sha256": inputs_digest(paths)}
    markers = [_read_marker(shard) for shard in shards]
    problems: dict[str, list[int]] = {}
    for shard, marker in zip(shards, markers):
        reason = _difference(marker, expected)
        if reason is None and _damage(shard, marker, checksums=False):
            reason = "changed since they were done"
        if reason is not None:
            problems.setdefault(reason, []).append(shard.index)
    if not problems:
        for shard, damaged in zip(shards, _verify_checksums(list(zip(shards, markers)), args.workers)):
            if damaged:
                problems.setdefault("changed since they were done", []).append(shard.index)
    if problems:
        raise UserError(_refusal(shards[0], problems))
    return markers


def _verify_checksums(complete: list[tuple[Shard, dict]], workers: int) -> list[Optional[str]]:
    """For each shard, the first file whose sha256 differs from its marker's (None: all match)."""
    total = sum(record["bytes"] for _, marker in complete for record in marker["files"].values())
    stop = threading.Event()  # set on Ctrl-C / SIGTERM, so that the threads end at their next block
    with tqdm(total=total, unit="B", unit_scale=True, desc="checking shards", dynamic_ncols=True) as bar:
        def check(item: tuple[Shard, dict]) -> Optional[str]:
            damaged = _damage(*item, checksums=True, stop=stop)
            bar.update(sum(record["bytes"] for record in item[1]["files"].values()))
            return damaged

        with ThreadPoolExecutor(max_workers=workers) as pool:  # hashlib lets go of the GIL while it hashes
            try:
                return list(pool.map(check, complete))
            finally:
                stop.set()


def _refusal(shard: Shard, problems: dict[str, list[int]]) -> str:
    """The one line that says which shards stop the merge and how to redo them."""
    reasons = "; ".join(f"{reason}: {index_ranges(indices)}" for reason, indices in problems.items())
    redo = index_ranges(sorted(i for indices in problems.values() for i in indices))
    return (f"cannot merge {shard.directory}, shards of a {shard.count}-shard split: {reasons}; rerun those "
            f"shards (--shard-index, or sbatch --array={redo} launch/slurm/preprocess.sbatch "
            f"--num-shards {shard.count} <the same arguments>), then merge")


def index_ranges(indices: Sequence[int]) -> str:
    """0,1,2,5,7,8 → "0-2,5,7-8": SLURM's --array syntax."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _merge_rejects(shards: Sequence[Shard], path: str) -> Optional[str]:
    """Concatenate the shards' rejects files, as one run writes them; None (and no file) if there are none."""
    parts = [rejects_file_path(shard.prefix) for shard in shards if os.path.exists(rejects_file_path(shard.prefix))]
    if not parts:
        remove_if_present(path)  # an earlier run's would pass for this one's
        return None
    tmp = path + ".tmp"
    try:
        with naming(tmp), open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, length=16 << 20)
        os.replace(tmp, path)
    except BaseException:
        remove_if_present(tmp)
        raise
    return path
