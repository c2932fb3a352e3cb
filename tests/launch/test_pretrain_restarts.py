"""Runs that go on by themselves, and the multi-node path, as users launch them.

Under ``torchrun --max-restarts``, a worker killed with -9 at a seeded step, or a rank stopped
with SIGSTOP (its stall is reported, the agent kills it), makes torchrun restart the group; the
new group resumes from ``latest`` by itself and the run ends with the per-step losses of an
uninterrupted run and exactly one metrics line per step: nothing lost. Two torchrun agents on
this machine (``--nnodes 2``, a c10d rendezvous on localhost) train like one agent.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.dist.launcher import free_port
from tests.pretrain import logged, start_pretrain, worker_pids

STEPS = 10
LAYOUT = ["parallel.pp=2", "parallel.ep=2", f"train.steps={STEPS}", "checkpoint.interval=3", "train.log_interval=5",
          "train.eval_interval=100", "moe.aux_free_bias=true", "parallel.collective_timeout_s=10"]
SEED = 2026


def records(run_dir: Path) -> list[tuple]:
    """What must not change: (step, loss, grad norm, lr, consumed samples) of every metrics line."""
    return [tuple(r[k] for k in ("step", "loss", "grad_norm", "lr", "consumed_samples")) for r in logged(run_dir)]


def finish(run: subprocess.Popen, timeout: float = 400) -> str:
    out, _ = run.communicate(timeout=timeout)
    assert run.returncode == 0, out[-4000:]
    return out


def wait_for_step(run_dir: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not any(r["step"] >= step for r in logged(run_dir)):
        assert time.monotonic() < deadline, f"step {step} never came"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[tuple]:
    run_dir = tmp_path_factory.mktemp("reference")
    finish(start_pretrain(run_dir, *LAYOUT, nproc=4))
    return records(run_dir)


def test_a_worker_killed_with_kill9_is_restarted_and_nothing_is_lost(tmp_path: Path, reference: list[tuple]) -> None:
    kill_after = random.Random(SEED).randint(4, STEPS - 2)  # after the first checkpoint (step 3)
    run = start_pretrain(tmp_path, *LAYOUT, nproc=4, torchrun=["--standalone", "--max-restarts=2"])
    wait_for_step(tmp_path, kill_after)
    os.kill(worker_pids(run.pid)[3], signal.SIGKILL)
    out = finish(run)
    assert "checkpoint: resumed from" in out  # the restarted group found latest by itself
    assert records(tmp_path) == reference  # bit for bit, each step once


@pytest.mark.slow
def test_a_stopped_rank_is_named_killed_and_the_group_restarts(tmp_path: Path, reference: list[tuple]) -> None:
    stop_after = random.Random(SEED + 1).randint(4, STEPS - 2)
    run = start_pretrain(tmp_path, *LAYOUT, nproc=4, torchrun=["--standalone", "--max-restarts=1"],
                         TORCH_ELASTIC_SHUTDOWN_TIMEOUT="5")
    wait_for_step(tmp_path, stop_after)
    stopped = worker_pids(run.pid)[2]
    os.kill(stopped, signal.SIGSTOP)
    try:
        out = finish(run)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stopped, signal.SIGKILL)
    named = [line for line in out.splitlines() if line.startswith("error: ")]
    assert named and all(re.fullmatch(
        rf"error: rank 2 \(host \S+, pid {stopped}\) did not arrive within parallel.collective_timeout_s=10 s "
        r"\((ranks? [\d, ]+ in [\w/ -]+ of step \d+(; )?)+\); it does not respond: check that process and its host "
        r"\(stopped, hung or too slow\)", line) for line in named), named  # each rank that waited names rank 2
    assert records(tmp_path) == reference


@pytest.mark.slow
def test_two_agents_on_one_machine_train_like_one(tmp_path: Path, reference: list[tuple]) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    rendezvous = ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=two-agents"]
    agents = [start_pretrain(tmp_path, *LAYOUT, nproc=2, torchrun=rendezvous) for _ in range(2)]
    for agent in agents:
        finish(agent)
    assert records(tmp_path) == reference
