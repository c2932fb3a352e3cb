"""The Qwen-MoE family's model: its config rules, the shared-expert gate, and initialisation
that does not depend on the pipeline split."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from megamoe.config import compose
from megamoe.errors import ConfigError
from megamoe.models import build_stage, validate_config
from megamoe.nn.moe.layer import MoELayer

TINY = ["+exp=qwen_moe_tiny"]


@pytest.mark.parametrize(("overrides", "key"), [
    (TINY + ["model.use_lfa=true"], "model.use_lfa"),
    (TINY + ["model.num_kv_heads=3"], "model.num_kv_heads"),
    (TINY + ["model.num_kv_heads=0"], "model.num_kv_heads"),
    (TINY + ["moe.num_shared_experts=0"], "moe.shared_expert_gate"),
    (TINY + ["model.family=yuan"], "model.num_kv_heads"),  # Yuan's attention has no grouped-query heads
    (["+exp=tiny", "model.hidden_size=63", "model.num_heads=3"], "model.hidden_size"),  # LFA halves H: Yuan's rule
])
def test_settings_a_family_cannot_build_name_their_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(compose(overrides))
    assert str(info.value).startswith(f"{key}: ") and "\n" not in str(info.value)


def test_the_tiny_and_release_configs_are_valid() -> None:
    validate_config(compose(TINY))
    validate_config(compose(["+exp=qwen15_moe_a27b"]), world_size=64)


def test_shared_experts_are_scaled_by_their_sigmoid_gate() -> None:
    """out = routed + sigmoid(x · g) · shared(x), against the layer without the gate."""
    moe = compose(TINY).moe
    plain_moe = OmegaConf.merge(moe, {"shared_expert_gate": False})
    gated, plain = MoELayer(64, moe, layer_index=1), MoELayer(64, plain_moe, layer_index=1)
    gated.reset_parameters(0.1, seed=3)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("shared_expert_gate")})
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        shared = gated.shared_experts(x)
        expected = plain(x) - shared + torch.sigmoid(x @ gated.shared_expert_gate.weight.T) * shared
        got = gated(x)
    assert gated.shared_expert_gate.weight.shape == (1, 64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_every_parameter_starts_the_same_in_any_pipeline_split() -> None:
    """The attention (q/k/v biases included) and the shared-expert gate initialise from their global names."""
    cfg = compose(TINY)
    whole, second = build_stage(cfg), build_stage(cfg, range(2, 4), pre_process=False)
    whole.reset_parameters(5)
    second.reset_parameters(5)
    full = whole.state_dict()
    assert any(".shared_expert_gate." in name for name in second.state_dict())
    for name, tensor in second.state_dict().items():
        assert torch.equal(tensor, full[name]), name
    gates = [full[f"layers.{i}.mlp.shared_expert_gate.weight"] for i in (2, 3)]
    assert not torch.equal(*gates)  # keyed by the layer
