"""Save / resume in one process: bit-identical continuation (AdamW, Muon, bf16 optimizer state),
fallback from damaged checkpoints, model-only checkpoints, resume=none, retention, and the
changes a resume refuses (optimizer, state dtype, sample stream)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from megamoe.checkpoint import iter_model_tensors, model_tensor_shapes, write_model_checkpoint
from megamoe.checkpoint.saver import save_checkpoint
from megamoe.checkpoint.state import OPTIMIZER_KIND, checkpoint_before, load_checkpoint, resume
from megamoe.checkpoint.store import complete_checkpoints, read_manifest
from megamoe.config import compose
from megamoe.errors import CheckpointError, SharedError
from megamoe.parallel.mesh import ProcessGrid
from megamoe.train.step import train_step
from megamoe.train.trainer import Trainer, build_trainer
from tests.checkpoint.helpers import assert_same_tensors, checkpoint_tensors
from tests.data.helpers import blend_overrides
from tests.pretrain import logged_steps, run_pretrain

# noisy gating draws from the global RNG and the aux-free bias is a buffer: both must come back.
BASE = ["+exp=tiny", "train.global_batch=4", "train.micro_batch=2", "train.seq_len=32", "train.steps=6",
        "train.warmup_steps=1", "moe.noisy_gating=true", "moe.aux_free_bias=true", "moe.aux_loss_coeff=0.01"]


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


OPTIMIZERS = {"adamw": [], "muon": ["train.optimizer=muon"],
              "muon_bf16_state": ["train.optimizer=muon", "train.optimizer_state_dtype=bf16"],
              "adamw_bf16_state": ["train.optimizer_state_dtype=bf16"]}


@pytest.mark.parametrize("variant", [*sorted(OPTIMIZERS), "documents"])
def test_resume_continues_bit_identically(grid: ProcessGrid, tmp_path: Path, variant: str) -> None:
    """Every optimizer and state dtype, and attention inside documents (on a real corpus)."""
    masked = [*blend_overrides(tmp_path / "data"), "data.reset_attention_mask=true"] if variant == "documents" else []
    overrides = [*OPTIMIZERS.get(variant, []), *masked]
    torch.manual_seed(0)
    uninterrupted = _trainer(grid, tmp_path / "a", *overrides)
    losses = _train(uninterrupted, 5, save_at=(2, 5))
    rng_after = torch.get_rng_state()

    torch.manual_seed(123)  # the resumed process starts from other RNG states; the checkpoint restores them
    resumed = _trainer(grid, tmp_path / "b", *overrides)
    load_checkpoint(resumed.state, tmp_path / "a/checkpoints/step_2")
    assert resumed.step == 2 and resumed.loader.consumed_samples == 2 * 4
    assert _train(resumed, 3, save_at=(5,)) == losses[2:]
    assert torch.equal(torch.get_rng_state(), rng_after)
    stored = checkpoint_tensors(tmp_path / "b/checkpoints/step_5")
    assert_same_tensors(stored, checkpoint_tensors(tmp_path / "a/checkpoints/step_5"))
    # the comparison covered the optimizer's state, in the kinds and the dtype it keeps
    muon, adamw = variant.startswith("muon"), {"exp_avg", "exp_avg_sq", "step"}
    assert {name.split("/")[0] for name in stored if "/" in name} == ({"momentum_buffer", *adamw} if muon else adamw)
    state_dtype = torch.bfloat16 if variant.endswith("bf16_state") else torch.float32
    expert_state = f"{'momentum_buffer' if muon else 'exp_avg'}/layers.1.mlp.experts.3.w1"
    assert stored["exp_avg/embed.weight"].dtype == stored[expert_state].dtype == state_dtype
    moe = resumed.modules[0].model.layers["0"].mlp
    assert moe.expert_bias.abs().sum() > 0  # the buffer really moved, so the comparison covered it


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_auto_falls_back_past_damaged_checkpoints(grid: ProcessGrid, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
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
        resume(_trainer(grid, tmp_path / "new", f"checkpoint.resume={root}/step_2").state)
    (root / "step_1/manifest.json").write_text("{")
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints loads"):
        resume(_trainer(grid, tmp_path).state)


def test_resume_none_starts_fresh_and_sets_the_earlier_checkpoints_aside(grid: ProcessGrid, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    """They would otherwise stay resume and rollback candidates of the new run, and never be pruned."""
    _train(_trainer(grid, tmp_path), 2, save_at=(1, 2))
    trainer = _trainer(grid, tmp_path, "checkpoint.resume=none")
    capsys.readouterr()
    assert resume(trainer.state) is None and trainer.step == 0
    root = tmp_path / "checkpoints"
    assert capsys.readouterr().out == (f"checkpoint: checkpoint.resume=none: set the checkpoints already in run.dir "
                                       f"(step_2, step_1) aside in {root}/earlier_run_1, where nothing resumes, rolls "
                                       "back to or prunes them; delete it to free its space\n")
    assert sorted(p.name for p in (root / "earlier_run_1").iterdir()) == ["latest", "step_1", "step_2"]
    assert complete_checkpoints(root) == [] and checkpoint_before(trainer.state, 10) is None
    _train(trainer, 1, save_at=(1,))
    assert resume(_trainer(grid, tmp_path).state) == root / "step_1"  # the new run's own
    assert resume(_trainer(grid, tmp_path, "checkpoint.resume=none").state) is None
    assert sorted(p.name for p in root.iterdir()) == ["earlier_run_1", "earlier_run_2"]


def test_latest_naming_a_missing_checkpoint_is_said_then_the_one_before_is_used(
        grid: ProcessGrid, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _train(_trainer(grid, tmp_path), 2, save_at=(1, 2))
    root = tmp_path / "checkpoints"
    shutil.rmtree(root / "step_2")
    capsys.readouterr()
    trainer = _trainer(grid, tmp_path)
    assert resume(trainer.state) == root / "step_1" and trainer.step == 1
    assert capsys.readouterr().out.splitlines()[0] == (
        f"checkpoint: {root}/latest names step_2, but {root}/step_2 is missing; resuming from the newest complete "
        "checkpoint before it, step_1")
    shutil.rmtree(root / "step_1")  # nothing left: never a silent fresh start
    with pytest.raises(SharedError) as refusal:
        resume(_trainer(grid, tmp_path).state)
    assert str(refusal.value) == (f"checkpoint: {root}/latest names step_2, but {root}/step_2 is missing, and no "
                                  "complete checkpoint of this run comes before it: restore it, or start fresh with "
                                  "checkpoint.resume=none")
    assert (root / "latest").read_text() == "step_2\n"


@pytest.mark.slow
def test_a_run_whose_checkpoints_were_deleted_stops_and_keeps_its_metrics(tmp_path: Path) -> None:
    """The whole command: no fresh start that would cut metrics.jsonl back and overwrite latest.
    (The run dir of a run that trained 4 steps, saving every 2, after ``rm -rf checkpoints/step_*``.)"""
    (tmp_path / "checkpoints").mkdir(parents=True)
    (tmp_path / "checkpoints/latest").write_text("step_4\n")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 6.0}) + "\n" for s in range(1, 5)))
    again = run_pretrain(tmp_path, "train.steps=4", "checkpoint.interval=2")
    assert again.returncode == 2
    assert again.stderr.splitlines() == [f"error: checkpoint: {tmp_path}/checkpoints/latest names step_4, but "
                                         f"{tmp_path}/checkpoints/step_4 is missing, and no complete checkpoint of "
                                         "this run comes before it: restore it, or start fresh with "
                                         "checkpoint.resume=none"]
    assert logged_steps(tmp_path) == [1, 2, 3, 4]
    assert (tmp_path / "checkpoints/latest").read_text() == "step_4\n"


def test_a_named_checkpoint_only_starts_a_run_that_has_none_of_its_own(grid: ProcessGrid, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """The command from-hf prints (checkpoint.resume=PATH) is relaunched as it is, by a torchrun
    restart or by hand: the run goes on from its own checkpoints instead of redoing its steps."""
    _train(_trainer(grid, tmp_path / "source"), 2, save_at=(2,))
    source = tmp_path / "source/checkpoints"
    named = f"checkpoint.resume={source}"  # a checkpoints directory, as generate and evaluate take it
    capsys.readouterr()
    first = _trainer(grid, tmp_path / "run", named)
    assert resume(first.state) == source / "step_2" and first.step == 2
    assert capsys.readouterr().out.splitlines()[0] == (f"checkpoint: checkpoint.resume={source} is a checkpoints "
                                                       "directory: starting from its latest, step_2")
    _train(first, 2, save_at=(3, 4))
    capsys.readouterr()
    again = _trainer(grid, tmp_path / "run", named)
    assert resume(again.state) == tmp_path / "run/checkpoints/step_4" and again.step == 4
    assert capsys.readouterr().out.splitlines()[0] == (
        f"checkpoint: run.dir has checkpoints of its own: resuming from them, not from checkpoint.resume={source} "
        "(where this run started)")


def test_model_only_checkpoint_starts_at_step_zero(grid: ProcessGrid, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
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


def test_resuming_another_model_says_the_model_changed_in_one_line(grid: ProcessGrid, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """Not "damaged": no checkpoint is tried and skipped, nothing invites removing good ones."""
    _train(_trainer(grid, tmp_path), 2, save_at=(1, 2))
    capsys.readouterr()
    with pytest.raises(SharedError) as refusal:
        resume(_trainer(grid, tmp_path, "moe.num_experts=16", "model.hidden_size=128").state)
    assert str(refusal.value) == (f"checkpoint: {tmp_path}/checkpoints/step_2 holds another model than the one "
                                  "configured (model.hidden_size: 64 → 128, moe.num_experts: 8 → 16); the model "
                                  "changed, the checkpoint is fine: restore these settings to resume it, or choose "
                                  "another run.dir")
    assert capsys.readouterr().out == ""
    with pytest.raises(SharedError, match=r"\(moe.router: attention → linear\)"):
        resume(_trainer(grid, tmp_path, "moe.router=linear").state)


def test_a_changed_top_k_is_accepted_and_said(grid: ProcessGrid, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """moe.top_k leaves every tensor's shape alone: the weights load; the run says the model now computes otherwise."""
    _train(_trainer(grid, tmp_path), 1, save_at=(1,))
    capsys.readouterr()
    trainer = _trainer(grid, tmp_path, "moe.top_k=3")
    assert resume(trainer.state) == tmp_path / "checkpoints/step_1"
    assert capsys.readouterr().out.splitlines()[0] == (
        "checkpoint: the model settings changed since step_1 (moe.top_k: 2 → 3): every tensor keeps its shape, so the "
        "weights load as they are and the model computes with the new settings from here")


