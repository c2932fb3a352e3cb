"""Loss spikes: notice one, and say what to roll back to.

PaLM (Chowdhery et al., 2022) met about 20 loss spikes training its 540B model; restarting from a
checkpoint ~100 steps before the spike and skipping the ~200–500 batches around it made them go
away — a bad interaction of particular batches with a particular state, not bad data alone. With
``train.spike.enabled`` the loop does the same by itself: when the loss exceeds its running mean
by ``sigmas`` standard deviations (or is not finite) for ``patience`` steps in a row, it loads the
newest checkpoint from before the spike, moves the data position past every batch read since
that checkpoint (plus ``skip_batches`` more), and goes on. The skip lives in the loader's
position, which the next checkpoint saves: a run resumed later reads exactly what this one did.
"""

from __future__ import annotations

import collections
import math
import statistics
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class SpikeGuard:
    """The running statistics of recent healthy losses and the spike in progress, if any.

    ``window`` healthy steps make the mean and standard deviation; until the window is full,
    nothing counts as a spike (the loss falls fast early on).
    """

    window: int
    sigmas: float
    patience: int
    history: collections.deque = field(default_factory=collections.deque)
    spike_start: Optional[int] = None  # the first step of the run of suspicious losses
    streak: int = 0

    def __post_init__(self) -> None:
        self.history = collections.deque(self.history, maxlen=self.window)

    def limit(self) -> Optional[float]:
        """The loss above which a step is suspicious, or None while history is too short."""
        if len(self.history) < self.window:
            return None
        return statistics.fmean(self.history) + self.sigmas * statistics.pstdev(self.history)

    def observe(self, step: int, loss: float) -> bool:
        """Record step ``step``'s loss; True when ``patience`` suspicious steps in a row call for a rollback."""
        limit = self.limit()
        suspicious = not math.isfinite(loss) or (limit is not None and loss > limit)
        if not suspicious:
            self.history.append(loss)
            self.spike_start, self.streak = None, 0
            return False
        self.spike_start = step if self.streak == 0 else self.spike_start
        self.streak += 1
        return self.streak >= self.patience

    def rolled_back(self) -> None:
        """After a rollback: the spike is dealt with; the healthy history stays (it was before it)."""
        self.spike_start, self.streak = None, 0

    @property
    def suspect(self) -> bool:
        """A spike may be under way: do not save a checkpoint of this state."""
        return self.streak > 0
