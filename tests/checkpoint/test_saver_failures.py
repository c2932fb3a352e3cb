"""Saves that cannot or must not happen: a full disk (a real tmpfs, and an injected ENOSPC where
nothing can be mounted) and a diverged state. What was lost must be nothing: the previous
checkpoint stays ``latest`` and loads, and no partial save is left to fill the disk again."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import megamoe.checkpoint.store as store
from megamoe.checkpoint.saver import CheckpointSaver, save_checkpoint
from megamoe.checkpoint.state import placements, resume, written_names
from megamoe.config import compose
from megamoe.errors import SharedError
from megamoe.parallel.mesh import ProcessGrid, init_grid
from megamoe.train.step import train_step
from megamoe.train.trainer import Trainer, build_trainer
from tests.checkpoint.helpers import assert_same_tensors, checkpoint_tensors, wait_until
from tests.dist.launcher import run_distributed
from tests.faults import full_disk_writes, small_filesystem

BASE = ["+exp=tiny", "train.global_batch=4", "train.micro_batch=2", "train.seq_len=32", "train.warmup_steps=1"]


def _trainer(grid: ProcessGrid, run_dir: Path, *overrides: str) -> Trainer:
    return build_trainer(compose([*BASE, f"run.dir={run_dir}", *overrides]), grid)


def _step(trainer: Trainer) -> None:
    train_step(trainer, next(iter(trainer.loader)))


def _checkpoint_bytes(ckpt_dir: Path) -> int:
    return sum(p.stat().st_size for p in ckpt_dir.iterdir())


FULL = r"the disk is full \(needs \d+\.\d MB, [\d.,]+ (k|M|G)?B(ytes)? free\); free space or choose another run.dir; "


def _assert_nothing_lost(grid: ProcessGrid, run_dir: Path) -> None:
    """The failed save is gone, ``latest`` still names step 1, and step 1 resumes."""
    root = run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_1"]
    assert (root / "latest").read_text() == "step_1\n"
    resumed = _trainer(grid, run_dir)
    assert resume(resumed.state) == root / "step_1" and resumed.step == 1


def test_a_full_disk_with_on_error_stop_stops_the_run_with_one_line(grid: ProcessGrid, tmp_path: Path) -> None:
    probe = _trainer(grid, tmp_path / "probe")
    _step(probe)  # with optimizer state, as every later save
    size = _checkpoint_bytes(save_checkpoint(probe.state))
    with small_filesystem(tmp_path / "disk", int(1.5 * size)) as disk:  # room for one checkpoint, not two
        trainer = _trainer(grid, disk / "run", "checkpoint.on_error=stop")
        _step(trainer)
        first = save_checkpoint(trainer.state)
        _step(trainer)
        with pytest.raises(SharedError) as failure:
            save_checkpoint(trainer.state)
        error = str(failure.value)
        assert error.startswith(f"checkpoint: cannot save step 2: {disk}/run/checkpoints/step_2.tmp/")
        assert "cannot write (No space left on device)" in error
        assert re.search(FULL + "the run stopped \\(checkpoint.on_error=stop\\), earlier checkpoints are intact$",
                         error)
        _assert_nothing_lost(grid, disk / "run")
        assert_same_tensors(checkpoint_tensors(first), checkpoint_tensors(disk / "run/checkpoints/step_1"))


def test_a_full_disk_by_default_is_said_loudly_and_training_goes_on(grid: ProcessGrid, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """checkpoint.on_error=continue (the default), with ENOSPC injected where nothing can be mounted:
    the save fails naming the file it was writing, the run goes on, and the next save succeeds."""
    trainer = _trainer(grid, tmp_path / "run")
    _step(trainer)
    size = _checkpoint_bytes(save_checkpoint(trainer.state))
    _step(trainer)
    full_disk_writes(monkeypatch, store, room_bytes=size // 2)
    capsys.readouterr()
    assert save_checkpoint(trainer.state) is None
    (line,) = capsys.readouterr().out.splitlines()
    assert re.fullmatch(rf"checkpoint: ERROR: cannot save step 2: {tmp_path}/run/checkpoints/step_2.tmp/"
                        r"\w+-r00000-00000\.safetensors: cannot write \(No space left on device\): "
                        + FULL + r"training goes on \(checkpoint.on_error=continue\), the next interval tries again; "
                        r"earlier checkpoints are intact",
                        line), line
    monkeypatch.undo()
    _assert_nothing_lost(grid, tmp_path / "run")
    _step(trainer)
    assert save_checkpoint(trainer.state) == tmp_path / "run/checkpoints/step_3"  # the retry works


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


def test_a_background_save_returns_at_once_and_holds_the_state_of_its_step(grid: ProcessGrid, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """checkpoint.async: the step's state is copied, training changes the weights meanwhile, and the
    checkpoint still equals an in-place save of that step; ``latest`` moves only when it is written."""
    from megamoe.checkpoint import saver as saver_module
    reference = _trainer(grid, tmp_path / "in_place")
    _step(reference)
    expected = checkpoint_tensors(save_checkpoint(reference.state))

    trainer = _trainer(grid, tmp_path / "background", "checkpoint.async=true")
    _step(trainer)
    slow_write, writer_niceness = saver_module.write_shards, []

    def write_slowly(*args: object, **kwargs: object) -> object:
        writer_niceness.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        time.sleep(1.0)
        return slow_write(*args, **kwargs)

    monkeypatch.setattr(saver_module, "write_shards", write_slowly)
    saver = CheckpointSaver(trainer.state)
    started = time.perf_counter()
    assert saver.save() is None and time.perf_counter() - started < 0.5  # training resumes at once
    assert saver.writing and not (tmp_path / "background/checkpoints/latest").exists()  # not before it is written
    _step(trainer)  # the weights move on while the snapshot is written
    path = saver.wait()
    assert not saver.writing
    if sys.platform == "linux":  # the writer yields the CPU to training; training's priority is untouched
        training = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        assert writer_niceness[0] == min(19, training + saver_module.WRITER_NICENESS)
    assert path == tmp_path / "background/checkpoints/step_1"
    assert (tmp_path / "background/checkpoints/latest").read_text() == "step_1\n"
    assert_same_tensors(checkpoint_tensors(path), expected)


def test_an_abandoned_save_whose_writer_is_stuck_leaves_no_partial_files(grid: ProcessGrid, tmp_path: Path,
                                                                          stuck_checkpoint_writer: threading.Event
                                                                          ) -> None:
    """The run gives a background save up while its writer is blocked in a write (a loaded
    machine, a slow file system): after ABANDON_WAIT_S rank 0 removes step_N.tmp itself,
    ``latest`` is not touched, and until the writer ends the process knows not to finalize."""
    from megamoe.checkpoint import saver as saver_module
    trainer = _trainer(grid, tmp_path, "checkpoint.async=true")
    _step(trainer)
    saver = CheckpointSaver(trainer.state)
    saver.save()
    tmp = tmp_path / "checkpoints" / "step_1.tmp"
    wait_until(tmp.exists, 10, "the writer's start")
    assert saver.abandon() is None
    assert not tmp.exists() and not (tmp_path / "checkpoints" / "latest").exists()
    assert saver_module.save_threads_running()  # so the process ends without finalizing
    stuck_checkpoint_writer.set()
    wait_until(lambda: not saver_module.save_threads_running(), 30, "the released writer's end")


def test_a_background_save_of_a_state_with_nan_is_not_made(grid: ProcessGrid, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    """checkpoint.async checks for NaN / Inf like an in-place save: nothing is written, one line says why."""
    trainer = _trainer(grid, tmp_path / "run", "checkpoint.async=true")
    _step(trainer)
    bank = trainer.modules[0].model.layers["2"].mlp.experts.w2
    trainer.optimizer.state[bank]["exp_avg_sq"][5, 0, 0] = float("inf")
    saver = CheckpointSaver(trainer.state)
    capsys.readouterr()
    assert saver.save() is None and saver.wait() is None
    assert capsys.readouterr().out == ("checkpoint: not saving step 1: exp_avg_sq/layers.2.mlp.experts.5.w2 holds NaN "
                                       "or Inf values (a diverged state cannot be resumed)\n")
    assert not (tmp_path / "run/checkpoints").exists() or not any((tmp_path / "run/checkpoints").iterdir())


def _save_with_nan_in_rank1_share(rank: int, world_size: int, run_dir: Path) -> tuple[bool, bool, str]:
    """Worker (dp 2): rank 1 puts an Inf into AdamW state that only it writes, then both save."""
    trainer = _trainer(init_grid(1, 1, timeout_s=60), run_dir, "checkpoint.async=true")
    _step(trainer)
    if rank == 1:
        places = placements(trainer.state)
        bank = trainer.modules[0].model.layers["2"].mlp.experts.w2
        place = next(place for place in places if place.tensor is bank)
        expert = next(i for i, name in enumerate(place.names) if name in written_names(places, trainer.state.grid))
        trainer.optimizer.state[bank]["exp_avg_sq"][expert, 0, 0] = float("inf")
    saver, out = CheckpointSaver(trainer.state), io.StringIO()
    with contextlib.redirect_stdout(out):
        nothing_now, nothing_later = saver.save() is None, saver.wait() is None
    return nothing_now, nothing_later, out.getvalue()


def test_a_background_save_is_refused_on_every_rank_when_one_share_holds_nan(tmp_path: Path) -> None:
    """Each background writer checks the copy it writes; one rank's finding cancels the save for all."""
    results = run_distributed(_save_with_nan_in_rank1_share, 2, tmp_path / "run")
    assert [r[:2] for r in results] == [(True, True), (True, True)]
    assert re.fullmatch(r"checkpoint: not saving step 1: exp_avg_sq/layers\.2\.mlp\.experts\.\d\.w2 holds NaN or Inf "
                        r"values \(a diverged state cannot be resumed\)\n", results[0][2]), results[0][2]
    assert results[1][2] == ""  # said once, by rank 0
    assert not any((tmp_path / "run/checkpoints").iterdir())
