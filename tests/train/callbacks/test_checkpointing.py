"""How a run's saves end it: the last save of a run (at the end, on a stop signal) failing on a
full disk, and Ctrl-C while a background save is being written. Injected for real: a tmpfs too
small for two checkpoints, SIGINT to the running process."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest

import megamoe.checkpoint.saver as saver_module
import megamoe.checkpoint.store as store
from megamoe.checkpoint.names import model_tensor_shapes
from megamoe.config import compose
from megamoe.errors import Interrupted, SharedError
from megamoe.parallel.mesh import ProcessGrid
from megamoe.train.callbacks.base import Action
from megamoe.train.callbacks.checkpointing import Checkpointing
from megamoe.train.callbacks.skipped import SkippedSteps
from megamoe.train.step import train_step
from megamoe.train.trainer import build_trainer
from tests.faults import full_disk_writes, small_filesystem
from tests.pretrain import (
    ROOT,
    TINY,
    catch_a_save,
    logged_steps,
    pretrain_command,
    pretrain_env,
    run_pretrain,
    signal_all,
)

FULL_DISK = (r"checkpoint: ERROR: cannot save step {step}: \S+/step_{step}\.tmp/\S+: cannot write \(No space left on "
             r"device\): the disk is full \([^)]*\); free space or choose another run.dir; {then}; earlier checkpoints "
             r"are intact")


def room_for_one_checkpoint() -> int:
    """Bytes of a tmpfs that holds one checkpoint of the TINY model (weights and AdamW's two
    moments in fp32) and the run's small files, but not a second checkpoint."""
    elements = sum(shape.numel() for shape in model_tensor_shapes(compose(TINY)).values())
    return int(1.5 * 12 * elements)


def test_a_failed_last_save_makes_the_run_fail_and_says_which_steps_are_lost(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "disk", room_for_one_checkpoint()) as disk:
        result = run_pretrain(disk / "run", "train.steps=10", "checkpoint.interval=5", "train.log_interval=5")
        latest = (disk / "run/checkpoints/latest").read_text()
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert re.fullmatch(FULL_DISK.format(step=10, then="it was the run's last save, nothing retries it"), lines[-2])
    assert re.fullmatch(r"trained steps 1-10 of 10 in \S+; no step skipped; steps 6-10 are in no checkpoint \(latest: "
                        r"step_5; the save of step 10 failed\)", lines[-1]), lines[-1]
    assert result.stderr.splitlines() == [
        "error: checkpoint: the last save of the run (step 10) failed and no later save retries it: steps 6-10 are in "
        "no checkpoint, latest is step_5 (see the ERROR above); fix the cause and resume to redo them"]
    assert latest == "step_5\n"


@pytest.mark.slow
def test_failed_background_saves_at_dp2_fail_the_run_naming_every_lost_step(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "disk", room_for_one_checkpoint()) as disk:
        result = run_pretrain(disk / "run", "train.steps=15", "checkpoint.interval=5", "checkpoint.async=true",
                              nproc=2)
    assert result.returncode != 0, result.stdout[-3000:]
    assert re.search(FULL_DISK.format(step=10, then=r"training goes on \(checkpoint.on_error=continue\), the next "
                                      "interval tries again"), result.stdout)
    assert re.search(r"trained steps 1-15 of 15 in \S+; no step skipped; steps 6-15 are in no checkpoint \(latest: "
                     r"step_5; the saves of steps 10, 15 failed\)", result.stdout), result.stdout[-3000:]
    assert "error: checkpoint: the last save of the run (step 15) failed" in result.stderr


def test_a_failed_save_on_a_stop_signal_makes_the_run_fail(grid: ProcessGrid, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    """A preemption's save has no next interval either: its failure must not end the run with 0."""
    trainer = build_trainer(compose([*TINY, f"run.dir={tmp_path}", "checkpoint.interval=100"]), grid)
    full_disk_writes(monkeypatch, store, room_bytes=1000)
    with Checkpointing(trainer, SkippedSteps(10), None) as saves:  # as the loop does: before the first step
        result = train_step(trainer, next(iter(trainer.loader)))
        saves.preemption.received = signal.SIGTERM  # as the handler records it
        assert saves.after_step(result) is Action.STOP
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(FULL_DISK.format(step=1, then="it was the run's last save, nothing retries it"), out[0])
    assert out[1] == "stopping after step 1 on SIGTERM; no checkpoint was saved (see above)"
    assert saves.summary(1) == "; steps 1-1 are in no checkpoint (the save of step 1 failed)"
    with pytest.raises(SharedError, match=r"^checkpoint: the last save of the run \(step 1\) failed .* there is no "
                                          r"checkpoint \(see the ERROR above\)"):
        saves.check_last(1)


def test_ctrl_c_while_a_background_save_is_written_is_one_line(tmp_path: Path) -> None:
    run = subprocess.Popen(pretrain_command(tmp_path, "train.steps=100000", "checkpoint.interval=1",
                                            "checkpoint.async=true"),
                           cwd=ROOT, env=pretrain_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        tmp = catch_a_save(tmp_path / "checkpoints", lambda: [run.pid],
                           lambda tmp: not (tmp / "rng-r00000.pt").exists())  # its writer is writing
        signal_all([run.pid], signal.SIGINT)
        signal_all([run.pid], signal.SIGCONT)
        out, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 130, err[-3000:]
    (line,) = err.splitlines()  # no traceback
    latest, saving = (tmp_path / "checkpoints/latest").read_text().strip(), tmp.name.removesuffix(".tmp")
    unfinished = "" if latest == saving else f" \\(the background save of step {saving[5:]} was not completed\\)"
    match = re.fullmatch(rf"interrupted \(Ctrl-C\) after step (\d+); the latest checkpoint is {latest}{unfinished}",
                         line)
    assert match and int(match[1]) - logged_steps(tmp_path)[-1] in (0, 1), line


SAVE_EVERY_STEP_IN_THE_BACKGROUND = ["checkpoint.async=true", "checkpoint.interval=1"]


def ctrl_c_in(seconds: float) -> None:
    """SIGINT to this process, as a terminal's Ctrl-C, a little later."""
    threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT)).start()


