"""Validation loss per data source (language) every train.eval_interval steps and at the last."""

from __future__ import annotations

from typing import Optional

from megamoe.train.callbacks.base import Action
from megamoe.train.metrics import MetricsLogger
from megamoe.train.step import StepResult, validation_loss
from megamoe.train.trainer import Trainer


class Validation:
    def __init__(self, trainer: Trainer, logger: MetricsLogger) -> None:
        self.trainer, self.logger = trainer, logger

    def after_step(self, result: StepResult) -> Optional[Action]:
        t = self.trainer.cfg.train
        if self.trainer.valid and (result.step % t.eval_interval == 0 or result.step == t.steps):
            self.logger.log_eval(result.step, validation_loss(self.trainer))
        return None
