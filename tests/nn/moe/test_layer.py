"""The MoE layer end to end: per-token reference, gradients, balancing, shared experts, init."""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.func import functional_call
from torch.testing import assert_close

from megamoe.config import compose
from megamoe.config.schema import MoEConfig
from megamoe.errors import ConfigError
from megamoe.nn.ffn import SwiGLU
from megamoe.nn.moe import ExpertBank, MoEAuxLossBackward, MoELayer
from megamoe.nn.moe.router import router_z_loss, select_experts, switch_aux_loss

HIDDEN, EXPERTS, FFN = 8, 4, 6


def make_layer(seed: int = 0, hidden: int = HIDDEN, **moe) -> MoELayer:
    cfg = OmegaConf.structured(MoEConfig(**{"num_experts": EXPERTS, "top_k": 2, "ffn_hidden_size": FFN, **moe}))
    layer = MoELayer(hidden, cfg, layer_index=3)
    layer.reset_parameters(0.5, seed)
    return layer


@torch.no_grad()
def reference_forward(layer: MoELayer, x: torch.Tensor, with_shared: bool = True) -> torch.Tensor:
    """Per token: the layer's router logits (checked in test_router), its k largest (biased) choices,
    weights by the configured order, and each expert's SwiGLU written out from its weights."""
    moe, ffn = layer.moe, layer.moe.ffn_hidden_size
    logits = layer.router(x)
    bias = layer.expert_bias if layer.expert_bias is not None else torch.zeros(moe.num_experts)
    rows = []
    for t in range(x.shape[0]):
        probs = logits[t].softmax(-1)
        chosen = sorted(range(moe.num_experts), key=lambda e: -float(probs[e] + bias[e]))[: moe.top_k]
        if moe.router_order == "topk_softmax":
            weights = logits[t, chosen].softmax(-1)
        else:
            weights = probs[chosen] / (probs[chosen].sum() if moe.norm_topk_prob else 1.0)
        row = torch.zeros_like(x[t])
        for w, e in zip(weights, chosen):
            h = layer.experts.w1[e] @ x[t]
            row = row + w * (layer.experts.w2[e] @ (F.silu(h[:ffn]) * h[ffn:]))
        rows.append(row)
    out = torch.stack(rows)
    return out + layer.shared_experts(x) if with_shared and layer.shared_experts is not None else out


@pytest.mark.parametrize("moe", [
    {},
    {"router_order": "softmax_topk", "norm_topk_prob": False},
    {"router": "linear", "top_k": 1},
    {"num_shared_experts": 2, "shared_expert_ffn_hidden_size": 3},
])
def test_layer_matches_per_token_reference(moe):
    torch.manual_seed(0)
    layer = make_layer(**moe)
    x = torch.randn(2, 9, HIDDEN)
    out = layer(x)
    assert out.shape == x.shape
    assert_close(out, reference_forward(layer, x.reshape(-1, HIDDEN)).view_as(x))
    assert layer.last_stats.tokens_per_expert.sum() == 18 * layer.moe.top_k
    assert layer.last_stats.dropped == 0


def test_layer_gradcheck_float64():
    torch.manual_seed(0)
    layer = make_layer(hidden=4, ffn_hidden_size=3, num_shared_experts=1).double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]

    def forward(x, *weights):
        return functional_call(layer, dict(zip(names, weights)), (x,))

    assert torch.autograd.gradcheck(forward, (x, *params))


@pytest.fixture
def restore_loss_scale():
    yield
    MoEAuxLossBackward.set_loss_scale(1.0)


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_aux_losses_reach_the_backward_without_being_returned(scale, restore_loss_scale):
    torch.manual_seed(0)
    x, grad = torch.randn(12, HIDDEN), torch.randn(12, HIDDEN)
    attached = make_layer(aux_loss_coeff=0.3, z_loss_coeff=0.05)
    explicit = make_layer()  # same seed: same weights, losses off
    MoEAuxLossBackward.set_loss_scale(scale)

    out = attached(x)
    (out * grad).sum().backward()

    out_ref = explicit(x)
    routing = select_experts(explicit.router(x), 2, "topk_softmax")
    loss = (out_ref * grad).sum() + scale * (0.3 * switch_aux_loss(routing) + 0.05 * router_z_loss(routing.logits))
    loss.backward()

    assert_close(out, out_ref)
    assert_close(attached.last_stats.aux_loss, switch_aux_loss(routing).detach())
    for (name, a), b in zip(attached.named_parameters(), explicit.parameters()):
        assert_close(a.grad, b.grad, msg=name)
    assert attached.router.query.weight.grad.abs().sum() > 0