@pytest.mark.usefixtures("stuck_checkpoint_writer")
def test_ctrl_c_while_the_loop_waits_for_a_background_save_abandons_it(grid: ProcessGrid, tmp_path: Path) -> None:
    """The interrupted wait must leave the save pending: the exit abandons it, says it was not
    completed, and leaves no writer unknown to the process's exit (megamoe.cli.exit_with)."""
    trainer = build_trainer(compose([*TINY, f"run.dir={tmp_path}", *SAVE_EVERY_STEP_IN_THE_BACKGROUND]), grid)
    with pytest.raises(Interrupted) as interrupted:
        with Checkpointing(trainer, SkippedSteps(10), None) as saves:
            saves.after_step(train_step(trainer, next(iter(trainer.loader))))  # step 1: the save starts
            ctrl_c_in(0.3)
            saves.wait()
    assert str(interrupted.value) == ("interrupted (Ctrl-C) after step 1; no checkpoint yet (the background save of "
                                      "step 1 was not completed)")
    assert saver_module.save_threads_running()
    assert not (tmp_path / "checkpoints/step_1.tmp").exists() and not (tmp_path / "checkpoints/latest").exists()


@pytest.mark.usefixtures("stuck_checkpoint_writer")
def test_ctrl_c_while_a_background_writer_starts_abandons_it(grid: ProcessGrid, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Thread.start() waits for the new thread to run, which takes long on a loaded machine: a
    Ctrl-C in that wait leaves a writer running that the saver must know of."""
    trainer = build_trainer(compose([*TINY, f"run.dir={tmp_path}", *SAVE_EVERY_STEP_IN_THE_BACKGROUND]), grid)

    class SlowToStart(threading.Thread):
        def start(self) -> None:
            super().start()
            os.kill(os.getpid(), signal.SIGINT)
            threading.Event().wait(1)  # start()'s own wait for the thread, interrupted

    monkeypatch.setattr(saver_module.threading, "Thread", SlowToStart)
    with pytest.raises(Interrupted) as interrupted:
        with Checkpointing(trainer, SkippedSteps(10), None) as saves:
            saves.after_step(train_step(trainer, next(iter(trainer.loader))))
    assert str(interrupted.value).endswith("(the background save of step 1 was not completed)")
    assert saver_module.save_threads_running()
    assert not (tmp_path / "checkpoints/step_1.tmp").exists() and not (tmp_path / "checkpoints/latest").exists()


@pytest.mark.parametrize("ending", ["normally", "with a failed collective"])
def test_the_stop_signal_handler_stays_while_the_run_settles_its_background_save(
        grid: ProcessGrid, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ending: str) -> None:
    """A launcher's SIGTERM (torchrun's, when another rank died) while the run waits for or gives
    up its background save is recorded, not fatal: killed there, the process would leave the
    save's partial files behind."""
    trainer = build_trainer(compose([*TINY, f"run.dir={tmp_path}", *SAVE_EVERY_STEP_IN_THE_BACKGROUND]), grid)
    before = signal.getsignal(signal.SIGTERM)
    seen: list[object] = []
    for name in ("wait", "abandon"):
        real = getattr(saver_module.CheckpointSaver, name)
        monkeypatch.setattr(saver_module.CheckpointSaver, name,
                            lambda self, *args, real=real: (seen.append(signal.getsignal(signal.SIGTERM)),
                                                            real(self, *args))[1])
    with contextlib.suppress(RuntimeError):
        with Checkpointing(trainer, SkippedSteps(10), None) as saves:
            saves.after_step(train_step(trainer, next(iter(trainer.loader))))
            seen.clear()  # from here on: how the run ends
            if ending != "normally":
                raise RuntimeError("a collective failed")
    assert seen and all(handler == saves.preemption._handle for handler in seen), seen
    assert signal.getsignal(signal.SIGTERM) == before
