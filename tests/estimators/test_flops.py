"""Analytic parameter and FLOP counts against built models, a hand count, and the paper."""

import pytest
import torch
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode

from megamoe.config import compose
from megamoe.estimators import flops
from megamoe.models import build_stage
from megamoe.nn.decoder import Decoder

VARIANTS = {
    "moe": [],
    "dense_untied": ["model.ffn_type=dense", "model.tie_embeddings=false"],
    "moe_untied_no_lfa": ["model.tie_embeddings=false", "model.use_lfa=false"],
    "linear_noisy_shared": ["moe.router=linear", "moe.noisy_gating=true", "moe.num_shared_experts=2",
                            "moe.shared_expert_ffn_hidden_size=32"],
    # dense and MoE layers (moe.layer_freq 2: layers 0, 2, …), the MoE ones with a gated shared expert
    "mixed_shared": ["moe.layer_freq=2", "model.dense_ffn_hidden_size=96", "moe.num_shared_experts=1",
                     "moe.shared_expert_ffn_hidden_size=32", "moe.shared_expert_gate=true"],
}


def config(exp: str, variant: str) -> DictConfig:
    return compose([f"+exp={exp}", *VARIANTS[variant]])


def row_of(name: str) -> str:
    """Which breakdown row a parameter of the built model belongs to, from its name alone."""
    if name.startswith("embed."):
        return "embedding"
    if name.startswith("lm_head."):
        return "head"
    for marker, row in ((".attn.lf.", "lfa"), (".attn.", "attention"), (".mlp.router.", "router"),
                        (".mlp.experts.", "experts"), (".mlp.shared_experts.", "shared_experts"),
                        (".mlp.shared_expert_gate.", "shared_experts"),
                        (".mlp.", "dense_ffn")):
        if marker in name:
            return row
    assert name.endswith("norm.weight"), name
    return "norms"


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("exp", ["tiny", "m32_2000b"])
def test_breakdown_equals_parameters_of_a_model_built_on_meta(exp: str, variant: str) -> None:
    cfg = config(exp, variant)
    with torch.device("meta"):
        model = build_stage(cfg)
    counted: dict[str, int] = {}
    for name, param in model.named_parameters():
        counted[row_of(name)] = counted.get(row_of(name), 0) + param.numel()
    analytic = {row: part.total for row, part in flops.parameter_breakdown(cfg).items() if part.total}
    assert counted == analytic
    assert flops.total_params(cfg) == sum(p.numel() for p in model.parameters())


def test_tiny_hand_count() -> None:
    """vocab 512, hidden 64, 4 layers, 4 heads × 16, 8 experts top-2 of ffn 128, tied."""
    cfg = compose(["+exp=tiny"])
    embedding = 512 * 64
    attention = 4 * 64 * 64  # q, k, v, o
    lfa = (32 * 64 * 2 + 32) + (64 * 32 * 2 + 64) + 64  # conv1, conv2 (with biases), norm
    router = 3 * 8 * 64
    expert = 3 * 64 * 128  # w1 gate | up and w2
    norms = 2 * 64
    assert flops.total_params(cfg) == embedding + 4 * (attention + lfa + router + 8 * expert + norms) + 64
    assert flops.total_params(cfg) == 924_864
    assert flops.active_params(cfg) == embedding + 4 * (attention + lfa + router + 2 * expert + norms) + 64
    matmul = 4 * (attention + 2 * 64 * 64 + router + 2 * expert) + embedding  # conv kernels; the tied head
    assert flops.fwd_flops_per_token(cfg) == 2 * matmul == 667_648
    assert flops.compute_ratio_vs_dense(cfg) == pytest.approx(matmul / 924_864)


def touched_parameters(model: Decoder) -> int:
    """Parameters the backward reached, each routed expert counted on its own (by a nonzero slice).

    Dense parameters count when they have a gradient at all: with a single token, q and k get an
    exactly-zero gradient on some seeds (softmax over one key is constant), yet one token uses them."""
    count = 0
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        if ".mlp.experts." in name:
            count += sum(g.numel() for g in param.grad if g.abs().sum() > 0)
        else:
            count += param.numel()
    return count


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_active_parameters_are_what_one_token_touches(variant: str) -> None:
    cfg = config("tiny", variant)
    torch.manual_seed(33)  # a seed on which q and k get an exactly-zero gradient (see above)
    model = build_stage(cfg)
    model.reset_parameters(0)
    model(torch.tensor([[7]])).square().sum().backward()
    assert touched_parameters(model) == flops.active_params(cfg)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_flops_equal_the_matmul_flops_torch_counts(variant: str) -> None:
    """FlopCounterMode counts every mm/addmm of a real forward (SDPA is not counted on CPU)."""
    cfg = config("tiny", variant)
    model = build_stage(cfg)
    model.reset_parameters(0)
    x = torch.randint(0, cfg.model.vocab_size, (2, 16))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert counter.get_total_flops() == flops.fwd_flops_per_token(cfg) * x.numel()


def test_attention_flops_sum_over_causal_queries() -> None:
    cfg = compose(["+exp=tiny"])
    s, projection = 16, 4 * 16
    per_sequence = sum(4 * projection * (i + 1) for i in range(s))  # QKᵀ and PV over keys 0..i
    assert flops.attention_flops_per_token(cfg, s) == cfg.model.num_layers * per_sequence / s


def test_m32_reproduces_the_paper() -> None:
    """Yuan 2.0-M32: 40B total, 3.7B active, 7.4 GFLOPs forward per token, 9.25% of dense."""
    cfg = compose(["+exp=m32_2000b"])
    total, active = flops.total_params(cfg), flops.active_params(cfg)
    assert total == pytest.approx(40e9, rel=0.01)
    assert active == pytest.approx(3.7e9, rel=0.01)
    assert flops.fwd_flops_per_token(cfg) == pytest.approx(7.4e9, rel=0.01)
    assert round(active / 1e9, 1) / round(total / 1e9) == pytest.approx(0.0925)
    assert flops.compute_ratio_vs_dense(cfg) == pytest.approx(0.0925, abs=0.0005)
