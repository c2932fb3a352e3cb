"""Expert choice routing (Zhou et al., 2022) against references written from the definition."""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.testing import assert_close

from megamoe.config import compose
from megamoe.config.schema import MoEConfig
from megamoe.errors import ConfigError
from megamoe.models import validate_config
from megamoe.nn.moe import MoELayer
from megamoe.nn.moe.router import router_z_loss, select_tokens, switch_aux_loss

HIDDEN, EXPERTS, FFN, TOP_K = 8, 4, 6, 2


def reference_choices(probs: torch.Tensor, capacity: int) -> list[list[int]]:
    """Per expert: the tokens of its column of scores, best first, the lower token first among
    equals, cut at min(capacity, T)."""
    num_tokens, num_experts = probs.shape
    columns = probs.t().tolist()
    return [sorted(range(num_tokens), key=lambda t: (-columns[e][t], t))[:capacity] for e in range(num_experts)]


def check_routing(logits: torch.Tensor, capacity: int) -> None:
    """select_tokens against the reference: who each expert took, the weights, the counts."""
    routing = select_tokens(logits, capacity)
    probs = logits.softmax(-1)
    chosen = reference_choices(probs, capacity)
    num_chosen = len(chosen[0])
    assert routing.tokens.tolist() == chosen
    assert routing.experts.tolist() == [[e] * num_chosen for e in range(logits.shape[1])]
    assert torch.equal(routing.weights, torch.stack([probs[tokens, e] for e, tokens in enumerate(chosen)]))
    assert routing.tokens_per_expert.tolist() == [num_chosen] * logits.shape[1]


@pytest.mark.parametrize("capacity", [1, 7, 30, 31])  # 31 > T: an expert takes every token once
def test_each_expert_takes_its_top_c_tokens_weighted_by_score(capacity):
    logits = torch.randn(30, 5, generator=torch.Generator().manual_seed(0)) * 2
    check_routing(logits, capacity)


def test_ties_go_to_the_lower_token():
    # every column holds two groups of equal scores: tokens 1, 4, 7, ... and all the others
    # (over ~100 tied values torch's default sort and topk no longer keep index order)
    logits = torch.tensor([[0.0, 0.5, 1.0]] * 120)
    logits[1::3] = torch.tensor([2.0, -1.0, 3.0])
    for capacity in (2, 50, 120):
        check_routing(logits, capacity)
    assert select_tokens(logits, 3).tokens.tolist() == [[1, 4, 7], [0, 2, 3], [1, 4, 7]]


def test_a_token_gets_zero_to_all_experts():
    # tokens 1..3 each prefer one expert; tokens 0 and 4 score 1/3 everywhere, and 0 wins every tie
    logits = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    routing = select_tokens(logits, 2)
    assert routing.tokens.tolist() == [[1, 0], [2, 0], [3, 0]]
    assert torch.bincount(routing.tokens.flatten(), minlength=5).tolist() == [3, 1, 1, 1, 0]


def test_weights_gradcheck_float64():
    logits = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: select_tokens(z, 4).weights, (logits,))


def test_switch_loss_is_one_without_gradient_under_expert_choice():
    logits = torch.randn(20, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss = switch_aux_loss(select_tokens(logits, 10))
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.item() == pytest.approx(1.0, abs=1e-12)
    assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-15)


# --- the layer ------------------------------------------------------------------------------


def make_layer(**moe) -> MoELayer:
    cfg = MoEConfig(**{"num_experts": EXPERTS, "top_k": TOP_K, "ffn_hidden_size": FFN,
                       "router_mode": "expert_choice", **moe})
    layer = MoELayer(HIDDEN, OmegaConf.structured(cfg), layer_index=1)
    layer.reset_parameters(0.5, seed=0)
    return layer


def naive_expert_choice(layer: MoELayer, x: torch.Tensor, capacity: int) -> torch.Tensor:
    """Per expert: rank every token by its softmax score, take the best ``capacity`` and add
    score · SwiGLU_e(x_t) to each of them; the SwiGLU written out from the expert's weights."""
    probs = layer.router(x).softmax(-1)
    ffn = layer.moe.ffn_hidden_size
    out = torch.zeros_like(x)
    for e, tokens in enumerate(reference_choices(probs.detach(), capacity)):
        rows = torch.tensor(tokens)
        h = x[rows] @ layer.experts.w1[e].t()
        y = (F.silu(h[:, :ffn]) * h[:, ffn:]) @ layer.experts.w2[e].t()
        out = out.index_add(0, rows, probs[rows, e].unsqueeze(-1) * y)
    return out


