"""The training loop: start the process group, build this rank's trainer, resume, run steps.

A step is megamoe.train.step.train_step; what happens around it (metrics, rollback, skipped
steps, validation, downstream scores, checkpoints and preemption) is one callback each
(megamoe.train.callbacks), called in turn with the step's result.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path
from typing import Any, Optional, cast

from omegaconf import DictConfig, OmegaConf

from megamoe.checkpoint.state import resume
from megamoe.parallel.mesh import ProcessGrid, init_grid, shutdown
from megamoe.parallel.stall import CollectiveStall, announce, diagnose, is_communication_failure
from megamoe.train.callbacks.base import Action, Callback
from megamoe.train.callbacks.checkpointing import Checkpointing
from megamoe.train.callbacks.downstream import DownstreamScores
from megamoe.train.callbacks.metrics import StepMetrics
from megamoe.train.callbacks.skipped import SkippedSteps
from megamoe.train.callbacks.spike_rollback import SpikeRollback
from megamoe.train.callbacks.validation import Validation
from megamoe.train.metrics import MetricsLogger, forget_steps_after
from megamoe.train.run_dir import claim_run_dir
from megamoe.train.spikes import SpikeGuard
from megamoe.train.step import StepResult, train_step
from megamoe.train.trainer import Trainer, build_trainer


def run(cfg: DictConfig) -> None:
    """Train for cfg.train.steps steps with the layout of cfg.parallel on the launched processes."""
    grid = init_grid(cfg.parallel.pp, cfg.parallel.ep, cfg.parallel.collective_timeout_s, cfg.parallel.backend)
    announce(grid.rank, grid.world_size)
    stalled = False
    try:
        _train(cfg, grid)
    except CollectiveStall:
        stalled = True  # the group is broken: tearing it down could block on the missing rank
        raise
    finally:
        if not stalled:
            shutdown()


def _train(cfg: DictConfig, grid: ProcessGrid) -> None:
    lock = claim_run_dir(cfg, grid)
    try:
        trainer = build_trainer(cfg, grid)
        resume(trainer.state)
        if grid.rank == 0:
            forget_steps_after(Path(cfg.run.dir), trainer.step)
        logger = MetricsLogger(Path(cfg.run.dir), grid.rank == 0, cfg.logging.wandb, cfg.train.steps,
                               cast(dict[str, Any], OmegaConf.to_container(cfg)))
        try:
            train(trainer, logger)
        except Exception as exc:
            if grid.world_size == 1 or not is_communication_failure(exc):
                raise
            timeout_s = cfg.parallel.collective_timeout_s
            raise diagnose(grid.rank, grid.world_size, trainer.progress, timeout_s, exc) from exc
        logger.finish()
    finally:
        if lock is not None:
            lock.close()


def build_callbacks(trainer: Trainer, logger: MetricsLogger) -> tuple[StepMetrics, SkippedSteps, Checkpointing,
                                                                     list[Callback]]:
    """The callbacks of a run in the order they run after each step; also apart: the metrics
    (which decide what a step reports), the skipped steps and the checkpointing (which the end
    of the run reads)."""
    spike = trainer.cfg.train.spike
    metrics, skipped = StepMetrics(trainer, logger), SkippedSteps(trainer.cfg.train.max_skipped_steps)
    guard = SpikeGuard(spike.window, spike.sigmas, spike.patience) if spike.enabled else None
    checkpointing = Checkpointing(trainer, skipped, guard)
    rollback = [SpikeRollback(trainer, logger, guard, checkpointing.wait)] if guard is not None else []
    callbacks: list[Callback] = [metrics, *rollback, skipped, Validation(trainer, logger),
                                 DownstreamScores(trainer, logger), checkpointing]
    return metrics, skipped, checkpointing, callbacks


def _after_step(callbacks: list[Callback], result: StepResult) -> Optional[Action]:
    """Each callback in turn, until one asks for an action."""
    for callback in callbacks:
        if (action := callback.after_step(result)) is not None:
            return action
    return None


def train(trainer: Trainer, logger: MetricsLogger) -> None:
    """Train until cfg.train.steps (or a preemption signal), the callbacks after every step."""
    cfg = trainer.cfg
    first_step, started = trainer.step + 1, time.perf_counter()
    metrics, skipped, checkpointing, callbacks = build_callbacks(trainer, logger)
    with checkpointing:  # stop signals; at the end, the background save is settled (or abandoned on a failure)
        batches = iter(trainer.loader)
        while trainer.step < cfg.train.steps:
            result = train_step(trainer, next(batches), report_routing=metrics.reports_routing(trainer.step + 1))
            action = _after_step(callbacks, result)
            if action is Action.REWOUND:
                batches = iter(trainer.loader)  # from the position the rewind left
            elif action is Action.STOP:
                break
    if trainer.grid.rank == 0 and trainer.step >= first_step:
        took = datetime.timedelta(seconds=round(time.perf_counter() - started))
        print(f"trained steps {first_step}-{trainer.step} of {cfg.train.steps} in {took}; {skipped.summary()}"
              f"{checkpointing.summary(trainer.step)}", flush=True)
    checkpointing.check_last(trainer.step)
