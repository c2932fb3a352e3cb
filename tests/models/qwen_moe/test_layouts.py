"""A checkpoint imported from transformers continues pretraining the same under any layout:
(dp, pp, ep) = (2, 2, 2) on 4 processes and (1, 1, 1) in this one start from it with
``checkpoint.resume=PATH`` and report the same losses, step for step."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from megamoe.checkpoint.state import resume
from megamoe.config import compose
from megamoe.models import validate_config
from megamoe.parallel.mesh import init_grid
from megamoe.train.step import train_step
from megamoe.train.trainer import build_trainer
from tests.dist.launcher import run_distributed

if TYPE_CHECKING:  # the spawned workers import this module: keep transformers out of them
    from tests.models.qwen_moe.conftest import Release

STEPS = 3
TRAIN = ["+exp=qwen_moe_tiny", "train.global_batch=8", "train.micro_batch=1", "train.seq_len=32",
         f"train.steps={STEPS}", "train.warmup_steps=1", "train.lr=3e-3", "train.precision=fp32"]


def losses_from(rank: int, world_size: int, args: tuple[list[str], str]) -> list[float]:
    """Worker: resume from the checkpoint the overrides name, train STEPS steps, return the losses."""
    overrides, run_dir = args
    cfg = compose([*TRAIN, *overrides, f"run.dir={run_dir}"])
    validate_config(cfg, world_size)
    trainer = build_trainer(cfg, init_grid(cfg.parallel.pp, cfg.parallel.ep, timeout_s=60))
    assert resume(trainer.state) is not None and trainer.step == 0
    batches = iter(trainer.loader)
    losses = [train_step(trainer, next(batches)).loss for _ in range(STEPS)]
    torch.distributed.destroy_process_group()
    return losses


@pytest.mark.slow
def test_imported_checkpoint_trains_alike_on_any_layout(release: Release, tmp_path: Path) -> None:
    start = [f"checkpoint.resume={release.checkpoint}"]
    layout = start + ["parallel.pp=2", "parallel.ep=2"]  # with 4 processes: dp 2
    distributed = run_distributed(losses_from, 4, (layout, str(tmp_path / "pp2ep2")), timeout_s=300,
                                  init_process_group=False)
    assert all(losses == distributed[0] for losses in distributed)  # every rank reports the world-reduced loss
    single = losses_from(0, 1, (start, str(tmp_path / "single")))
    assert single[-1] < single[0]  # it trains
    torch.testing.assert_close(distributed[0], single, rtol=1e-5, atol=0)
