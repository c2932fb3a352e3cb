"""Naming the rank that a stalled collective waited for.

A rank that stops responding (SIGSTOP, a hung GPU, a dead link) never arrives at its next
collective. The others block until ``parallel.collective_timeout_s`` and then get an error that
names nobody (gloo: ``Timed out waiting ... for recv operation``), and the first of them to exit
is what the launcher reports as the root cause — a healthy rank.

So a rank that meets a communication failure checks in: it writes the operation it was in to
the job's key-value store (the c10d store every rank already shares) and waits a grace period
for the others to check in too. Healthy ranks all fail within about a step of each other, since
each waits on the stopped rank directly or on a rank that does; ranks that never check in are
the ones that did not arrive. The lowest rank that checked in reports them in one line, with
each waiting rank's operation; the rest exit quietly once it has.

Only failures raised as Python exceptions are seen here (gloo, and NCCL with
``TORCH_NCCL_ASYNC_ERROR_HANDLING`` set so that errors are raised, not aborted on); NCCL's own
flight recorder (``TORCH_NCCL_TRACE_BUFFER_SIZE``) covers the rest on GPUs.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

from megamoe.compat import default_store

# What gloo's errors say when a peer timed out, vanished, or closed the pair after its own timeout.
_GLOO_FAILURES = ("Timed out waiting", "pair closure", "Connection closed by peer", "Connection reset by peer",
                  "Broken pipe", "Socket Timeout")
_POLL_S = 0.25
_REPORTED = "reported"


def is_communication_failure(exc: Optional[BaseException]) -> bool:
    """A collective or point-to-point operation failed on the transport (not a bug in our code).

    Looks down the chain of causes: torch's pipeline stages re-raise what failed inside them.
    """
    while exc is not None:
        if isinstance(exc, dist.DistError) or (
                isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _GLOO_FAILURES)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class CollectiveStall(Exception):
    """Raised on every rank that checked in; ``report`` is True on the one that tells the user."""

    def __init__(self, message: str, report: bool) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class Progress:
    """Where this rank is: the step and the communicating operation it is in (set by the loop)."""

    step: int = 0
    operation: str = "startup"
    step_time_s: float = 0.0

    def at(self, operation: str) -> None:
        self.operation = operation


def _store() -> dist.Store:
    return default_store()


def _key(*parts: object) -> str:
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # a restarted group starts a clean board
    return "/".join(["megamoe", "stall", attempt, *map(str, parts)])


def announce(rank: int, world_size: int) -> None:
    """At startup: record where this rank runs, for a later report that names it."""
    if world_size > 1:
        _store().set(_key("where", rank), f"host {socket.gethostname()}, pid {os.getpid()}")


def _wait_for_check_ins(store: dist.Store, world_size: int, grace_s: float) -> list[int]:
    deadline = time.monotonic() + grace_s
    while store.add(_key("count"), 0) < world_size and time.monotonic() < deadline:
        time.sleep(_POLL_S)
    return [r for r in range(world_size) if store.check([_key("at", r)])]


def _describe(store: dist.Store, arrived: list[int], missing: list[int], timeout_s: int) -> str:
    where = {r: store.get(_key("where", r)).decode() for r in missing if store.check([_key("where", r)])}
    names = ", ".join(f"rank {r} ({where[r]})" if r in where else f"rank {r}" for r in missing)
    waiting: dict[str, list[int]] = {}
    for r in arrived:
        state = json.loads(store.get(_key("at", r)))
        waiting.setdefault(f"{state['operation']} of step {state['step']}", []).append(r)
    waits = "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))} in {op}" for op, rs in waiting.items())
    verb = "does" if len(missing) == 1 else "do"
    return (f"{names} did not arrive within parallel.collective_timeout_s={timeout_s} s ({waits}); "
            f"it {verb} not respond: check that process and its host (stopped, hung or too slow)")


def diagnose(rank: int, world_size: int, progress: Progress, timeout_s: int, error: BaseException) -> CollectiveStall:
    """Check in, wait for the other ranks to, and return the stall to raise (collective by store)."""
    store = _store()
    grace_s = max(5.0, 2 * progress.step_time_s)
    store.set_timeout(timedelta(seconds=grace_s))
    try:
        store.set(_key("at", rank), json.dumps({"step": progress.step, "operation": progress.operation}))
        store.add(_key("count"), 1)
        arrived = _wait_for_check_ins(store, world_size, grace_s)
        missing = [r for r in range(world_size) if r not in arrived]
        if not missing:
            message = f"every rank reached its collective, yet the transport failed ({_first_line(error)}); see the ranks' logs"
        else:
            message = _describe(store, arrived, missing, timeout_s)
        reporter = rank == min(arrived)
    except (RuntimeError, dist.DistError) as store_error:  # the store itself is gone or hangs
        message = (f"{progress.operation} of step {progress.step} failed ({_first_line(error)}), and the job's store "
                   f"does not answer either ({_first_line(store_error)}): the rank hosting it (rank 0, or the "
                   "launcher) may be the one stopped")
        return CollectiveStall(message, report=True)
    if not reporter:  # let the reporter's line out before a non-zero exit makes the launcher stop it
        with contextlib.suppress(RuntimeError, dist.DistError):  # it may have been stopped first: go anyway
            store.wait([_key(_REPORTED)], timedelta(seconds=grace_s))
    return CollectiveStall(message, reporter)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def reported() -> None:
    """The reporter's line is out: the other ranks may exit."""
    try:
        _store().set(_key(_REPORTED), "1")
    except (RuntimeError, dist.DistError):
        pass  # they stop waiting after the grace period anyway
