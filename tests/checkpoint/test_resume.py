"""Save / resume in one process: bit-identical continuation, fallback from damaged checkpoints,
model-only checkpoints, resume=none, retention."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from megamoe.checkpoint import iter_model_tensors, model_tensor_shapes, write_model_checkpoint
from megamoe.checkpoint.saver import save_checkpoint
from megamoe.checkpoint.state import load_checkpoint, resume
from megamoe.config import compose
from megamoe.errors import CheckpointError, SharedError
from megamoe.parallel.mesh import ProcessGrid, init_grid, shutdown
from megamoe.train.step import train_step
from megamoe.train.trainer import Trainer, build_trainer
from tests.checkpoint.helpers import assert_same_tensors, checkpoint_tensors
from tests.data.helpers import blend_overrides

# noisy gating draws from the global RNG and the aux-free bias is a buffer: both must come back.
BASE = ["+exp=tiny", "train.global_batch=4", "train.micro_batch=2", "train.seq_len=32", "train.steps=6",
        "train.warmup_steps=1", "moe.noisy_gating=true", "moe.aux_free_bias=true", "moe.aux_loss_coeff=0.01"]


@pytest.fixture
def grid() -> Iterator[ProcessGrid]:
    yield init_grid(1, 1, timeout_s=60)
    shutdown()


def _trainer(grid: ProcessGrid, run_dir: Path, *overrides: str) -> Trainer:
    return build_trainer(compose([*BASE, f"run.dir={run_dir}", *overrides]), grid)


def _train(trainer: Trainer, steps: int, save_at: tuple[int, ...] = ()) -> list[float]:
    """Run ``steps`` more steps (continuing the loader's position), saving after the listed ones."""
    batches = iter(trainer.loader)
    losses = []
    for _ in range(steps):
        losses.append(train_step(trainer, next(batches)).loss)
        if trainer.step in save_at:
            save_checkpoint(trainer.state)
    return losses


def test_resume_continues_bit_identically(grid: ProcessGrid, tmp_path: Path) -> None:
    torch.manual_seed(0)
    uninterrupted = _trainer(grid, tmp_path / "a")
    losses = _train(uninterrupted, 5, save_at=(2, 5))
    rng_after = torch.get_rng_state()

    torch.manual_seed(123)  # the resumed process starts from other RNG states; the checkpoint restores them
    resumed = _trainer(grid, tmp_path / "b")
    load_checkpoint(resumed.state, tmp_path / "a/checkpoints/step_2")
    assert resumed.step == 2 and resumed.loader.consumed_samples == 2 * 4
    assert _train(resumed, 3, save_at=(5,)) == losses[2:]
    assert torch.equal(torch.get_rng_state(), rng_after)
    assert_same_tensors(checkpoint_tensors(tmp_path / "b/checkpoints/step_5"),
                        checkpoint_tensors(tmp_path / "a/checkpoints/step_5"))
    moe = resumed.modules[0].model.layers["0"].mlp
    assert moe.expert_bias.abs().sum() > 0  # the buffer really moved, so the comparison covered it


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_auto_falls_back_past_damaged_checkpoints(grid: ProcessGrid, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _train(_trainer(grid, tmp_path, "checkpoint.keep=3"), 4, save_at=(1, 2, 3, 4))
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_2", "step_3", "step_4"]  # keep-last-3
    (root / "step_5.tmp").mkdir()  # a crash during the next save: ignored
    (root / "step_5.tmp/model-r00000-00000.safetensors").write_bytes(b"partial")
    _corrupt(root / "step_4/optim-r00000-00000.safetensors")
    (root / "step_3/model-r00000-00000.safetensors").unlink()
    capsys.readouterr()

    trainer = _trainer(grid, tmp_path)
    assert resume(trainer.state) == root / "step_2" and trainer.step == 2
    out = capsys.readouterr().out.splitlines()
    assert f"checkpoint: {root}/step_4/optim-r00000-00000.safetensors: CRC-32 mismatch" in out[0]
    assert out[1] == "checkpoint: step_4 is unusable; falling back to the previous checkpoint"
    assert out[2].startswith(f"checkpoint: {root}/step_3/model-r00000-00000.safetensors: file is missing")
    assert out[4] == f"checkpoint: resumed from {root}/step_2 at step 2"

    torch.manual_seed(0)
    reference = _trainer(grid, tmp_path / "ref")
    _train(reference, 2)
    assert_same_tensors(checkpoint_tensors(root / "step_2"), checkpoint_tensors(save_checkpoint(reference.state)))


def test_named_damaged_checkpoint_is_an_error_and_all_damaged_is_too(grid: ProcessGrid, tmp_path: Path) -> None:
    _train(_trainer(grid, tmp_path), 2, save_at=(1, 2))
    root = tmp_path / "checkpoints"
    _corrupt(root / "step_2/model-r00000-00000.safetensors")
    with pytest.raises(CheckpointError, match=f"^{root}/step_2/model-r00000-00000.safetensors: CRC-32 mismatch"):
        resume(_trainer(grid, tmp_path, f"checkpoint.resume={root}/step_2").state)
    (root / "step_1/manifest.json").write_text("{")
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints loads"):
        resume(_trainer(grid, tmp_path).state)


def test_resume_none_starts_fresh(grid: ProcessGrid, tmp_path: Path) -> None:
    _train(_trainer(grid, tmp_path), 1, save_at=(1,))
    trainer = _trainer(grid, tmp_path, "checkpoint.resume=none")
    assert resume(trainer.state) is None and trainer.step == 0


def test_model_only_checkpoint_starts_at_step_zero(grid: ProcessGrid, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    trained = _trainer(grid, tmp_path / "a")
    _train(trained, 2)
    source = save_checkpoint(trained.state)
    cfg = trained.cfg
    write_model_checkpoint(tmp_path / "weights", iter_model_tensors(source), cfg)

    trainer = _trainer(grid, tmp_path / "b", f"checkpoint.resume={tmp_path / 'weights'}")
    capsys.readouterr()
    assert resume(trainer.state) == tmp_path / "weights"
    assert "holds model weights only: starting at step 0 with a fresh optimizer" in capsys.readouterr().out
    assert trainer.step == 0 and trainer.loader.consumed_samples == 0 and not trainer.optimizer.state
    model = trainer.modules[0].model
    assert torch.equal(model.layers["1"].mlp.experts.w2, trained.modules[0].model.layers["1"].mlp.experts.w2)
    assert torch.equal(model.embed.weight, trained.modules[0].model.embed.weight)


def test_checkpoint_of_another_model_is_refused(grid: ProcessGrid, tmp_path: Path) -> None:
    _train(_trainer(grid, tmp_path), 1, save_at=(1,))
    shutil.copytree(tmp_path / "checkpoints/step_1", tmp_path / "copy")
    with pytest.raises(CheckpointError, match=r"tensor layers\.4\..* is missing"):
        load_checkpoint(_trainer(grid, tmp_path / "b", "model.num_layers=6").state, tmp_path / "copy")
    with pytest.raises(CheckpointError, match=r"embed\.weight has shape \[512, 64\], the configured model needs \[640, 64\]"):
        load_checkpoint(_trainer(grid, tmp_path / "c", "model.vocab_size=640").state, tmp_path / "copy")


def test_tensors_are_stored_under_single_process_names(grid: ProcessGrid, tmp_path: Path) -> None:
    """The reference, from the definition: a one-process model's state_dict, banks split per expert."""
    trainer = _trainer(grid, tmp_path, "model.tie_embeddings=false")
    _train(trainer, 1)
    stored = checkpoint_tensors(save_checkpoint(trainer.state))
    model = trainer.modules[0].model
    expected: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name.endswith((".mlp.experts.w1", ".mlp.experts.w2")):
            prefix, weight = name.rsplit(".", 1)
            expected.update({f"{prefix}.{e}.{weight}": tensor[e] for e in range(tensor.shape[0])})
        else:
            expected[name] = tensor
    bank = model.layers["1"].mlp.experts.w2
    for key in ("exp_avg", "exp_avg_sq"):
        expected[f"{key}/layers.1.mlp.experts.6.w2"] = trainer.optimizer.state[bank][key][6]
        expected[f"{key}/lm_head.weight"] = trainer.optimizer.state[model.lm_head.weight][key]
    assert "lm_head.weight" in expected and "layers.0.mlp.expert_bias" in expected
    assert {n for n in stored if "/" not in n} == {n for n in expected if "/" not in n} == set(model_tensor_shapes(trainer.cfg))
    assert_same_tensors({n: stored[n] for n in expected}, expected)


def test_a_changed_global_batch_continues_at_the_same_sample(grid: ProcessGrid, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    """Megatron's rule: the next step starts at the consumed-sample count; nothing is repeated or skipped."""
    data = blend_overrides(tmp_path / "data")
    first = _trainer(grid, tmp_path / "run", *data)
    _train(first, 2, save_at=(2,))
    resumed = _trainer(grid, tmp_path / "run", *data, "train.global_batch=8")
    capsys.readouterr()
    resume(resumed.state)
    assert "checkpoint: train.global_batch changed from 4 to 8: continuing at sample 8 of the same stream" in \
        capsys.readouterr().out
    next_batch = next(iter(resumed.loader))
    read = torch.cat([torch.cat([mb["tokens"], mb["labels"][:, -1:]], dim=1) for mb in next_batch])
    assert torch.equal(read, torch.from_numpy(np.stack([first.loader.dataset[i] for i in range(8, 16)])))


def test_a_changed_sample_stream_is_refused_unless_allowed(grid: ProcessGrid, tmp_path: Path) -> None:
    data = blend_overrides(tmp_path / "data")
    _train(_trainer(grid, tmp_path / "run", *data), 2, save_at=(2,))
    with pytest.raises(SharedError, match=r"step_2: the training data stream changed since this checkpoint "
                                          r"\(train.seq_len: 32 → 16\).*checkpoint.allow_data_change=true to continue "
                                          r"at sample 8 of the new stream$"):
        resume(_trainer(grid, tmp_path / "run", *data, "train.seq_len=16").state)
    allowed = _trainer(grid, tmp_path / "run", *data, "train.seq_len=16", "checkpoint.allow_data_change=true")
    resume(allowed.state)
    assert allowed.step == 2 and allowed.loader.consumed_samples == 8
