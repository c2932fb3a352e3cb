"""A run's checkpoints, seen from the loop: when to save, how a stop signal ends the run, and
what the end of the run says about them.

A save happens every ``checkpoint.interval`` steps, at the last step, and when the run is told
to stop (SIGTERM / SIGUSR1: megamoe.train.preemption); then the run stops once the save is on disk.
A save that fails mid-run is retried at the next interval (``checkpoint.on_error=continue``),
but the last save of the run — at the end, or on a stop signal — has no next interval: if it
fails, the run ends with an error (exit code 2), after the summary line has said which steps
are in no checkpoint. Nothing is lost without saying so.

When the run ends with an exception, a background save in progress is waited for only if every
rank is known to be healthy (a SharedError, agreed between the ranks); otherwise — a failed
collective, a rank that died, Ctrl-C, a bug — it is abandoned at once, so that the stall report
and the process exit are not held up by a save that may never finish (``latest`` stays on the
previous checkpoint; the next start removes the partial files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megamoe.checkpoint.saver import CheckpointSaver
from megamoe.errors import Interrupted, SharedError
from megamoe.train.callbacks.base import Action
from megamoe.train.callbacks.skipped import SkippedSteps
from megamoe.train.preemption import Preemption
from megamoe.train.spikes import SpikeGuard
from megamoe.train.step import StepResult
from megamoe.train.trainer import Trainer


class Checkpointing:
    """The saves of one run (collective: every rank makes the same calls), as a context manager
    around the training steps: it installs the stop-signal handler and settles, or abandons, the
    save in progress when the steps end (module docstring)."""

    def __init__(self, trainer: Trainer, skipped: SkippedSteps, spikes: Optional[SpikeGuard]) -> None:
        self.trainer, self.skipped, self.spikes = trainer, skipped, spikes
        self.state = state = trainer.state
        self.saver = CheckpointSaver(state)
        self.preemption = Preemption(self.saver.stopping)
        self.saved_step = state.step  # the newest step a checkpoint holds (the one resumed from; 0 on a fresh start)
        self.failed: list[int] = []  # saves that failed since then
        self._pending: Optional[int] = None  # the step of the background save in progress

    def __enter__(self) -> "Checkpointing":
        self.preemption.__enter__()
        return self

    def __exit__(self, kind: Optional[type], exc: Optional[BaseException], traceback: object) -> None:
        try:  # the stop-signal handler stays until the save is settled: a launcher's SIGTERM meanwhile must not kill
            self._end_saves(exc)  # the process before it removes a given-up save's partial files
        finally:
            self.preemption.__exit__()

    def _end_saves(self, exc: Optional[BaseException]) -> None:
        if exc is None:
            self.wait()  # a save in the background ends before the run does
        elif isinstance(exc, SharedError):  # every rank is healthy and ends here: the save can finish
            try:
                self.wait()
            except Exception:  # noqa: BLE001 - the error the run ends with is the one to report
                pass
        else:
            unfinished = self._abandon()
            if isinstance(exc, KeyboardInterrupt):
                latest = f"the latest checkpoint is step_{self.saved_step}" if self.saved_step else "no checkpoint yet"
                line = f"interrupted (Ctrl-C) after step {self.state.step}; {latest}"
                raise Interrupted(line + (f" (the background save of step {unfinished} was not completed)"
                                          if unfinished else "")) from None

    def _abandon(self) -> Optional[int]:
        """Give the background save in progress up (:meth:`CheckpointSaver.abandon`); the step it
        was saving if it was not completed."""
        step, self._pending = self._pending, None
        if step is None:
            return None
        self._record(step, self.saver.abandon())
        return None if self.saved_step == step else step

    def wait(self, last: bool = False) -> None:
        """Finish the background save in progress, if any, and record how it ended (``last``: it
        turned out to be the run's last save)."""
        if self._pending is not None:
            saved = self.saver.wait(last)  # Ctrl-C while it waits leaves the save pending: the exit abandons it
            step, self._pending = self._pending, None
            self._record(step, saved)

    def _record(self, step: int, saved: Optional[Path]) -> None:
        if saved is not None:
            self.saved_step, self.failed = step, []
        else:
            self.failed.append(step)

    def _save(self, step: int, last: bool) -> None:
        self.wait()
        if self.saver.background:
            self._pending = step  # before the writer starts: a Ctrl-C from here on abandons it
            self.saver.save(last)
        else:
            self._record(step, self.saver.save(last))

    def after_step(self, result: StepResult) -> Optional[Action]:
        """Save every checkpoint.interval steps, at the last step, and on preemption (then: stop,
        once the save is on disk, in the background or not).

        Not while the latest steps were skipped for non-finite values or look like a loss spike: the
        state may be the one that diverged, and saving it would rotate the good checkpoints out
        (``checkpoint.keep``). A stop signal that arrives during the save stops the run after it.
        """
        trainer, skipped, spikes = self.trainer, self.skipped, self.spikes
        step, cfg, grid = trainer.step, trainer.cfg, trainer.grid
        trainer.progress.at("preemption check")
        stop = self.preemption.requested(grid)
        outcome = ""
        if stop or step % cfg.checkpoint.interval == 0 or step == cfg.train.steps:
            if skipped.streak or (spikes is not None and spikes.suspect):
                why = "skipped for non-finite values" if skipped.streak else "above the loss-spike limit"
                streak = skipped.streak or (spikes.streak if spikes is not None else 0)
                outcome = f"not saved: the last {streak} step(s) were {why}"
                if grid.rank == 0:
                    print(f"checkpoint: step {step} {outcome}", flush=True)
            else:
                trainer.progress.at("checkpoint save")
                self._save(step, last=stop or step == cfg.train.steps)
                if not stop:
                    trainer.progress.at("preemption check")
                    stop = self.preemption.requested(grid)  # a signal during the save: this step's checkpoint is it
                if stop:
                    self.wait(last=True)
                saved = self.saved_step == step
                outcome = "the checkpoint is saved" if saved else "no checkpoint was saved (see above)"
        if stop and grid.rank == 0:
            print(f"stopping after step {step} on {self.preemption.name()}; {outcome}", flush=True)
        return Action.STOP if stop else None

    def summary(self, step: int) -> str:
        """For the run's last line: the steps no checkpoint holds, if any (the run ended at ``step``)."""
        if self.saved_step >= step:
            return ""
        notes = [f"latest: step_{self.saved_step}"] if self.saved_step else []
        if self.failed:
            steps = ", ".join(map(str, self.failed))
            notes.append(f"the save{'s of steps' if len(self.failed) > 1 else ' of step'} {steps} failed")
        said = f" ({'; '.join(notes)})" if notes else ""
        return f"; steps {self.saved_step + 1}-{step} are in no checkpoint{said}"

    def check_last(self, step: int) -> None:
        """After the summary: the run ends with an error if its last save failed (nothing retries it)."""
        if self.failed and self.failed[-1] == step and self.saved_step < step:
            latest = f"latest is step_{self.saved_step}" if self.saved_step else "there is no checkpoint"
            raise SharedError(f"checkpoint: the last save of the run (step {step}) failed and no later save retries "
                              f"it: steps {self.saved_step + 1}-{step} are in no checkpoint, {latest} (see the ERROR "
                              "above); fix the cause and resume to redo them")
