"""Downstream task scores every eval.downstream_interval steps and at the last (megamoe.train.downstream)."""

from __future__ import annotations

from typing import Optional

from megamoe.train.callbacks.base import Action
from megamoe.train.downstream import DownstreamEval
from megamoe.train.metrics import MetricsLogger
from megamoe.train.step import StepResult
from megamoe.train.trainer import Trainer


class DownstreamScores:
    def __init__(self, trainer: Trainer, logger: MetricsLogger) -> None:
        self.trainer, self.logger = trainer, logger
        self.downstream = DownstreamEval(trainer.cfg)  # reads the task files now: a bad one stops the run before step 1

    def after_step(self, result: StepResult) -> Optional[Action]:
        if self.downstream.due(result.step):
            self.logger.log_downstream(result.step, self.downstream.run(self.trainer))
        return None
