"""What a callback is, and what it can ask of the loop."""

from __future__ import annotations

import enum
from typing import Optional, Protocol

from megamoe.train.step import StepResult


class Action(enum.Enum):
    """What a callback asks the loop to do instead of going on to the next callback."""

    REWOUND = "rewound"  # the state went back to a checkpoint: read the data again from the loader's position
    STOP = "stop"  # end the run after this step (a preemption, once its checkpoint is saved)


class Callback(Protocol):
    def after_step(self, result: StepResult) -> Optional[Action]:
        """React to a finished step (collective where it communicates: every rank calls it alike)."""