def forward_and_grads(layer: MoELayer, x: torch.Tensor, grad: torch.Tensor, forward) -> list[torch.Tensor]:
    """The output, then the gradients of x and of every parameter, for ``loss = <out, grad> + extra``
    where ``forward(x)`` returns (out, extra)."""
    x = x.clone().requires_grad_()
    out, extra = forward(x)
    ((out * grad).sum() + extra).backward()
    result = [out.detach(), x.grad, *(p.grad for p in layer.parameters())]
    layer.zero_grad(set_to_none=True)
    return result


@pytest.mark.parametrize(("moe", "capacity"), [
    ({}, 9),  # ceil(18 · 2 / 4): on average top_k experts per token
    ({"router": "linear", "capacity_factor": 0.5}, 5),  # ceil(0.5 · 9)
    ({"capacity_factor": 3.0}, 18),  # ceil(27) is more than T: every expert takes every token
    ({"router": "linear", "z_loss_coeff": 0.1}, 9),  # the z-loss still reaches the router
])
def test_layer_matches_a_naive_per_expert_computation(moe, capacity):
    layer = make_layer(**moe)
    gen = torch.Generator().manual_seed(2)
    x, grad = torch.randn(2, 9, HIDDEN, generator=gen), torch.randn(2, 9, HIDDEN, generator=gen)

    def reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = x.reshape(-1, HIDDEN)
        z_loss = layer.moe.z_loss_coeff * router_z_loss(layer.router(tokens))  # the layer adds it in backward
        return naive_expert_choice(layer, tokens, capacity).view_as(x), z_loss

    got = forward_and_grads(layer, x, grad, lambda x: (layer(x), 0.0))
    assert layer.last_stats.tokens_per_expert.tolist() == [capacity] * EXPERTS
    assert layer.last_stats.dropped == 0
    want = forward_and_grads(layer, x, grad, reference)
    names = ["out", "x", *(name for name, _ in layer.named_parameters())]
    for name, a, b in zip(names, got, want):
        assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


def test_routing_depends_on_later_tokens_and_other_sequences():
    """Not causal: whether expert 0 takes token (0, 0) depends on tokens after it and on sequence 1."""
    layer = make_layer(router="linear", capacity_factor=0.5)  # c = ceil(0.5 · 8 · 2 / 4) = 2
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 1.0  # expert 0 ranks tokens by feature 0; the others by its opposite
    x = torch.randn(2, 4, HIDDEN, generator=torch.Generator().manual_seed(3))
    x[:, :, 0] = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.2, 0.1, 0.0]])  # (0, 0) is expert 0's best
    alone = layer(x)[0, 0]
    assert alone.abs().sum() > 0
    for sequence, positions in ((0, slice(1, None)), (1, slice(None))):  # its later tokens; the other sequence
        changed = x.clone()
        changed[sequence, positions, 0] = 2.0  # they now outscore it on expert 0, which drops it
        assert torch.equal(layer(changed)[0, 0], torch.zeros(HIDDEN))


# --- configuration --------------------------------------------------------------------------

EXPERT_CHOICE = ["moe.router_mode=expert_choice"]


@pytest.mark.parametrize(("overrides", "key"), [
    (["moe.router_mode=tokens"], "moe.router_mode"),
    ([*EXPERT_CHOICE, "moe.aux_loss_coeff=0.01"], "moe.aux_loss_coeff"),
    ([*EXPERT_CHOICE, "moe.aux_free_bias=true"], "moe.aux_free_bias"),
])
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        validate_config(compose(["+exp=tiny", *overrides]))
    assert str(info.value).startswith(f"{key}: ") and "\n" not in str(info.value)


def test_expert_choice_takes_the_z_loss_capacity_and_both_routers():
    for router in ("attention", "linear"):
        validate_config(compose(["+exp=tiny", *EXPERT_CHOICE, f"moe.router={router}", "moe.z_loss_coeff=0.001",
                          "moe.capacity_factor=1.5"]))
    assert compose(["+exp=tiny"]).moe.router_mode == "token_choice"
