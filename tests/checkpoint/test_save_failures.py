"""Saves that cannot or must not happen: a full disk (a real tmpfs, and an injected ENOSPC where
nothing can be mounted) and a diverged state. What was lost must be nothing: the previous
checkpoint stays ``latest`` and loads, and no partial save is left to fill the disk again."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import pytest
import torch

import megamoe.checkpoint.store as store
from megamoe.checkpoint.state import resume, save_checkpoint
from megamoe.cli import SharedError
from megamoe.config import compose
from megamoe.parallel.mesh import ProcessGrid, init_grid, shutdown
from megamoe.train.loop import Trainer, build_trainer, train_step
from tests.checkpoint.helpers import assert_same_tensors, checkpoint_tensors
from tests.faults import full_disk_writes, small_filesystem

BASE = ["+exp=tiny", "train.global_batch=4", "train.micro_batch=2", "train.seq_len=32", "train.warmup_steps=1"]


@pytest.fixture
def grid() -> Iterator[ProcessGrid]:
    yield init_grid(1, 1, timeout_s=60)
    shutdown()


def _trainer(grid: ProcessGrid, run_dir: Path) -> Trainer:
    return build_trainer(compose([*BASE, f"run.dir={run_dir}"]), grid)


def _step(trainer: Trainer) -> None:
    train_step(trainer, next(iter(trainer.loader)))


def _checkpoint_bytes(ckpt_dir: Path) -> int:
    return sum(p.stat().st_size for p in ckpt_dir.iterdir())


def _assert_nothing_lost(grid: ProcessGrid, run_dir: Path, error: str) -> None:
    """The failed save is gone, ``latest`` still names step 1, and step 1 resumes bit-identically."""
    root = run_dir / "checkpoints"
    assert re.search(r"the disk is full \(needs \d+\.\d MB, [\d.,]+ (k|M|G)?B(ytes)? free\); free space or choose "
                     r"another run.dir; the run stopped, earlier checkpoints are intact$", error), error
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_1"]
    assert (root / "latest").read_text() == "step_1\n"
    resumed = _trainer(grid, run_dir)
    assert resume(resumed.state) == root / "step_1" and resumed.step == 1


def test_a_full_disk_stops_the_save_with_one_line(grid: ProcessGrid, tmp_path: Path) -> None:
    probe = _trainer(grid, tmp_path / "probe")
    _step(probe)  # with optimizer state, as every later save
    size = _checkpoint_bytes(save_checkpoint(probe.state))
    with small_filesystem(tmp_path / "disk", int(1.5 * size)) as disk:  # room for one checkpoint, not two
        trainer = _trainer(grid, disk / "run")
        _step(trainer)
        first = save_checkpoint(trainer.state)
        _step(trainer)
        with pytest.raises(SharedError) as failure:
            save_checkpoint(trainer.state)
        error = str(failure.value)
        assert error.startswith(f"checkpoint: cannot save step 2: {disk}/run/checkpoints/step_2.tmp/")
        assert "cannot write (No space left on device)" in error
        _assert_nothing_lost(grid, disk / "run", error)
        assert_same_tensors(checkpoint_tensors(first), checkpoint_tensors(disk / "run/checkpoints/step_1"))


def test_an_injected_full_disk_names_the_file_it_was_writing(grid: ProcessGrid, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = _trainer(grid, tmp_path / "run")
    _step(trainer)
    size = _checkpoint_bytes(save_checkpoint(trainer.state))
    _step(trainer)
    full_disk_writes(monkeypatch, store, room_bytes=size // 2)
    with pytest.raises(SharedError, match=rf"^checkpoint: cannot save step 2: {tmp_path}/run/checkpoints/step_2.tmp/"
                                          r"\w+-r00000-00000.safetensors: cannot write \(No space left on device\)") \
            as failure:
        save_checkpoint(trainer.state)
    monkeypatch.undo()
    _assert_nothing_lost(grid, tmp_path / "run", str(failure.value))


def test_a_state_with_nan_is_never_saved(grid: ProcessGrid, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    trainer = _trainer(grid, tmp_path / "run")
    _step(trainer)
    assert save_checkpoint(trainer.state) is not None
    bank = trainer.modules[0].model.layers["2"].mlp.experts.w2
    trainer.optimizer.state[bank]["exp_avg_sq"][5, 0, 0] = float("inf")
    trainer.step += 1
    capsys.readouterr()
    assert save_checkpoint(trainer.state) is None
    assert capsys.readouterr().out == ("checkpoint: not saving step 2: exp_avg_sq/layers.2.mlp.experts.5.w2 holds NaN "
                                       "or Inf values (a diverged state cannot be resumed)\n")
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["latest", "step_1"]
    with torch.no_grad():
        trainer.modules[0].model.embed.weight[3, 1] = float("nan")
    assert save_checkpoint(trainer.state) is None
    assert "embed.weight holds NaN" in capsys.readouterr().out
