"""Loading a checkpoint for generation: every tensor lands where the model had it, the latest
checkpoint of a directory is found, routing is made dropless, mistakes are one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megamoe.checkpoint import write_model_checkpoint
from megamoe.config import compose
from megamoe.data.tokenizer import ByteTokenizer
from megamoe.errors import UserError
from megamoe.inference import load_for_inference
from megamoe.nn.decoder import Decoder
from tests.models.helpers import model_tensors, random_model


def save(path: Path, overrides: list[str], seed: int = 0) -> Decoder:
    cfg = compose(overrides)
    model = random_model(cfg, seed)
    write_model_checkpoint(path, model_tensors(model), cfg, shard_bytes=200_000)
    return model


def assert_same_weights(model: Decoder, expected: Decoder) -> None:
    state = expected.state_dict()
    assert sorted(model.state_dict()) == sorted(state)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name  # expert banks restacked in expert order


@pytest.mark.parametrize("overrides", [["+exp=tiny"], ["+exp=qwen_moe_tiny", "moe.aux_free_bias=true"]])
def test_loads_every_tensor_in_place(tmp_path: Path, overrides: list[str]) -> None:
    saved = save(tmp_path / "step_0", overrides)
    model, tokenizer, cfg = load_for_inference(tmp_path / "step_0", "cpu")
    assert not model.training and isinstance(tokenizer, ByteTokenizer)
    assert cfg.model.family == compose(overrides).model.family
    assert_same_weights(model, saved)


def test_a_checkpoints_directory_means_its_latest(tmp_path: Path) -> None:
    save(tmp_path / "step_5", ["+exp=tiny"], seed=5)
    newest = save(tmp_path / "step_9", ["+exp=tiny"], seed=9)
    assert_same_weights(load_for_inference(tmp_path, "cpu")[0], newest)
    (tmp_path / "latest").write_text("step_5\n")  # resumed from step 5: step 9 is an abandoned timeline
    loaded = load_for_inference(tmp_path, "cpu")[0]
    assert torch.equal(loaded.embed.weight, random_model(compose(["+exp=tiny"]), 5).embed.weight)


def test_capacity_factor_is_dropped_with_a_note(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    save(tmp_path / "step_0", ["+exp=tiny", "moe.capacity_factor=1.25"])
    model, _, cfg = load_for_inference(tmp_path / "step_0", "cpu")
    assert cfg.moe.capacity_factor is None and all(layer.moe.capacity_factor is None for layer in model.moe_layers())
    assert capsys.readouterr().err.count("moe.capacity_factor=1.25") == 1


def test_mistakes_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such checkpoint directory"):
        load_for_inference(tmp_path / "missing", "cpu")
    with pytest.raises(UserError, match="holds no complete checkpoint"):
        load_for_inference(tmp_path, "cpu")
    save(tmp_path / "ec", ["+exp=tiny", "moe.router_mode=expert_choice"])
    with pytest.raises(UserError, match="expert_choice"):
        load_for_inference(tmp_path / "ec", "cpu")
