"""Checkpoint policy: save every checkpoint.interval steps, at the last step, and on preemption
(then stop, once the save is on disk, in the background or not)."""

from __future__ import annotations

from typing import Optional

from megamoe.checkpoint.saver import CheckpointSaver
from megamoe.train.callbacks.base import Action
from megamoe.train.callbacks.skipped import SkippedSteps
from megamoe.train.callbacks.spike_rollback import SpikeRollback
from megamoe.train.preemption import Preemption
from megamoe.train.step import StepResult
from megamoe.train.trainer import Trainer


class Checkpointing:
    """Not while the latest steps were skipped for non-finite values or look like a loss spike:
    the state may be the one that diverged, and saving it would rotate the good checkpoints out
    (``checkpoint.keep``)."""

    def __init__(self, trainer: Trainer, saver: CheckpointSaver, preemption: Preemption, skipped: SkippedSteps,
                 spikes: Optional[SpikeRollback]) -> None:
        self.trainer, self.saver, self.preemption = trainer, saver, preemption
        self.skipped, self.spikes = skipped, spikes

    def after_step(self, result: StepResult) -> Optional[Action]:
        trainer, step, cfg = self.trainer, result.step, self.trainer.cfg
        trainer.progress.at("preemption check")
        stop = self.preemption.requested(trainer.grid)
        outcome = None
        if stop or step % cfg.checkpoint.interval == 0 or step == cfg.train.steps:
            outcome = self._save(step, wait=stop)
        if stop and trainer.grid.rank == 0:
            print(f"stopping after step {step} on {self.preemption.name()}; {outcome}", flush=True)
        return Action.STOP if stop else None

    def _save(self, step: int, wait: bool) -> str:
        """Save this step unless its state is suspect; what became of it, in words."""
        suspect = self.spikes.guard.suspect if self.spikes is not None else False
        if self.skipped.streak or suspect:
            why = "skipped for non-finite values" if self.skipped.streak else "above the loss-spike limit"
            streak = self.skipped.streak or self.spikes.guard.streak  # type: ignore[union-attr]
            outcome = f"not saved: the last {streak} step(s) were {why}"
            if self.trainer.grid.rank == 0:
                print(f"checkpoint: step {step} {outcome}", flush=True)
            return outcome
        self.trainer.progress.at("checkpoint save")
        saved = self.saver.save()
        if wait:
            saved = saved or self.saver.wait()
        return "the checkpoint is saved" if saved else "no checkpoint was saved (see above)"