def test_checkpoint_of_another_model_is_refused(grid: ProcessGrid, tmp_path: Path) -> None:
    _train(_trainer(grid, tmp_path), 1, save_at=(1,))
    shutil.copytree(tmp_path / "checkpoints/step_1", tmp_path / "copy")
    with pytest.raises(CheckpointError, match=r"tensor layers\.4\..* is missing"):
        load_checkpoint(_trainer(grid, tmp_path / "b", "model.num_layers=6").state, tmp_path / "copy")
    with pytest.raises(CheckpointError,
                       match=r"embed\.weight has shape \[512, 64\], the configured model needs \[640, 64\]"):
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
    assert ({n for n in stored if "/" not in n} == {n for n in expected if "/" not in n}
            == set(model_tensor_shapes(trainer.cfg)))
    assert_same_tensors({n: stored[n] for n in expected}, expected)


def test_a_mixed_stack_is_stored_by_global_name_and_loads_into_another_split(grid: ProcessGrid,
                                                                             tmp_path: Path) -> None:
    """Dense and MoE layers (moe.layer_freq): a dense layer stores its SwiGLU, an MoE layer its router,
    bias and one tensor per global expert; the checkpoint loads into two stages (layers 0-1 and
    2-3, two pipeline chunks in this process) and saves back bit for bit, and both go on alike."""
    mixed = ["moe.layer_freq=[0,1,1,0]", "model.dense_ffn_hidden_size=96"]
    whole = _trainer(grid, tmp_path / "whole", *mixed)
    _train(whole, 1)
    saved = save_checkpoint(whole.state)
    stored = checkpoint_tensors(saved)
    assert {"layers.0.mlp.w1.weight", "layers.3.mlp.w2.weight", "layers.1.mlp.experts.7.w2",
            "layers.2.mlp.expert_bias"} <= set(stored)
    assert not any(name.startswith(("layers.0.mlp.router", "layers.3.mlp.experts")) for name in stored)
    assert {n for n in stored if "/" not in n} == set(model_tensor_shapes(whole.cfg))
    chunks = ["parallel.schedule=interleaved_1f1b", "parallel.virtual_stages=2"]
    split = _trainer(grid, tmp_path / "split", *mixed, *chunks)
    assert [list(module.model.layers) for module in split.modules] == [["0", "1"], ["2", "3"]]
    load_checkpoint(split.state, saved)
    assert_same_tensors(checkpoint_tensors(save_checkpoint(split.state)), stored)
    torch.testing.assert_close(_train(split, 1), _train(whole, 1), rtol=1e-5, atol=0)


