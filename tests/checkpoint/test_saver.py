"""Faults in the middle of a checkpoint save, injected for real: a rank stopped (SIGSTOP) or killed
(kill -9) while its files are being written, a file system that writes slowly, and SIGTERM at the
moments of a save that hurt — during the write, during the commit, during the background save's
snapshot.

A dead rank must not hang the job: the save fails on every live rank within
parallel.collective_timeout_s plus the stall grace period, the rank is named as for a stalled
collective, the run exits non-zero (so torchrun --max-restarts restarts it) and ``latest`` stays
on the previous checkpoint. A slow rank that is alive is waited for. SIGTERM ends the process in
time, after the save when every rank is healthy.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

import megamoe.checkpoint.saver as saver_module
from megamoe.checkpoint.saver import CheckpointSaver
from megamoe.config import compose
from megamoe.parallel.mesh import init_grid
from megamoe.parallel.stall import FAILURE_GRACE_S
from megamoe.train.loop import run
from megamoe.train.step import train_step
from megamoe.train.trainer import build_trainer
from tests.checkpoint.helpers import wait_until
from tests.dist.launcher import free_port, run_distributed
from tests.pretrain import TINY, catch_a_save, logged_steps, signal_all, start_pretrain, start_ranks, worker_pids

TIMEOUT_S = 5  # parallel.collective_timeout_s of the runs here
GRACE_S = FAILURE_GRACE_S  # the stall check-in's grace period (5 s at least)
SLACK_S = 15  # process exit, a loaded test machine
SAVING = ["parallel.pp=2", "train.steps=12", "checkpoint.interval=1", f"parallel.collective_timeout_s={TIMEOUT_S}"]
NAMED = (r"error: rank 1 \(host \S+, pid {pid}\) did not arrive within {within} \(rank 0 in {operation} of step \d+\); "
         r"it does not respond: check that process and its host \(stopped, hung or too slow\)")


def rank1_still_writing(tmp: Path) -> bool:
    """Rank 1 has not told rank 0 its files yet: its RNG states are the last file it writes."""
    return not (tmp / "rng-r00001.pt").exists()


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts: its parent has not reaped it yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def assert_previous_checkpoint_stays_latest(checkpoints: Path, tmp: Path) -> None:
    step = int(tmp.name.removeprefix("step_").removesuffix(".tmp"))
    assert (checkpoints / "latest").read_text() == f"step_{step - 1}\n"
    assert not (checkpoints / f"step_{step}").exists()


@pytest.mark.parametrize("background", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_rank_stopped_during_a_save_is_named_and_the_run_fails(tmp_path: Path, background: bool) -> None:
    """torchrun, pp 2, rank 1 SIGSTOPped before it has written its files. In place, rank 0 waits
    for them on the store and gives up when rank 1 shows no sign of life; in the background,
    training goes on and rank 0 meets the silence in the next collective. Either way the line
    names rank 1 and the job fails in time for --max-restarts."""
    run = start_pretrain(tmp_path, *SAVING, f"checkpoint.async={background}", nproc=2)
    pids = lambda: [run.pid, *worker_pids(run.pid).values()]  # noqa: E731
    try:
        tmp = catch_a_save(tmp_path / "checkpoints", pids, rank1_still_writing)
        workers = worker_pids(run.pid)
        signal_all([pid for pid in pids() if pid != workers[1]], signal.SIGCONT)
        took = wait_until(lambda: gone(workers[0]), TIMEOUT_S + GRACE_S + SLACK_S)
    finally:
        signal_all(list(worker_pids(run.pid).values()), signal.SIGKILL)  # as torchrun does after its 30 s
    out, _ = run.communicate(timeout=120)
    assert run.returncode != 0
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    operation = r"[\w/ -]+" if background else "checkpoint save"
    assert len(errors) == 1 and re.fullmatch(NAMED.format(pid=workers[1], operation=operation, within=(
        rf"parallel.collective_timeout_s={TIMEOUT_S} s")), errors[0]), out[-4000:]
    assert "Root Cause" in out and "CollectiveStall: rank 1 (host" in out  # torchrun's summary names it too
    assert took > TIMEOUT_S - 1  # a rank is given the whole timeout
    assert_previous_checkpoint_stays_latest(tmp_path / "checkpoints", tmp)


@pytest.mark.slow
def test_sigterm_ends_a_rank_whose_save_waits_for_a_killed_rank(tmp_path: Path) -> None:
    """A plain launch (ranks from the environment, as srun starts them): rank 1 is killed with -9
    in the middle of a save and rank 0, waiting for its files, is sent SIGTERM, as a scheduler's
    scancel does. It must end within seconds, naming rank 1, not swallow the signal for the
    collective timeout (600 s by default, 60 here)."""
    ranks = start_ranks(tmp_path, *SAVING[:-1], "parallel.collective_timeout_s=60", nproc=2, port=free_port())
    pids = [rank.pid for rank in ranks]
    try:
        tmp = catch_a_save(tmp_path / "checkpoints", lambda: pids, rank1_still_writing)
        os.kill(pids[1], signal.SIGKILL)
        signal_all([pids[0]], signal.SIGCONT)
        time.sleep(0.5)  # rank 0 is back to waiting for rank 1's files
        os.kill(pids[0], signal.SIGTERM)
        took = wait_until(lambda: ranks[0].poll() is not None, saver_module.STOPPING_SILENCE_S + GRACE_S + SLACK_S)
    finally:
        signal_all(pids, signal.SIGKILL)
    out = ranks[0].communicate()[0]
    assert ranks[0].returncode == 1, out[-4000:]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.fullmatch(NAMED.format(pid=pids[1], operation="checkpoint save", within=(
        rf"{saver_module.STOPPING_SILENCE_S:g} s of the stop signal")), errors[0]), out[-4000:]
    assert took < saver_module.STOPPING_SILENCE_S + GRACE_S + SLACK_S
    assert_previous_checkpoint_stays_latest(tmp_path / "checkpoints", tmp)
    assert not tmp.exists()  # rank 0 removed the save's partial files


@pytest.mark.slow
def test_rank0_ends_before_torchrun_kills_it_when_a_rank_dies_during_a_background_save(tmp_path: Path) -> None:
    """kill -9 of rank 1 while a background save is in flight: torchrun sends SIGTERM to rank 0,
    which must be gone before torchrun's 30 s shutdown timeout (it used to wait for the save)."""
    run = start_pretrain(tmp_path, *SAVING, "checkpoint.async=true", nproc=2)
    pids = lambda: [run.pid, *worker_pids(run.pid).values()]  # noqa: E731
    tmp = catch_a_save(tmp_path / "checkpoints", pids, rank1_still_writing)
    workers = worker_pids(run.pid)
    os.kill(workers[1], signal.SIGKILL)
    signal_all(pids(), signal.SIGCONT)
    out, _ = run.communicate(timeout=120)
    assert run.returncode != 0
    assert "forcefully exiting via 9" not in out, out[-4000:]  # torchrun never needed SIGKILL
    assert_previous_checkpoint_stays_latest(tmp_path / "checkpoints", tmp)
    assert not tmp.exists()  # rank 0 gave the save up in time to remove its partial files


