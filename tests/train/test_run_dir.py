"""One run per run.dir, a clear line for an unwritable one, and no leftovers of killed saves.

Runs ``launch/pretrain.py`` as users do: the second of two runs on one directory must refuse to
start naming the first (its pid), a lock left by a run killed with -9 must not block the next,
and a directory that cannot be written is one line."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.faults import read_only_dir
from tests.pretrain import ROOT, logged_steps, pretrain_command, pretrain_env, run_pretrain


def test_a_second_run_on_the_same_dir_is_refused_until_the_first_is_gone(tmp_path: Path) -> None:
    first = subprocess.Popen(pretrain_command(tmp_path, "train.steps=100000", "checkpoint.interval=100000"), cwd=ROOT,
                             env=pretrain_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not logged_steps(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.2)
        second = run_pretrain(tmp_path, "train.steps=3")
        assert second.returncode == 2
        assert second.stderr.splitlines() == [
            f"error: run.dir={tmp_path} is in use by the run of host {socket.gethostname()} pid {first.pid} "
            f"(started {(tmp_path / 'run.lock').read_text().split('(started ')[1].strip()}; wait for that run to end "
            "or stop it, or choose another run.dir"]
        assert first.poll() is None  # the refused run touched nothing of the first one's
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = run_pretrain(tmp_path, "train.steps=3", "checkpoint.resume=none")  # the dead run's lock holds nothing
    assert third.returncode == 0, third.stderr[-2000:]
    assert logged_steps(tmp_path) == [1, 2, 3]


def test_an_unwritable_run_dir_is_one_line(tmp_path: Path) -> None:
    with read_only_dir(tmp_path / "ro") as ro:
        result = run_pretrain(ro / "run", "train.steps=2")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {ro}/run: cannot write (")
    assert lines[0].endswith("); choose a writable run.dir")


def test_saves_a_killed_run_left_unfinished_are_removed_at_startup(tmp_path: Path) -> None:
    leftover = tmp_path / "checkpoints" / "step_7.tmp"
    leftover.mkdir(parents=True)
    (leftover / "model-r00000-00000.safetensors").write_bytes(b"\0" * 4096)
    (tmp_path / "checkpoints" / "latest.tmp").write_text("step_7\n")
    result = run_pretrain(tmp_path, "train.steps=2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "checkpoint: removed step_7.tmp, left by a save that did not finish" in result.stdout
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_2"]
