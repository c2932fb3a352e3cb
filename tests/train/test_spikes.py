"""Loss spikes (train.spike): the detector against a hand-made series, and the whole rollback
with an injected bad batch — a test-only data source that returns garbage at a chosen step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from megamoe.checkpoint.state import resume
from megamoe.config import compose
from megamoe.parallel.mesh import ProcessGrid
from megamoe.train.loop import train
from megamoe.train.metrics import MetricsLogger
from megamoe.train.spikes import SpikeGuard
from megamoe.train.trainer import Trainer, build_trainer
from tests.pretrain import logged

STEPS, BAD_STEP, BATCH, SEQ = 20, 13, 4, 16


def test_the_guard_waits_for_history_then_trips_after_patience() -> None:
    guard = SpikeGuard(window=5, sigmas=3.0, patience=2)
    for step, loss in enumerate([50.0, 2.0, 2.1, 1.9, 2.0, 2.05], start=1):  # until the window fills, no spike
        assert not guard.observe(step, loss)
    assert not guard.observe(7, 9.0) and guard.suspect and guard.spike_start == 7  # one: patience 2
    assert guard.observe(8, math.nan)  # non-finite counts too: two in a row
    guard.rolled_back()
    assert not guard.suspect and not guard.observe(9, 2.0)
    assert guard.limit() == pytest.approx(np.mean([2.1, 1.9, 2.0, 2.05, 2.0]) + 3 * np.std([2.1, 1.9, 2.0, 2.05, 2.0]))


class CountingWithABadBatch:
    """Sample i is the learnable run i, i + 1, … (mod 7); the samples of global batch ``bad`` are
    uniform noise over the vocabulary, which a model trained on the runs cannot predict."""

    def __init__(self, length: int, seq_len: int, vocab_size: int, bad: int) -> None:
        self.length, self.seq_len, self.vocab_size = length, seq_len, vocab_size
        self.bad = range((bad - 1) * BATCH, bad * BATCH)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> np.ndarray:
        if i in self.bad:
            return np.random.default_rng(i).integers(0, self.vocab_size, self.seq_len + 1)
        return (i + np.arange(self.seq_len + 1)) % 7

    def describe_token(self, i: int, token_id: int) -> str:
        return f"sample {i}"


def _trainer(grid: ProcessGrid, run_dir: Path, *overrides: str) -> Trainer:
    cfg = compose(["+exp=tiny", f"train.global_batch={BATCH}", "train.micro_batch=2", f"train.seq_len={SEQ}",
                   f"train.steps={STEPS}", "train.warmup_steps=2", "train.lr=1e-2", "train.min_lr=1e-3",
                   "train.eval_interval=1000", "checkpoint.interval=5",
                   "checkpoint.keep=5", f"run.dir={run_dir}", "train.spike.window=8", "train.spike.sigmas=4",
                   *overrides])
    trainer = build_trainer(cfg, grid)
    trainer.loader.dataset = CountingWithABadBatch(STEPS * BATCH * 2, SEQ, cfg.model.vocab_size, BAD_STEP)
    return trainer


def _train(trainer: Trainer) -> None:
    cfg = trainer.cfg
    train(trainer, MetricsLogger(Path(cfg.run.dir), True, cfg.logging.wandb, cfg.train.steps,
                                 OmegaConf.to_container(cfg)))


def test_a_bad_batch_is_rolled_back_and_skipped_and_a_resume_reproduces_the_run(grid: ProcessGrid,
                                                                              tmp_path: Path) -> None:
    _train(_trainer(grid, tmp_path / "unguarded"))
    unguarded = {r["step"]: r["loss"] for r in logged(tmp_path / "unguarded")}
    assert unguarded[BAD_STEP] > 2 * unguarded[BAD_STEP - 1]  # the injected batch does spike the loss

    run = tmp_path / "guarded"
    _train(_trainer(grid, run, "train.spike.enabled=true"))
    (event,) = [json.loads(line) for line in (run / "spikes.jsonl").read_text().splitlines()]
    assert event == {"detected_at": BAD_STEP, "spike_start": BAD_STEP, "rolled_back_to": 10,
                     "skipped_samples": [10 * BATCH, BAD_STEP * BATCH]}
    records = logged(run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # one line per step, the spike forgotten
    losses = {r["step"]: r["loss"] for r in records}
    assert losses[BAD_STEP] < 2 * losses[BAD_STEP - 1]  # step 16 again, on the next batch
    consumed = [r["consumed_samples"] for r in records]
    assert consumed[9:12] == [10 * BATCH, 14 * BATCH, 15 * BATCH]  # batches 11-13 skipped

    (run / "checkpoints/latest").write_text("step_15\n")  # roll the run back by hand, to a checkpoint saved after
    resumed = _trainer(grid, run, "train.spike.enabled=true")  # the spike's rollback: it holds the skip
    assert resume(resumed.state) == run / "checkpoints/step_15"
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:15]))
    _train(resumed)
    assert [(r["step"], r["loss"]) for r in logged(run)] == [(r["step"], r["loss"]) for r in records]
