"""Steps whose update was dropped for a non-finite loss or gradient norm (train.on_nonfinite=skip)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megamoe.errors import NonFiniteError
from megamoe.train.callbacks.base import Action
from megamoe.train.step import StepResult


@dataclass
class SkippedSteps:
    """A few isolated skips are harmless; a streak means the run has diverged and will not come
    back by itself, so ``limit`` consecutive skips stop it."""

    limit: int
    steps: list[int] = field(default_factory=list)
    streak: int = 0

    def after_step(self, result: StepResult) -> Optional[Action]:
        self.record(result.step, result.skipped)
        return None

    def record(self, step: int, skipped: bool) -> None:
        self.streak = self.streak + 1 if skipped else 0
        if not skipped:
            return
        self.steps.append(step)
        if self.streak >= self.limit:
            raise NonFiniteError(
                f"train.max_skipped_steps: the last {self.streak} steps ({step - self.streak + 1}-{step}) all had a "
                f"non-finite loss or gradient norm and were skipped; the run has diverged: lower train.lr or "
                f"resume from an earlier checkpoint (checkpoint.resume=PATH)")

    def summary(self) -> str:
        if not self.steps:
            return "no step skipped"
        shown = ", ".join(map(str, self.steps[:20])) + (", ..." if len(self.steps) > 20 else "")
        return f"{len(self.steps)} step(s) skipped for a non-finite loss or gradient norm: {shown}"
