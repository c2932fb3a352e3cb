"""launch/pretrain.py interrupted for real — kill -9 in the middle of a save (two processes), kill -9
at a random moment, SIGTERM — then resumed with checkpoint.resume=auto: the metrics of every
step and the final checkpoint must equal an uninterrupted run's, bit for bit.

The random moment is seeded and measured in steps, not seconds: the kill comes a seeded
fraction of a step's own measured time after that step's metrics, so a faster or slower
machine moves it by the same share of a step."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from tests.checkpoint.helpers import assert_same_tensors, checkpoint_tensors
from tests.pretrain import catch_a_save, logged

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
STEPS = 16
ARGS = ["+exp=tiny", "train.global_batch=4", "train.micro_batch=1", "train.seq_len=32", f"train.steps={STEPS}",
        "train.warmup_steps=1", "train.log_interval=4", "train.eval_interval=5", "train.eval_iters=1",
        "moe.aux_free_bias=true", "checkpoint.keep=2"]
TWO_PROCESSES = ["parallel.ep=2"]  # dp 2: both ranks write expert shards, rank 0 commits
SEED = 1234  # picks the step and the moment of the kill -9 and the step of the SIGTERM


class Run:
    """launch/pretrain.py as one plain process, or under torchrun with ``nproc`` workers."""

    def __init__(self, run_dir: Path, nproc: int, *overrides: str) -> None:
        script = ["launch/pretrain.py", *ARGS, f"run.dir={run_dir}", *overrides]
        torchrun = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}"]
        cmd = [sys.executable, *script] if nproc == 1 else [*torchrun, *script]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
        self.run_dir = run_dir
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)

    def pids(self) -> list[int]:
        """The launched process and its children (torchrun puts each worker in its own session)."""
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:
                children.append(int(stat.parent.name))
        return [self.proc.pid, *children]

    def signal_all(self, sig: int) -> None:
        for pid in self.pids():
            os.kill(pid, sig)

    def wait(self, timeout: float = 240) -> tuple[int, str]:
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.signal_all(signal.SIGKILL)
                raise AssertionError(f"never saw {what}; output:\n{self.wait()[1][-3000:]}")
            time.sleep(0.001)

    def logged(self) -> list[dict]:
        """The complete lines of metrics.jsonl so far (the last one may be half-written)."""
        return logged(self.run_dir)

    def last_logged_step(self) -> int:
        records = self.logged()
        return records[-1]["step"] if records else 0

    def wait_for_step(self, step: int) -> dict:
        """Block until ``step`` is logged; its record (with its measured step_time_s)."""
        self.wait_for(lambda: self.last_logged_step() >= step, f"step {step}")
        return next(r for r in self.logged() if r["step"] == step)


def finished(run_dir: Path, nproc: int, *overrides: str) -> str:
    code, out = Run(run_dir, nproc, *overrides).wait()
    assert code == 0, out[-3000:]
    return out


def records(run_dir: Path, name: str) -> list[tuple]:
    """What must not change: (step, loss, grad norm, lr, consumed samples) / eval losses, per line."""
    lines = [json.loads(line) for line in (run_dir / name).read_text().splitlines()]
    return [tuple(r[k] for k in ("step", "loss", "grad_norm", "lr", "consumed_samples") if k in r) for r in lines]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    for name in ("metrics.jsonl", "eval.jsonl"):
        assert records(run_dir, name) == records(reference, name), name
    final = f"checkpoints/step_{STEPS}"
    assert_same_tensors(checkpoint_tensors(run_dir / final), checkpoint_tensors(reference / final))


@pytest.mark.parametrize("writes", ["in_place", pytest.param("background", marks=pytest.mark.slow)])
def test_kill9_during_a_save_with_two_processes(tmp_path: Path, writes: str) -> None:
    """In the background (checkpoint.async) the kill lands while training goes on: the same holds."""
    finished(tmp_path / "reference", 2, *TWO_PROCESSES)
    run = Run(tmp_path / "run", 2, *TWO_PROCESSES, "checkpoint.interval=1",
              f"checkpoint.async={writes == 'background'}")
    checkpoints = tmp_path / "run/checkpoints"
    killed_in = catch_a_save(checkpoints, run.pids, lambda tmp: True)  # every process frozen, the save unfinished
    run.signal_all(signal.SIGKILL)
    run.wait()
    assert killed_in.is_dir()  # the half-written checkpoint is still there ...
    latest = (checkpoints / "latest").read_text().strip()
    assert int(latest.removeprefix("step_")) < int(killed_in.name.removeprefix("step_").removesuffix(".tmp"))
    out = finished(tmp_path / "run", 2, *TWO_PROCESSES)  # ... and ignored: auto resumes from latest
    assert f"checkpoint: resumed from {checkpoints / latest}" in out
    assert_same_run(tmp_path / "run", tmp_path / "reference")


@pytest.mark.slow
def test_kill9_at_a_random_moment_then_sigterm_then_resume(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    kill_after, fraction = rng.randint(1, 6), rng.random()
    finished(tmp_path / "reference", 1)
    run = Run(tmp_path / "run", 1, "checkpoint.interval=2")
    # after step N's metrics come its eval / save, then step N + 1: kill somewhere in there
    time.sleep(fraction * run.wait_for_step(kill_after)["step_time_s"])
    run.signal_all(signal.SIGKILL)
    where = f"kill -9 {fraction:.2f} of a step after step {kill_after}"
    assert run.wait()[0] == -signal.SIGKILL, f"the run ended before the {where}"
    killed_at = run.last_logged_step()

    run = Run(tmp_path / "run", 1, "checkpoint.interval=5")  # the interval may change between runs
    # metrics.jsonl is cut back to the resumed step at startup, so a step past killed_at is the new run's own
    term_after = killed_at + rng.randint(1, 3)
    run.wait_for_step(term_after)
    run.signal_all(signal.SIGSTOP)  # frozen: it can only stop after the step it is in now
    frozen_at = run.last_logged_step()
    run.signal_all(signal.SIGTERM)
    run.signal_all(signal.SIGCONT)
    code, out = run.wait()
    assert code == 0, out[-3000:]
    stopped_at = run.last_logged_step()
    assert frozen_at <= stopped_at <= frozen_at + 1 < STEPS, (
        f"{where}, killed at {killed_at}; SIGTERM after step {term_after}: frozen at {frozen_at}, "
        f"stopped at {stopped_at}")
    assert f"stopping after step {stopped_at} on SIGTERM; the checkpoint is saved" in out
    assert (tmp_path / "run/checkpoints/latest").read_text() == f"step_{stopped_at}\n"

    out = finished(tmp_path / "run", 1)
    assert f"resumed from {tmp_path / 'run/checkpoints'}/step_{stopped_at} at step {stopped_at}" in out
    assert_same_run(tmp_path / "run", tmp_path / "reference")
