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

A rank that dies or stops in the middle of a save must not hang the others: while a rank takes
part in a save, a heartbeat thread (started at training's CPU priority) beats on the board, and
every wait on the board polls the beats of the ranks it waits for. A rank that writes slowly
keeps beating and is waited for, however long its file system takes; one that shows no sign of
life for ``parallel.collective_timeout_s`` (5 s once a stop signal came) is dead: the save fails
on every live rank with megamoe.parallel.stall.SilentRanks, which the loop reports like a
stalled collective (the check-in names the missing rank), and ``latest`` stays where it was.

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
import time
import traceback
import weakref
from dataclasses import dataclass, field
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
    optimizer_kind,
    optimizer_pieces,
    placements,
    rng_bytes,
    written_names,
)
from megamoe.checkpoint.store import CONFIG, FileEntry, Manifest, commit, prune, set_latest, write_bytes, write_shards
from megamoe.compat import default_store
from megamoe.config.choices import OnError
from megamoe.errors import SharedError, write_error
from megamoe.parallel.mesh import first_error
from megamoe.parallel.stall import SilentRanks

WRITER_NICENESS = 10  # added to a background writer's: below training, not starved by data-loader workers
BEAT_S = 1.0  # a rank in a save beats this often (more often under a short collective timeout)
POLL_S = 0.5  # the longest pause between two looks at the board (the first ones are shorter)
STOPPING_SILENCE_S = 5.0  # once a stop signal came, how long a silent rank is waited for
ABANDON_WAIT_S = 2.0  # how long an abandoned background save gets to remove its partial files
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
        "reset_attention_mask": state.cfg.data.reset_attention_mask,  # a resume may flip it: said in the log
        "optimizer_group_steps": [group.get("step") for group in state.optimizer.param_groups],  # apex keeps it here
        **optimizer_kind(state.cfg),  # what the optim-* state is: only the same optimizer resumes from it
    }
    return Snapshot(save_id, step, model, optim, rng_bytes(), checked, int(needed.item()), counters, layout_of(state),
                    OmegaConf.to_yaml(state.cfg))


def _refuse_diverged(state: TrainingState, step: int, tensor: str) -> None:
    log(state, f"not saving step {step}: {tensor} holds NaN or Inf values (a diverged state cannot be resumed)")


class SaveAbandoned(Exception):
    """The run gave a background save up (it is failing or was interrupted): stop waiting."""


class _Board:
    """One save's keys in the job's store: how ranks tell rank 0 their files, learn the outcome,
    and show they are alive while they take part (heartbeats)."""

    def __init__(self, snap: Snapshot, rank: int, silence_s: float, stopping: threading.Event,
                 abandoned: threading.Event) -> None:
        self.store = default_store()
        self.prefix = f"megamoe/checkpoint/{snap.save_id}"
        self.step, self.rank, self.silence_s = snap.step, rank, silence_s
        self.stopping, self.abandoned = stopping, abandoned

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def post(self, key: str, value: Any) -> None:
        self.store.set(self._key(key), json.dumps(value))

    def posted(self, key: str) -> bool:
        return self.store.check([self._key(key)])

    def beat(self) -> None:
        self.store.add(self._key(f"beat/{self.rank}"), 1)

    def read(self, key: str, sender: int) -> Any:
        """Rank ``sender``'s post under ``key``, waited for as long as ``sender`` shows signs of life."""
        return self.gather({sender: key})[sender]

    def gather(self, keys: dict[int, str]) -> dict[int, Any]:
        """Each sender's post (sender rank → key), waited for while the senders yet to post beat.

        Raises SilentRanks naming those silent for ``silence_s`` (STOPPING_SILENCE_S once a stop
        signal came), SaveAbandoned when the run gives the save up.
        """
        keys = {rank: self._key(key) for rank, key in keys.items()}
        started = time.monotonic()
        beats, changed = dict.fromkeys(keys, -1), dict.fromkeys(keys, started)
        pause, noted = 0.01, 1
        while pending := [rank for rank, key in keys.items() if not self.store.check([key])]:
            if self.abandoned.is_set():
                raise SaveAbandoned()
            now = time.monotonic()
            for rank in pending:
                count = self.store.add(self._key(f"beat/{rank}"), 0)
                if count != beats[rank]:
                    beats[rank], changed[rank] = count, now
            limit = min(self.silence_s, STOPPING_SILENCE_S) if self.stopping.is_set() else self.silence_s
            silent = [rank for rank in pending if now - changed[rank] > limit]
            if silent:
                raise SilentRanks(f"the checkpoint save of step {self.step} waited {limit:g} s for "
                                  f"{_ranks(silent)}, which showed no sign of life", limit)
            if now - started > noted * self.silence_s and self.rank == 0:  # alive, but slow: say so now and then
                noted += 1
                print(f"checkpoint: step {self.step}: still waiting after {now - started:.0f} s for {_ranks(pending)}, "
                      "alive and writing (a slow file system?)", flush=True)
            time.sleep(pause)
            pause = min(2 * pause, POLL_S)
        return {rank: json.loads(self.store.get(key)) for rank, key in keys.items()}


