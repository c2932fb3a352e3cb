"""A rank that stops responding is named: SIGSTOP one of four torchrun workers mid-run; the job
must end within the collective timeout plus the grace period, with one line that names the
stopped rank (its pid) and what the others were waiting in — not a healthy rank."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megamoe.parallel.mesh import init_grid
from megamoe.parallel.stall import Progress, diagnose, is_communication_failure, reported
from tests.dist.launcher import run_distributed
from tests.pretrain import logged_steps, start_pretrain, worker_pids

TIMEOUT_S = 5


@pytest.mark.slow  # tests/launch/test_pretrain_restarts.py checks the same line on the way to a restart
def test_a_stopped_rank_is_named_with_what_the_others_waited_in(tmp_path: Path) -> None:
    run = start_pretrain(tmp_path, "parallel.pp=2", "parallel.ep=2", "train.steps=100000",
                         "checkpoint.interval=100000", f"parallel.collective_timeout_s={TIMEOUT_S}", nproc=4,
                         TORCH_ELASTIC_SHUTDOWN_TIMEOUT="5")  # torchrun's wait before it SIGKILLs the stopped rank
    deadline = time.monotonic() + 180
    while len(logged_steps(tmp_path)) < 2 and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.2)
    workers = worker_pids(run.pid)
    assert sorted(workers) == [0, 1, 2, 3], workers
    stopped_at = time.monotonic()
    os.kill(workers[2], signal.SIGSTOP)
    try:
        out, _ = run.communicate(timeout=240)
    finally:
        for pid in workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    took = time.monotonic() - stopped_at
    assert run.returncode != 0
    lines = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, out[-4000:]
    assert re.fullmatch(
        rf"error: rank 2 \(host \S+, pid {workers[2]}\) did not arrive within "
        rf"parallel.collective_timeout_s={TIMEOUT_S} s "
        r"\((ranks? [\d, ]+ in [\w/ -]+ of step \d+(; )?)+\); it does not respond: check that process and its host "
        r"\(stopped, hung or too slow\)", lines[0]), lines[0]
    assert all(f"rank {r} " not in lines[0].split(" did not arrive")[0] for r in (0, 1, 3))
    assert "Root Cause" in out and "CollectiveStall: rank 2 (host" in out  # torchrun's summary names it too
    assert took < TIMEOUT_S + 60, f"the job took {took:.0f} s to end after the stop"


def _late_first_step(rank: int, world_size: int, _: None) -> tuple[str, bool]:
    """Worker: rank 1 spends 2 s in its first step (as compiling would) while the collective timeout is 1 s."""
    init_grid(1, 1, timeout_s=1)
    if rank == 1:
        time.sleep(2)
    try:
        dist.all_reduce(torch.ones(1))
    except RuntimeError as exc:
        assert is_communication_failure(exc)
        stall = diagnose(rank, world_size, Progress(step=1, operation="loss all-gather"), 1, exc)
        if stall.report:
            reported()
        return str(stall), stall.report
    raise AssertionError("the late rank's collective did not time out")


@pytest.mark.slow
def test_a_slow_first_step_is_named_as_the_likely_cause() -> None:
    """Both ranks arrive (the slow one late): no rank is missing, and before any step finished the
    report points at the first step's compile instead of only at the transport."""
    (first, reports_first), (_, reports_second) = run_distributed(_late_first_step, 2, None, timeout_s=60,
                                                                 init_process_group=False)
    assert (reports_first, reports_second) == (True, False)
    assert re.fullmatch(r"every rank reached its collective, yet the transport failed \(.+\); no step had finished "
                        r"yet, so the likely cause is a slow first step: a rank that compiles \(train.compile=block\) "
                        r"or warms up for longer than parallel.collective_timeout_s=1 s makes the others time out; "
                        r"raise parallel.collective_timeout_s", first), first


def test_communication_failures_are_told_from_bugs() -> None:
    timeout = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation")
    wrapped = RuntimeError("stage 1 failed")
    wrapped.__cause__ = timeout  # how torch's pipeline stages re-raise
    assert is_communication_failure(timeout) and is_communication_failure(wrapped)
    assert not is_communication_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_communication_failure(ValueError("Timed out waiting"))
