"""Saving a checkpoint: a snapshot of each rank's share, written in place or in the background.

A save has three parts:

1. **Snapshot** (collective, at the step): every rank takes the tensors it writes — the
   replicas of a stage share its dense tensors out, the replicas of an expert its banks
   (megamoe.checkpoint.state.written_names), so the bytes a rank writes fall with dp — and the
   step's counters and RNG states. In place, the ranks first agree that every share is finite
   (a diverged state is not saved). With ``checkpoint.async`` the tensors are copied to host
   memory (pinned on CUDA) so training can change the originals at once — that copy is all a
   background save holds training up for; the host buffers are kept for the next save
   (allocating and faulting in a few GB of fresh pages each time would cost as much as the copy).
2. **Write** (each rank, on a background thread when async): its shards into ``step_N.tmp/``;
   a background writer first checks its copy is finite, and runs at a lower CPU priority so
   that on a busy host it takes the cycles training leaves.
3. **Commit** (rank 0): once every rank has reported its files, config and manifest, the
   rename, ``latest``, pruning. ``latest`` moves only after every file is written and fsynced.

Parts 2 and 3 talk through the job's key-value store, not collectives, so a background save
never competes with training's collectives. A save waits for the previous one first; a crash in
the middle leaves ``step_N.tmp/`` (removed at the next start) and the previous ``latest``.

A failed save (full disk, read-only directory) removes its partial files; with
``checkpoint.on_error=continue`` (the default) the run says so and goes on, the next interval
tries again; with ``stop`` it stops with one line. Either way earlier checkpoints are intact.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import sys
import threading
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import Tensor

from megamoe.checkpoint.state import (
    TrainingState,
    checkpoint_root,
    first_nonfinite,
    layout_of,
    log,
    model_pieces,
    optimizer_pieces,
    placements,
    rng_bytes,
    written_names,
)
from megamoe.checkpoint.store import CONFIG, FileEntry, Manifest, commit, prune, set_latest, write_bytes, write_shards
from megamoe.compat import default_store
from megamoe.errors import SharedError, write_error
from megamoe.parallel.mesh import first_error

WRITER_NICENESS = 10  # added to a background writer's: below training, not starved by data-loader workers
WRITE_TIMEOUT = timedelta(hours=2)  # how long rank 0 waits for the other ranks' files
_SAVE_IDS = itertools.count()  # saves are collective, so every rank numbers them alike


@dataclass
class Snapshot:
    """One rank's part of one checkpoint, as of its step."""

    save_id: int  # the same on every rank: names this save's keys in the store
    step: int
    model: list[tuple[str, Tensor]]
    optim: list[tuple[str, Tensor]]
    rng: bytes
    checked: bool  # found finite before the snapshot (in place); else the writer checks its copy
    needed_bytes: int  # the whole checkpoint's, for a full disk's message
    manifest_state: dict[str, Any]  # step, data position, counters (rank 0 writes them)
    layout: dict[str, int]
    config_yaml: str


def _host_copy(key: str, tensor: Tensor, buffers: dict[str, Tensor]) -> Tensor:
    """A copy in host memory (pinned on CUDA, so the copy runs without stalling the stream), into
    the buffer ``buffers`` holds for ``key`` from an earlier save when its shape still fits."""
    buffer = buffers.get(key)
    if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
        buffer = buffers[key] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
    return buffer.copy_(tensor, non_blocking=tensor.is_cuda)