def _ranks(ranks: list[int], most: int = 8) -> str:
    """``rank 3`` or ``ranks 3, 5, …`` (the first ``most`` of many, and how many more)."""
    more = f" and {len(ranks) - most} more" if len(ranks) > most else ""
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks[:most]))}{more}"


_SAVE_THREADS: "weakref.WeakSet[threading.Event]" = weakref.WeakSet()  # set when each save thread ends


def save_threads_running() -> bool:
    """A save's background writer or heartbeat is still running (a writer the run gave up, one
    left behind when an exception ended the run, a heartbeat between its stop and its end). Such
    a thread may be in torch's, the store's or the OS's native code, where Python's interpreter
    shutdown cannot stop it cleanly: the process must then end without finalizing
    (``megamoe.cli.exit_with``)."""
    return any(not ended.is_set() for ended in _SAVE_THREADS)


class _Heartbeat:
    """Beats on a save's board until stopped, so that the ranks waiting for this one know it is
    alive however slowly its files are written. A thread of its own: a write blocked in the file
    system does not hold it up, while a stopped or dead process stops it."""

    def __init__(self, board: _Board) -> None:
        self._stopped, self._ended = threading.Event(), threading.Event()
        _SAVE_THREADS.add(self._ended)
        interval = min(BEAT_S, board.silence_s / 10)
        self._thread = threading.Thread(target=self._run, args=(board, interval), daemon=True,
                                        name=f"checkpoint-heartbeat-{board.step}")
        self._thread.start()

    def _run(self, board: _Board, interval: float) -> None:
        try:
            while True:
                board.beat()
                if self._stopped.wait(interval):
                    return
        except (RuntimeError, dist.DistError):
            return  # the store is gone: the waiting ranks see the silence, or lose the store themselves
        finally:
            self._ended.set()

    def stop(self) -> None:
        self._stopped.set()


def _error_of(exc: BaseException) -> dict[str, Any]:
    """A failed write, as JSON: the OS error's parts when it is one, else the text."""
    if isinstance(exc, OSError):
        return {"errno": exc.errno, "strerror": exc.strerror, "filename": exc.filename}
    return {"text": "".join(traceback.format_exception_only(exc)).strip()}


def write_snapshot(snap: Snapshot, root: Path, rank: int, world_size: int, keep: int, board: _Board) -> None:
    """Parts 2 and 3 of the module docstring for this rank; the outcome goes to the board.

    When another rank shows no sign of life, rank 0 posts that as the outcome (every rank raises
    it when it settles the save); a rank waiting for rank 0 that shows none raises SilentRanks
    itself. When the run gives the save up, rank 0 removes the partial files and the others stop
    waiting (SaveAbandoned).
    """
    tmp, final, stem = root / f"step_{snap.step}.tmp", root / f"step_{snap.step}", f"r{rank:05d}"
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            board.post("ready", None)
        except BaseException as exc:  # noqa: BLE001 - every rank must hear of it, whatever it is
            board.post("ready", _error_of(exc))
    files: dict[str, FileEntry] = {}
    error = board.read("ready", sender=0)
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
    try:
        parts = list(board.gather({r: f"rank{r}" for r in range(world_size)}).values())
    except SilentRanks as exc:
        parts = [{"error": {"silent": str(exc), "waited_s": exc.waited_s}}]
    except SaveAbandoned:
        parts = [{"error": {"text": "abandoned"}}]
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


@dataclass
class _Save:
    """One save in progress on this rank.

    ``written`` is set when its background writer ends. Not ``Thread.is_alive()``: after a join
    that Ctrl-C interrupted, Python 3.11 marks the thread stopped while it runs on.
    """

    snap: Snapshot
    board: _Board
    heartbeat: Optional[_Heartbeat]
    last: bool  # the run's last save: no later interval retries it
    written: threading.Event = field(default_factory=threading.Event)
    failure: Optional[Exception] = None  # what ended the background writer, if not the outcome


