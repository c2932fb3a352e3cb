"""The Qwen-MoE family's accounting against built models: parameters by row, what one token
touches, the matmul FLOPs torch counts, the bytes autograd saves, and the release's headline
numbers from launch/model_stats.py."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megamoe.config import compose
from megamoe.estimators import flops, memory
from megamoe.models import build_stage
from tests.estimators.test_flops import row_of, touched_parameters
from tests.estimators.test_memory import forward_estimate, saved_by_forward
from tests.launch.test_model_stats import model_stats

VARIANTS = {
    "tiny": [],
    "mha_no_bias_renormalised": ["model.num_kv_heads=null", "model.qkv_bias=false", "moe.norm_topk_prob=true"],
    "mqa_ungated_two_shared": ["model.num_kv_heads=1", "moe.shared_expert_gate=false", "moe.num_shared_experts=2",
                               "moe.shared_expert_ffn_hidden_size=16"],
}


def tiny(variant: str, *overrides: str):
    return compose(["+exp=qwen_moe_tiny", *VARIANTS[variant], *overrides])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_breakdown_equals_parameters_of_a_model_built_on_meta(variant: str) -> None:
    cfg = tiny(variant)
    with torch.device("meta"):
        model = build_stage(cfg)
    counted: dict[str, int] = {}
    for name, param in model.named_parameters():
        counted[row_of(name)] = counted.get(row_of(name), 0) + param.numel()
    assert counted == {row: part.total for row, part in flops.parameter_breakdown(cfg).items() if part.total}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_active_parameters_and_flops_are_what_one_forward_uses(variant: str) -> None:
    cfg = tiny(variant)
    model = build_stage(cfg)
    model.reset_parameters(0)
    model(torch.tensor([[7]])).square().sum().backward()
    assert touched_parameters(model) == flops.active_params(cfg)
    x = torch.randint(0, cfg.model.vocab_size, (2, 16))
    with FlopCounterMode(display=False) as counter, torch.no_grad():  # every mm / addmm (SDPA uncounted on CPU)
        model(x)
    assert counter.get_total_flops() == flops.fwd_flops_per_token(cfg) * x.numel()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_saved_tensors_match_the_accounting(variant: str, precision: str) -> None:
    """Per token (the slope over two sequence lengths) and constant (weight copies) bytes saved for backward."""
    cfg = tiny(variant, f"train.precision={precision}")
    bf16 = precision == "bf16"
    tokens_short, tokens_long = cfg.train.micro_batch * 32, cfg.train.micro_batch * 64
    short, long = saved_by_forward(cfg, 32, bf16), saved_by_forward(cfg, 64, bf16)
    per_token = (long - short) / (tokens_long - tokens_short)
    expected_per_token, expected_constant = forward_estimate(cfg, memory.BF16 if bf16 else memory.FP32)
    assert per_token == expected_per_token
    aux = cfg.model.num_layers * memory.FP32 * (cfg.moe.num_experts + 1)  # the Switch loss's mean and scalar
    assert long - per_token * tokens_long == expected_constant + aux + memory.FP32  # + the loss's token count


def test_release_has_the_published_sizes() -> None:
    """Qwen1.5-MoE-A2.7B: 14.3B parameters, 2.7B active; model_stats checks the count of the model it builds on meta."""
    stats = model_stats.stats(compose(["+exp=qwen15_moe_a27b"]))
    assert stats["total_params"] == pytest.approx(14.3e9, rel=0.02)
    assert stats["active_params"] == pytest.approx(2.7e9, rel=0.02)
    assert stats["params"]["shared_experts"]["total"] == 24 * (3 * 2048 * 5632 + 2048)  # with its gate
    assert stats["params"]["attention"]["total"] == 24 * (4 * 2048 * 2048 + 3 * 2048)  # with the q/k/v biases
