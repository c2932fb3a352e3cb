"""SIGTERM / SIGUSR1 (SLURM preemption, scancel, a cluster's grace signal) → stop cleanly."""

from __future__ import annotations

import signal
from typing import Optional

import torch
import torch.distributed as dist

from megamoe.parallel.mesh import ProcessGrid


class Preemption:
    """Records a preemption signal; the checkpointing callback asks after every step.

    The handler only records the signal; :meth:`requested` all-reduces the flag, so all ranks
    finish the same step, save, and return (exit code 0) even if only some were signalled.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __enter__(self) -> "Preemption":
        self.received: Optional[int] = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def requested(self, grid: ProcessGrid) -> bool:
        """Was any rank signalled (collective)?"""
        flag = torch.tensor([float(self.received is not None)], device=grid.device)
        if grid.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a signal on another rank"
