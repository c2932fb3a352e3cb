"""SIGTERM / SIGUSR1 (SLURM preemption, scancel, a cluster's grace signal) → stop cleanly."""

from __future__ import annotations

import signal
import threading
from typing import Optional

import torch
import torch.distributed as dist

from megamoe.parallel.mesh import ProcessGrid


class Preemption:
    """SIGTERM / SIGUSR1 (SLURM preemption, scancel, a cluster's grace signal) → stop cleanly.

    The handler only records the signal (and sets ``stopping``, which a save in progress watches:
    it then gives a silent rank up sooner); after every step and every save the ranks all-reduce
    the flag, so all of them finish the same step, save, and return (exit code 0) even if only
    some were signalled.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, stopping: threading.Event) -> None:
        self.stopping = stopping
        self.received: Optional[int] = None

    def __enter__(self) -> "Preemption":
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum
        self.stopping.set()

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def requested(self, grid: ProcessGrid) -> bool:
        flag = torch.tensor([float(self.received is not None)], device=grid.device)
        if grid.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a signal on another rank"