def take_snapshot(state: TrainingState, save_id: int, host_buffers: Optional[dict[str, Tensor]]) -> Optional[Snapshot]:
    """Collective. With ``host_buffers`` the tensors are copied there (a background save), else
    referenced after checking them: None when some rank's share holds NaN or Inf."""
    grid, step = state.grid, state.step
    places = placements(state)
    mine = written_names(places, grid)
    model, optim = model_pieces(places, mine), optimizer_pieces(state.optimizer, places, mine)
    checked = host_buffers is None
    if checked:
        bad = first_error(grid, first_nonfinite(model + optim))
        if bad is not None:
            _refuse_diverged(state, step, bad)
            return None
    needed = torch.tensor([float(sum(t.numel() * t.element_size() for _, t in model + optim))], dtype=torch.float64)
    if grid.world_size > 1:
        dist.all_reduce(needed)
    if host_buffers is not None:
        model, optim = ([(name, _host_copy(f"{kind}/{name}", t, host_buffers)) for name, t in pieces]
                        for kind, pieces in (("model", model), ("optim", optim)))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    counters = {
        "step": step,  # also the position in the lr schedule
        "loader": state.data.state_dict(),  # consumed samples
        "global_batch": state.cfg.train.global_batch,
        "data_stream": state.data_stream,  # a resume that changes it would read other samples
        "optimizer_group_steps": [group.get("step") for group in state.optimizer.param_groups],  # apex keeps it here
    }
    return Snapshot(save_id, step, model, optim, rng_bytes(), checked, int(needed.item()), counters, layout_of(state),
                    OmegaConf.to_yaml(state.cfg))


def _refuse_diverged(state: TrainingState, step: int, tensor: str) -> None:
    log(state, f"not saving step {step}: {tensor} holds NaN or Inf values (a diverged state cannot be resumed)")


class _Board:
    """This save's keys in the job's store: how ranks tell rank 0 their files and learn the outcome."""

    def __init__(self, save_id: int) -> None:
        self.store = default_store()
        self.prefix = f"megamoe/checkpoint/{save_id}"

    def post(self, key: str, value: Any) -> None:
        self.store.set(f"{self.prefix}/{key}", json.dumps(value))

    def read(self, key: str) -> Any:
        self.store.wait([f"{self.prefix}/{key}"], WRITE_TIMEOUT)
        return json.loads(self.store.get(f"{self.prefix}/{key}"))


def _error_of(exc: BaseException) -> dict[str, Any]:
    """A failed write, as JSON: the OS error's parts when it is one, else the text."""
    if isinstance(exc, OSError):
        return {"errno": exc.errno, "strerror": exc.strerror, "filename": exc.filename}
    return {"text": "".join(traceback.format_exception_only(exc)).strip()}


def write_snapshot(snap: Snapshot, root: Path, rank: int, world_size: int, keep: int) -> None:
    """Parts 2 and 3 of the module docstring for this rank; the outcome goes to the store."""
    board = _Board(snap.save_id)
    tmp, final, stem = root / f"step_{snap.step}.tmp", root / f"step_{snap.step}", f"r{rank:05d}"
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            board.post("ready", None)
        except BaseException as exc:  # noqa: BLE001 - every rank must hear of it, whatever it is
            board.post("ready", _error_of(exc))
    files: dict[str, FileEntry] = {}
    error = board.read("ready")
    bad = None if error is not None or snap.checked else first_nonfinite(snap.model + snap.optim)
    if bad is not None:
        error = {"nonfinite": bad}
    if error is None:
        try:
            files.update(write_shards(tmp, f"model-{stem}", iter(snap.model), "model"))
            files.update(write_shards(tmp, f"optim-{stem}", iter(snap.optim), "optim"))
            files[f"rng-{stem}.pt"] = write_bytes(tmp / f"rng-{stem}.pt", snap.rng, "rng")
        except BaseException as exc:  # noqa: BLE001
            error = _error_of(exc)
    board.post(f"rank{rank}", {"files": {n: dataclasses.asdict(e) for n, e in files.items()}, "error": error})
    if rank != 0:
        return
    parts = [board.read(f"rank{r}") for r in range(world_size)]
    error = next((part["error"] for part in parts if part["error"] is not None), None)
    if error is None:
        try:
            all_files = {n: FileEntry(**e) for part in parts for n, e in part["files"].items()}
            all_files[CONFIG] = write_bytes(tmp / CONFIG, snap.config_yaml.encode(), "config")
            Manifest(snap.step, True, all_files, snap.manifest_state, snap.layout).write(tmp)
            commit(tmp, final)
            set_latest(root, final)
            prune(root, final, keep)
        except BaseException as exc:  # noqa: BLE001
            error = _error_of(exc)
    if error is not None:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed save leaves nothing to fill the disk
    board.post("outcome", {"error": error, "path": str(final)})


