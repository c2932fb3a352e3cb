"""Loss-spike rollback (train.spike, megamoe.train.spikes): back to the checkpoint before the
spike, past the batches read since it."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from megamoe.checkpoint.state import checkpoint_before, load_checkpoint
from megamoe.errors import SharedError
from megamoe.train.callbacks.base import Action
from megamoe.train.metrics import MetricsLogger, forget_steps_after
from megamoe.train.spikes import SpikeGuard
from megamoe.train.step import StepResult
from megamoe.train.trainer import Trainer


class SpikeRollback:
    def __init__(self, trainer: Trainer, logger: MetricsLogger, guard: SpikeGuard,
                 wait_for_save: Callable[[], None]) -> None:
        self.trainer, self.logger, self.guard, self.wait_for_save = trainer, logger, guard, wait_for_save
        self.rollbacks = 0

    def after_step(self, result: StepResult) -> Optional[Action]:
        if not self.guard.observe(result.step, result.loss):
            return None
        self.rollbacks += 1
        self.wait_for_save()  # a save in flight ends before the state goes back
        self.roll_back()
        return Action.REWOUND

    def roll_back(self) -> None:
        """Load the newest checkpoint from before the spike and move the data past every batch read
        since it (plus train.spike.skip_batches more); the run then goes on from there (collective)."""
        trainer, guard = self.trainer, self.guard
        cfg, state = trainer.cfg, trainer.state
        spike, detected_at, read_to = cfg.train.spike, trainer.step, trainer.loader.consumed_samples
        if self.rollbacks > spike.max_rollbacks:
            raise SharedError(f"train.spike.max_rollbacks: loss spike at step {detected_at} "
                              f"after {spike.max_rollbacks} rollbacks in this run: it is not one bad batch; "
                              "lower train.lr or inspect the data")
        assert guard.spike_start is not None  # observe() called for a rollback: a spike is running
        target = checkpoint_before(state, guard.spike_start)
        if target is None:
            raise SharedError(f"train.spike: loss spike at step {detected_at}, but no checkpoint before step "
                              f"{guard.spike_start} to roll back to; save more often (checkpoint.interval)")
        load_checkpoint(state, target)
        skip_to = read_to + spike.skip_batches * cfg.train.global_batch
        skipped_from = trainer.loader.consumed_samples
        trainer.loader.consumed_samples = skip_to
        spike_start = guard.spike_start
        guard.rolled_back()
        if trainer.grid.rank == 0:
            forget_steps_after(Path(cfg.run.dir), trainer.step)
        self.logger.log_event(
            "spikes", {"detected_at": detected_at, "spike_start": spike_start, "rolled_back_to": trainer.step,
                       "skipped_samples": [skipped_from, skip_to]},
            f"loss spike at step {detected_at}: rolled back to step {trainer.step} ({target.name}) and skipped samples "
            f"{skipped_from}-{skip_to} ({(skip_to - skipped_from) // cfg.train.global_batch} batches)")
