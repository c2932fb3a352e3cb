"""The on-disk format: shards vs the safetensors reference reader, checksums, atomic dirs, retention."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from megamoe.checkpoint import iter_model_tensors, model_tensor_shapes, read_config, write_model_checkpoint
from megamoe.checkpoint.store import (
    CONFIG,
    complete_checkpoints,
    prune,
    read_manifest,
    read_shard,
    resume_candidates,
    set_latest,
    write_bytes,
    write_shard,
    write_shards,
)
from megamoe.config import compose
from megamoe.errors import CheckpointError

TINY = ["+exp=tiny"]


def _mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.bf16": torch.randn(3, 5, generator=g).bfloat16(),  # odd byte count before wider dtypes
        "b.f32": torch.randn(7, 3, generator=g),
        "c.f64": torch.randn(2, generator=g, dtype=torch.float64),
        "d.scalar": torch.tensor(4.0),
        "e.empty": torch.empty(0, 4),
        "f.i64": torch.arange(5),
        "g.bool": torch.tensor([True, False, True]),
        "h.view": torch.randn(4, 6, generator=g)[:, 1:3],  # non-contiguous input
    }


def test_shard_matches_safetensors_reference_both_ways(tmp_path: Path) -> None:
    tensors = _mixed_tensors()
    entry = write_shard(tmp_path / "x.safetensors", list(tensors.items()), "model")
    data = (tmp_path / "x.safetensors").read_bytes()
    assert entry.bytes == len(data) and entry.crc32 == zlib.crc32(data)
    reference = load_file(tmp_path / "x.safetensors")  # the safetensors library reads what we wrote
    ours = read_shard(tmp_path / "x.safetensors", entry)
    assert sorted(reference) == sorted(ours) == sorted(tensors)
    for name, tensor in tensors.items():
        for got in (reference[name], ours[name]):
            assert got.dtype == tensor.dtype and got.shape == tensor.shape
            assert torch.equal(got, tensor), name


def test_shards_are_bounded(tmp_path: Path) -> None:
    tensors = [(f"t{i}", torch.full((100,), float(i))) for i in range(10)]  # 400 bytes each
    entries = write_shards(tmp_path, "m", iter(tensors), "model", shard_bytes=1000)
    assert list(entries) == [f"m-{i:05d}.safetensors" for i in range(5)]
    assert [e.tensors for e in entries.values()] == [[f"t{i}", f"t{i + 1}"] for i in range(0, 10, 2)]
    big = write_shards(tmp_path, "big", [("huge", torch.zeros(1000))], "model", shard_bytes=1000)
    assert big["big-00000.safetensors"].tensors == ["huge"]  # a tensor above the bound gets its own shard


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_shard_names_the_file(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "x.safetensors"
    entry = write_shard(path, list(_mixed_tensors().items()), "model")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x10
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-8]))
    else:
        path.unlink()
    with pytest.raises(CheckpointError, match=str(path).replace(".", r"\.")) as info:
        read_shard(path, entry)
    assert {"flip": "CRC-32 mismatch", "truncate": "truncated", "delete": "missing"}[damage] in str(info.value)
    assert "\n" not in str(info.value)


def _model_tensors(cfg) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {name: torch.randn(shape, generator=g) for name, shape in model_tensor_shapes(cfg).items()}


def test_model_checkpoint_round_trip(tmp_path: Path) -> None:
    cfg = compose([*TINY, "model.tie_embeddings=false", "moe.aux_free_bias=true"])
    tensors = _model_tensors(cfg)
    assert "lm_head.weight" in tensors and "layers.3.mlp.expert_bias" in tensors
    assert tensors["layers.2.mlp.experts.7.w1"].shape == (2 * 128, 64)
    assert tensors["layers.2.mlp.experts.7.w2"].shape == (64, 128)
    manifest = write_model_checkpoint(tmp_path / "ckpt", iter(tensors.items()), cfg, shard_bytes=1 << 20)
    assert len(manifest.files_of_kind("model")) > 1 and not manifest.has_optimizer
    assert not (tmp_path / "ckpt.tmp").exists()
    read = dict(iter_model_tensors(tmp_path / "ckpt"))
    assert sorted(read) == sorted(tensors)
    assert all(torch.equal(read[name], tensor) for name, tensor in tensors.items())
    assert read_config(tmp_path / "ckpt") == cfg


@pytest.mark.parametrize("mistake", ["unknown", "shape", "missing"])
def test_model_checkpoint_rejects_what_the_model_cannot_load(tmp_path: Path, mistake: str) -> None:
    cfg = compose(TINY)
    tensors = _model_tensors(cfg)
    expected = {"unknown": "layers.9.attn.q_proj.weight", "shape": "final_norm.weight",
                "missing": "embed.weight"}[mistake]
    if mistake == "unknown":
        tensors[expected] = torch.zeros(1)
    elif mistake == "shape":
        tensors[expected] = torch.zeros(3)
    else:
        del tensors[expected]
    with pytest.raises(CheckpointError, match=expected.replace(".", r"\.")):
        write_model_checkpoint(tmp_path / "ckpt", tensors.items(), cfg)
    assert not (tmp_path / "ckpt").exists()


def test_model_checkpoint_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        write_model_checkpoint(tmp_path / "ckpt", [], compose(TINY))


def _fake_checkpoint(root: Path, step: int) -> Path:
    path = root / f"step_{step}"
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"step": step}))
    return path


def test_latest_first_tmp_ignored_and_pruning(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / "step_50.tmp").mkdir()  # a save that crashed before its rename
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_40", "step_30", "step_20", "step_10"]
    assert [p.name for p in resume_candidates(tmp_path)] == ["step_40", "step_30", "step_20", "step_10"]  # no latest
    set_latest(tmp_path, tmp_path / "step_40")
    assert (tmp_path / "latest").read_text() == "step_40\n"
    assert [p.name for p in resume_candidates(tmp_path)] == ["step_40", "step_30", "step_20", "step_10"]
    removed = prune(tmp_path, tmp_path / "step_40", keep=2)
    assert sorted(p.name for p in removed) == ["step_10", "step_20", "step_50.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_30", "step_40"]


def test_resuming_from_an_older_checkpoint_abandons_the_newer_ones(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        _fake_checkpoint(tmp_path, step)
    current = _fake_checkpoint(tmp_path, 12)  # resumed from step_10 by path, then saved step 12
    set_latest(tmp_path, current)
    assert [p.name for p in resume_candidates(tmp_path)] == ["step_12", "step_10"]
    assert prune(tmp_path, current, keep=1) == [tmp_path / "step_10"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_12", "step_20", "step_30"]


def _saved_with(tmp_path: Path, key: str, value: object) -> Path:
    """A tiny model checkpoint whose saved config carries one more key, as another version wrote it."""
    cfg, ckpt = compose(["+exp=tiny"]), tmp_path / "ckpt"
    write_model_checkpoint(ckpt, iter(_model_tensors(cfg).items()), cfg)
    saved = OmegaConf.create(OmegaConf.to_container(cfg))
    OmegaConf.update(saved, key, value, force_add=True)
    manifest = read_manifest(ckpt)
    manifest.files[CONFIG] = write_bytes(ckpt / CONFIG, OmegaConf.to_yaml(saved).encode(), "config")
    manifest.write(ckpt)
    return ckpt


def test_a_retired_key_in_a_saved_config_is_dropped(tmp_path: Path) -> None:
    """Checkpoints written before data.num_workers was removed stay readable."""
    assert read_config(_saved_with(tmp_path, "data.num_workers", 4)) == compose(["+exp=tiny"])


def test_an_unknown_key_in_a_saved_config_is_one_line_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"ckpt/config.yaml: data.shiny: .*another config schema"):
        read_config(_saved_with(tmp_path, "data.shiny", 1))