def _save_while_rank1_writes_slowly(rank: int, world_size: int, run_dir: Path) -> tuple[bool, str]:
    """Worker: rank 1's file system takes 3.5 s to write its shards, 3.5 × parallel.collective_timeout_s."""
    trainer = build_trainer(compose([*TINY, f"run.dir={run_dir}", "parallel.collective_timeout_s=1"]),
                            init_grid(1, 1, timeout_s=60))
    train_step(trainer, next(iter(trainer.loader)))
    if rank == 1:
        write = saver_module.write_shards
        saver_module.write_shards = lambda *args, **kwargs: (time.sleep(1.75), write(*args, **kwargs))[1]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        saved = CheckpointSaver(trainer.state).save() is not None
    return saved, out.getvalue()


def test_a_slow_file_system_is_waited_for(tmp_path: Path) -> None:
    """A rank that writes slowly keeps beating: it is waited for past the timeout, and said to be."""
    (saved, out), (saved_too, _) = run_distributed(_save_while_rank1_writes_slowly, 2, tmp_path, timeout_s=120,
                                                   init_process_group=False)
    assert saved and saved_too
    assert re.search(r"checkpoint: step 1: still waiting after \d s for rank 1, alive and writing \(a slow file "
                     r"system\?\)\n", out), out
    assert (tmp_path / "checkpoints/latest").read_text() == "step_1\n"