def _write_in_background(*args: Any) -> None:
    """:func:`write_snapshot` at a lower CPU priority, so that it takes the cycles training
    leaves free (on Linux niceness belongs to the thread, and the CRC thread it starts inherits it;
    elsewhere it would slow the whole process, so there it is left alone)."""
    if sys.platform == "linux":
        os.nice(WRITER_NICENESS)
    write_snapshot(*args)


class CheckpointSaver:
    """Saves ``TrainingState``s — in the background with ``checkpoint.async`` — and reports how
    each save ended (``checkpoint.on_error``). Collective: every rank makes the same calls."""

    def __init__(self, state: TrainingState) -> None:
        self.state = state
        self.background: bool = state.cfg.checkpoint.asynchronous
        self._pending: Optional[tuple[Snapshot, threading.Thread]] = None
        self._host_buffers: dict[str, Tensor] = {}  # reused by every background save (one at a time)

    def save(self) -> Optional[Path]:
        """Save the state's current step. In place: returns the checkpoint when it is there (None
        if nothing was saved). In the background: returns None at once; :meth:`wait` tells."""
        self.wait()
        state = self.state
        snap = take_snapshot(state, next(_SAVE_IDS), self._host_buffers if self.background else None)
        if snap is None:
            return None
        args = (snap, checkpoint_root(state), state.grid.rank, state.grid.world_size, state.cfg.checkpoint.keep)
        if not self.background:
            write_snapshot(*args)
            return self._settle(snap)
        thread = threading.Thread(target=_write_in_background, args=args, name=f"checkpoint-{snap.step}", daemon=True)
        thread.start()
        self._pending = (snap, thread)
        return None

    @property
    def writing(self) -> bool:
        """A background save is still being written."""
        return self._pending is not None and self._pending[1].is_alive()

    def wait(self) -> Optional[Path]:
        """Finish the save in progress, if any: the checkpoint it made, or None."""
        if self._pending is None:
            return None
        snap, thread = self._pending
        self._pending = None
        thread.join()
        return self._settle(snap)

    def _settle(self, snap: Snapshot) -> Optional[Path]:
        """Every rank learns the outcome from rank 0's post; a failure is said once, then stops the
        run or lets it go on (checkpoint.on_error)."""
        state = self.state
        outcome = _Board(snap.save_id).read("outcome")
        if outcome["error"] is None:
            log(state, f"saved step {snap.step} to {outcome['path']}")
            return Path(outcome["path"])
        error = outcome["error"]
        if "nonfinite" in error:
            _refuse_diverged(state, snap.step, error["nonfinite"])
            return None
        if "text" in error:
            reason = error["text"]
        else:
            reason = write_error(OSError(error["errno"], error["strerror"], error["filename"]),
                                 "free space or choose another run.dir", snap.needed_bytes)
        message = f"checkpoint: cannot save step {snap.step}: {reason}"
        if state.cfg.checkpoint.on_error == "stop":
            raise SharedError(f"{message}; the run stopped (checkpoint.on_error=stop), earlier checkpoints are intact")
        log(state, f"ERROR: cannot save step {snap.step}: {reason}; training goes on (checkpoint.on_error=continue), "
                   "the next interval tries again; earlier checkpoints are intact")
        return None


def save_checkpoint(state: TrainingState) -> Optional[Path]:
    """Save ``state`` in place (collective); the checkpoint, or None when none was made."""
    saver = CheckpointSaver(state)
    saver.background = False
    return saver.save()