class CheckpointSaver:
    """Saves ``TrainingState``s — in the background with ``checkpoint.async`` — and reports how
    each save ended (``checkpoint.on_error``). Collective: every rank makes the same calls.

    ``stopping`` is set when the run has been told to stop (SIGTERM): from then on a save waits
    for a silent rank only STOPPING_SILENCE_S, so that the process ends before its launcher kills it.
    """

    def __init__(self, state: TrainingState, stopping: Optional[threading.Event] = None) -> None:
        self.state = state
        self.background: bool = state.cfg.checkpoint.asynchronous
        self.stopping = stopping or threading.Event()
        self._abandoned = threading.Event()
        self._pending: Optional[_Save] = None
        self._host_buffers: dict[str, Tensor] = {}  # reused by every background save (one at a time)

    def save(self, last: bool = False) -> Optional[Path]:
        """Save the state's current step. In place: returns the checkpoint when it is there (None
        if nothing was saved). In the background: returns None at once; :meth:`wait` tells.
        ``last``: no later save of the run would retry this one (said if it fails)."""
        self.wait()
        state = self.state
        snap = take_snapshot(state, next(_SAVE_IDS), self._host_buffers if self.background else None)
        if snap is None:
            return None
        grid = state.grid
        board = _Board(snap, grid.rank, state.cfg.parallel.collective_timeout_s, self.stopping, self._abandoned)
        save = _Save(snap, board, _Heartbeat(board) if grid.world_size > 1 else None, last)  # at training's priority
        if not self.background:
            try:
                self._write(save)
            finally:
                self._stop_beating(save)
            return self._settle(save)
        writer = threading.Thread(target=self._write_in_background, args=(save,), name=f"checkpoint-{snap.step}",
                                  daemon=True)
        _SAVE_THREADS.add(save.written)
        self._pending = save  # before start(), which waits for the thread to run: a Ctrl-C there abandons it
        writer.start()
        return None

    def _write(self, save: _Save) -> None:
        state = self.state
        write_snapshot(save.snap, checkpoint_root(state), state.grid.rank, state.grid.world_size,
                       state.cfg.checkpoint.keep, save.board)

    @staticmethod
    def _stop_beating(save: _Save) -> None:
        if save.heartbeat is not None:
            save.heartbeat.stop()

    def _write_in_background(self, save: _Save) -> None:
        """:meth:`_write` at a lower CPU priority, so that it takes the cycles training leaves free
        (on Linux niceness belongs to the thread, and the CRC thread it starts inherits it;
        elsewhere it would slow the whole process, so there it is left alone). What ends it other
        than an outcome on the board is kept for :meth:`wait` to raise."""
        if sys.platform == "linux":
            os.nice(WRITER_NICENESS)
        try:
            self._write(save)
        except Exception as exc:  # noqa: BLE001 - raised in the training thread by wait()
            save.failure = exc
        finally:
            self._stop_beating(save)
            save.written.set()

    @property
    def writing(self) -> bool:
        """A background save is still being written."""
        return self._pending is not None and not self._pending.written.is_set()

    def wait(self, last: bool = False) -> Optional[Path]:
        """Finish the save in progress, if any: the checkpoint it made, or None (``last``: as for
        :meth:`save`, when it turned out to be the run's last)."""
        if self._pending is None:
            return None
        save = self._pending
        save.last = save.last or last
        save.written.wait()  # Ctrl-C while it waits leaves the save pending, for abandon()
        self._pending = None
        return self._settle(save)

    def abandon(self) -> Optional[Path]:
        """Give the background save in progress up, without waiting for other ranks (the run is
        failing or was interrupted). Returns the checkpoint if it was complete all the same, else
        None, and ``latest`` stays where it was. Rank 0's writer removes the partial files when it
        notices; if it is still busy after ABANDON_WAIT_S (a loaded machine, a slow file system),
        rank 0 removes them under its feet, and its next write fails."""
        if self._pending is None:
            return None
        save, self._pending = self._pending, None
        self._abandoned.set()
        if not save.written.wait(ABANDON_WAIT_S):
            if self.state.grid.rank == 0:
                shutil.rmtree(checkpoint_root(self.state) / f"step_{save.snap.step}.tmp", ignore_errors=True)
            return None
        board = save.board
        if save.failure is not None or not board.posted("outcome"):
            return None
        outcome = board.read("outcome", sender=0)
        return Path(outcome["path"]) if outcome["error"] is None else None

    def _settle(self, save: _Save) -> Optional[Path]:
        """Every rank learns the outcome from rank 0's post; a failure is said once, then stops the
        run or lets it go on (checkpoint.on_error). A rank that showed no sign of life fails the
        save on every rank with SilentRanks (the loop names it as for a stalled collective)."""
        if save.failure is not None:
            raise save.failure
        state, snap = self.state, save.snap
        outcome = save.board.read("outcome", sender=0)
        if outcome["error"] is None:
            log(state, f"saved step {snap.step} to {outcome['path']}")
            return Path(outcome["path"])
        error = outcome["error"]
        if "silent" in error:
            raise SilentRanks(error["silent"], error["waited_s"])
        if "nonfinite" in error:
            _refuse_diverged(state, snap.step, error["nonfinite"])
            return None
        if "text" in error:
            reason = error["text"]
        else:
            reason = write_error(OSError(error["errno"], error["strerror"], error["filename"]),
                                 "free space or choose another run.dir", snap.needed_bytes)
        message = f"checkpoint: cannot save step {snap.step}: {reason}"
        if state.cfg.checkpoint.on_error == OnError.STOP:
            raise SharedError(f"{message}; the run stopped (checkpoint.on_error=stop), earlier checkpoints are intact")
        then = ("it was the run's last save, nothing retries it" if save.last
                else "training goes on (checkpoint.on_error=continue), the next interval tries again")
        log(state, f"ERROR: cannot save step {snap.step}: {reason}; {then}; earlier checkpoints are intact")
        return None


def save_checkpoint(state: TrainingState) -> Optional[Path]:
    """Save ``state`` in place (collective); the checkpoint, or None when none was made."""
    saver = CheckpointSaver(state)
    saver.background = False
    return saver.save()