def test_resume_under_another_optimizer_or_state_dtype_is_refused(grid: ProcessGrid, tmp_path: Path) -> None:
    """AdamW's moments cannot drive Muon (or back), nor fp32 state continue as bf16: one line each,
    before anything is loaded; the manifest records what the state is."""
    _train(_trainer(grid, tmp_path / "adamw"), 1, save_at=(1,))
    _train(_trainer(grid, tmp_path / "muon", *OPTIMIZERS["muon_bf16_state"]), 1, save_at=(1,))
    assert [read_manifest(tmp_path / run / "checkpoints/step_1").state[key] for run in ("adamw", "muon")
            for key in ("optimizer", "optimizer_state_dtype")] == ["adamw", "fp32", "muon", "bf16"]
    for run, wrote, key, saved, wanted in [
        ("adamw", "adamw", "optimizer", "adamw", "muon"),
        ("muon", "muon_bf16_state", "optimizer", "muon", "adamw"),
        ("muon", "muon", "optimizer_state_dtype", "bf16", "fp32"),
    ]:
        ckpt = tmp_path / run / "checkpoints/step_1"
        trainer = _trainer(grid, tmp_path / run, *OPTIMIZERS[wrote], f"train.{key}={wanted}")
        before = trainer.modules[0].model.embed.weight.detach().clone()
        with pytest.raises(SharedError) as info:
            resume(trainer.state)
        assert str(info.value) == (
            f"{ckpt}: its optimizer state was written with train.{key}={saved}, which train.{key}={wanted} cannot "
            f"continue from ({OPTIMIZER_KIND[key][1]}); set train.{key}={saved} to resume this run, or start a new "
            "one (checkpoint.resume=none, or another run.dir)")
        assert trainer.step == 0 and torch.equal(trainer.modules[0].model.embed.weight, before)


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


def test_flipping_reset_attention_mask_resumes_and_says_so(grid: ProcessGrid, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """The weights fit either attention, so a phase may start (or stop) masking documents; the log names it."""
    data = blend_overrides(tmp_path / "data")

    def resumed_log(*overrides: str) -> tuple[Trainer, str]:
        trainer = _trainer(grid, tmp_path / "run", *data, *overrides)
        capsys.readouterr()
        resume(trainer.state)
        return trainer, capsys.readouterr().out

    _train(_trainer(grid, tmp_path / "run", *data), 2, save_at=(2,))
    assert "reset_attention_mask" not in resumed_log()[1]
    masked, said = resumed_log("data.reset_attention_mask=true")
    assert "checkpoint: data.reset_attention_mask changed to true since this checkpoint: the weights carry over; " \
           "attention now stays inside each document" in said
    _train(masked, 1, save_at=(3,))
    unmasked, said = resumed_log()
    assert unmasked.step == 3 and "changed to false since this checkpoint: the weights carry over; attention now " \
                                  "crosses documents" in said


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