def test_aux_free_bias_changes_selection_not_weights():
    torch.manual_seed(0)
    layer = make_layer(aux_free_bias=True)
    x = torch.randn(16, HIDDEN)
    layer(x)
    before = layer.last_stats.tokens_per_expert.clone()
    layer.expert_bias[2] = 10.0  # expert 2 is now chosen by every token
    out = layer(x)
    assert layer.last_stats.tokens_per_expert[2] == 16 and not torch.equal(before, layer.last_stats.tokens_per_expert)
    assert_close(out, reference_forward(layer, x))  # weights still come from the unbiased logits
    assert [n for n, _ in layer.named_parameters()].count("expert_bias") == 0
    assert "expert_bias" in layer.state_dict()


def test_update_expert_bias_moves_against_the_load():
    layer = make_layer(aux_free_bias=True, aux_free_bias_update_rate=0.01)
    layer.update_expert_bias(torch.tensor([4, 0, 2, 2]))  # mean 2
    assert_close(layer.expert_bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))


def test_shared_experts_add_a_dense_swiglu():
    torch.manual_seed(0)
    layer = make_layer(num_shared_experts=2)  # shared ffn 0 → ffn_hidden_size per shared expert
    assert isinstance(layer.shared_experts, SwiGLU)
    assert layer.shared_experts.w2.weight.shape == (HIDDEN, 2 * FFN)
    x = torch.randn(10, HIDDEN)
    routed = reference_forward(layer, x, with_shared=False)
    assert_close(layer(x) - routed, layer.shared_experts(x))


def test_parameter_names_follow_the_checkpoint_layout():
    names = {n: tuple(p.shape) for n, p in make_layer(num_shared_experts=1).named_parameters()}
    assert names == {
        "router.query.weight": (EXPERTS, HIDDEN), "router.key.weight": (EXPERTS, HIDDEN),
        "router.value.weight": (EXPERTS, HIDDEN),
        "experts.w1": (EXPERTS, 2 * FFN, HIDDEN), "experts.w2": (EXPERTS, HIDDEN, FFN),
        "shared_experts.w1.weight": (2 * FFN, HIDDEN), "shared_experts.w2.weight": (HIDDEN, FFN),
    }
    linear = make_layer(router="linear", noisy_gating=True)
    assert {"router.weight", "router.noise.weight"} <= {n for n, _ in linear.named_parameters()}


class SliceExchange:
    """Holds experts [first, first + n) as an expert-parallel rank would (dispatch unused here)."""

    def __init__(self, first_expert: int, num_local_experts: int) -> None:
        self.first_expert, self.num_local_experts = first_expert, num_local_experts


def test_local_expert_slices_initialise_like_the_full_bank():
    full = make_layer(seed=7)
    cfg = OmegaConf.structured(MoEConfig(num_experts=EXPERTS, top_k=2, ffn_hidden_size=FFN))
    part = MoELayer(HIDDEN, cfg, layer_index=3, exchange=SliceExchange(2, 2))
    part.reset_parameters(0.5, 7)
    assert torch.equal(part.experts.w1, full.experts.w1[2:4]) and torch.equal(part.experts.w2, full.experts.w2[2:4])
    assert torch.equal(part.router.query.weight, full.router.query.weight)
    assert not torch.equal(full.experts.w1[0], full.experts.w1[1])


def test_capacity_factor_drops_and_counts():
    torch.manual_seed(0)
    layer = make_layer(router="linear", capacity_factor=0.5)
    layer.router.weight.data[0] += 5.0  # skew: one expert would take every token
    layer(torch.randn(32, HIDDEN) + 1.0)
    capacity = 8  # ceil(0.5 · 32 · 2 / 4)
    assert layer.last_stats.dropped == (layer.last_stats.tokens_per_expert - capacity).clamp(min=0).sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_path_matches_the_expert_loop(dtype):
    torch.manual_seed(0)
    loop, grouped = ExpertBank(4, 0, 8, 8, "off"), ExpertBank(4, 0, 8, 8, "on")
    loop.reset_parameters(0.5, 1, 0)
    grouped.load_state_dict(loop.state_dict())
    counts = [3, 0, 9, 1]  # an empty expert and groups that need row padding
    x, grad = torch.randn(13, 8, requires_grad=True), torch.randn(13, 8)
    results = []
    for bank in (loop, grouped):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            y = bank(x, counts)
        y.backward(grad.to(y.dtype))
        results.append((y.float(), x.grad, bank.w1.grad, bank.w2.grad))
        x.grad = None
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for a, b in zip(*results):
        assert_close(a, b, **tol)


def test_grouped_gemm_on_without_support_is_a_config_error(monkeypatch):
    monkeypatch.delattr(torch, "_grouped_mm")
    with pytest.raises(ConfigError, match="moe.grouped_gemm"):
        ExpertBank(2, 0, 8, 8, "on")


def test_builds_from_the_tiny_config_on_the_meta_device():
    cfg = compose(["+exp=tiny"])
    with torch.device("meta"):
        layer = MoELayer(cfg.model.hidden_size, cfg.moe, layer_index=0)
    layer.reset_parameters(cfg.model.init_std, cfg.seed)
    assert layer.experts.w1.is_meta and layer.experts.w1.shape == (8, 256, 64)