STOP_AT = 3


def _sigterm_at(moment: str) -> None:
    """Patch the saver so that rank 0 sends itself SIGTERM at ``moment`` of the save of step STOP_AT."""
    def fire() -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    if moment == "snapshot":  # in the middle of the background save's host copy
        take, copy, armed = saver_module.take_snapshot, saver_module._host_copy, [False]

        def take_snapshot(state, save_id, buffers):  # noqa: ANN001, ANN202
            armed[0] = state.step == STOP_AT
            return take(state, save_id, buffers)

        def host_copy(*args):  # noqa: ANN002, ANN202
            if armed[0]:
                armed[0] = False
                fire()
            return copy(*args)

        saver_module.take_snapshot, saver_module._host_copy = take_snapshot, host_copy
        return
    name = {"write": "write_shards", "commit": "commit"}[moment]
    original = getattr(saver_module, name)

    def patched(directory: Path, *args: object, **kwargs: object) -> object:
        if f"step_{STOP_AT}." in directory.name:
            fire()
        return original(directory, *args, **kwargs)

    setattr(saver_module, name, patched)


def _train_until_sigterm(rank: int, world_size: int, args: tuple[Path, str, bool]) -> tuple[str, float]:
    """Worker: the whole training loop (two ranks, dp 2), rank 0 signalled in the middle of a save."""
    run_dir, moment, background = args
    if rank == 0:
        _sigterm_at(moment)
    out, started = io.StringIO(), time.monotonic()
    with contextlib.redirect_stdout(out):
        run(compose([*TINY, f"run.dir={run_dir}", "train.steps=8", "checkpoint.interval=1",
                     f"checkpoint.async={background}", "parallel.ep=2"]))
    return out.getvalue(), time.monotonic() - started


@pytest.mark.parametrize(("moment", "background"), [
    ("write", False),
    pytest.param("commit", False, marks=pytest.mark.slow),
    pytest.param("write", True, marks=pytest.mark.slow),
    pytest.param("commit", True, marks=pytest.mark.slow),
    pytest.param("snapshot", True, marks=pytest.mark.slow),
])
def test_sigterm_during_a_save_stops_after_it_with_the_checkpoint_saved(tmp_path: Path, moment: str,
                                                                        background: bool) -> None:
    """Every rank healthy: the save finishes, and the run stops with a checkpoint of the step it
    stops at — right after the save, or, when the signal reached a background writer while
    training went on, after the step that was running then."""
    (out, _), _ = run_distributed(_train_until_sigterm, 2, (tmp_path, moment, background), timeout_s=180,
                                  init_process_group=False)
    stopped = logged_steps(tmp_path)[-1]
    assert stopped == STOP_AT or (background and moment != "snapshot" and stopped == STOP_AT + 1), out
    assert f"stopping after step {stopped} on SIGTERM; the checkpoint is saved\n" in out, out
    assert (tmp_path / "checkpoints/latest").read_text() == f"step_{stopped}\n"
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_a_stopped_heartbeat_counts_as_a_running_save_thread_until_it_ends() -> None:
    """A heartbeat stopped while its beat is inside the store (native code) must keep the process
    from finalizing (megamoe.cli.exit_with) until the beat returns."""
    release = threading.Event()

    class SlowStoreBoard:
        silence_s, step = 10.0, 1

        def beat(self) -> None:
            release.wait(10)

    heartbeat = saver_module._Heartbeat(SlowStoreBoard())  # type: ignore[arg-type]
    heartbeat.stop()
    assert saver_module.save_threads_running()
    release.set()
    wait_until(lambda: not saver_module.save_threads_running(), 10, "the heartbeat's end")
