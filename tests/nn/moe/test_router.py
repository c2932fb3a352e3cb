"""Routers and expert selection against slow references written from the definitions."""

import math

import pytest
import torch
from torch.func import functional_call
from torch.testing import assert_close

from megamoe.nn.moe.router import AttentionRouter, LinearRouter, Routing, router_z_loss, select_experts, switch_aux_loss


def reference_attention_logits(router: AttentionRouter, x: torch.Tensor) -> torch.Tensor:
    """The paper's per-token math: q, k, v ∈ R^N; A = q kᵀ (N×N); logits = softmax(A, rows) v."""
    rows = []
    for token in x.double():
        q, k, v = (m.weight.double() @ token for m in (router.query, router.key, router.value))
        scores = torch.outer(q, k)
        probs = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
        probs = probs / probs.sum(dim=1, keepdim=True)
        rows.append(probs @ v)
    return torch.stack(rows)


def reference_selection(logits: torch.Tensor, k: int, order: str, norm: bool) -> tuple[list, list]:
    """Per token: the k largest logits; weights by the chosen order."""
    experts, weights = [], []
    for row in logits.double().tolist():
        chosen = sorted(range(len(row)), key=lambda e: -row[e])[:k]
        if order == "topk_softmax":
            exps = [math.exp(row[e] - row[chosen[0]]) for e in chosen]
            w = [x / sum(exps) for x in exps]
        else:
            total = sum(math.exp(v) for v in row)
            w = [math.exp(row[e]) / total for e in chosen]
            if norm:
                w = [x / sum(w) for x in w]
        experts.append(chosen)
        weights.append(w)
    return experts, weights


def attention_router(hidden: int = 8, experts: int = 6, std: float = 0.5) -> AttentionRouter:
    router = AttentionRouter(hidden, experts)
    for m in (router.query, router.key, router.value):
        torch.nn.init.normal_(m.weight, std=std)
    return router


def test_attention_router_matches_the_per_token_definition():
    torch.manual_seed(0)
    router, x = attention_router(), torch.randn(20, 8)
    assert_close(router(x).double(), reference_attention_logits(router, x), rtol=1e-5, atol=1e-5)
    router64 = router.double()
    assert_close(router64(x.double()), reference_attention_logits(router, x))


def test_router_is_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    router, x = attention_router(), torch.randn(20, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = router(x)
    assert logits.dtype == torch.float32
    assert_close(logits, router(x), rtol=0, atol=0)


@pytest.mark.parametrize("order,norm", [("topk_softmax", True), ("softmax_topk", True), ("softmax_topk", False)])
def test_selection_matches_reference(order, norm):
    torch.manual_seed(0)
    logits = torch.randn(50, 8) * 2
    routing = select_experts(logits, 3, order, norm)
    experts, weights = reference_selection(logits, 3, order, norm)
    assert routing.experts.tolist() == experts
    assert_close(routing.weights.double(), torch.tensor(weights, dtype=torch.float64))
    assert routing.tokens_per_expert.tolist() == torch.bincount(torch.tensor(experts).flatten(), minlength=8).tolist()


def test_both_orders_agree_when_renormalised():
    logits = torch.randn(30, 8)
    a, b = select_experts(logits, 2, "topk_softmax"), select_experts(logits, 2, "softmax_topk", True)
    assert torch.equal(a.experts, b.experts)
    assert_close(a.weights, b.weights)


def test_expert_bias_changes_selection_but_not_weights():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 2.0])  # expert 3 forced in
    routing = select_experts(logits, 2, "topk_softmax", expert_bias=bias)
    assert routing.experts.tolist() == [[3, 0]]
    expected = torch.tensor([0.0, 3.0]).softmax(-1)  # from the logits of experts 3 and 0, bias-free
    assert_close(routing.weights[0], expected)


def hand_routing(logits: list, experts: list) -> Routing:
    logits_t = torch.tensor(logits, dtype=torch.float64)
    experts_t = torch.tensor(experts)
    n = logits_t.shape[1]
    return Routing(experts_t, torch.ones(experts_t.shape, dtype=torch.float64), logits_t.softmax(-1), logits_t,
                   torch.bincount(experts_t.flatten(), minlength=n))


def test_switch_aux_loss_on_hand_built_routings():
    # probs [0.75, 0.25] and [0.5, 0.5]; both tokens on expert 0:
    # N · Σ_e mean(prob_e) · count_e/(T·k) = 2 · (0.625 · 2/2 + 0.375 · 0) = 1.25
    skewed = hand_routing([[math.log(3.0), 0.0], [0.0, 0.0]], [[0], [0]])
    assert switch_aux_loss(skewed).item() == pytest.approx(1.25)
    # uniform probabilities and loads give exactly 1
    uniform = hand_routing([[0.0] * 4] * 2, [[0, 1], [2, 3]])
    assert switch_aux_loss(uniform).item() == pytest.approx(1.0)
    # k=2 on 3 experts: probs all 1/3, counts [2, 1, 1] over T·k = 4 → 3 · (1/3) · (2+1+1)/4 = 1
    spread = hand_routing([[0.0] * 3] * 2, [[0, 1], [0, 2]])
    assert switch_aux_loss(spread).item() == pytest.approx(1.0)


def test_switch_aux_loss_gradient_flows_through_probs_only():
    routing = hand_routing([[math.log(3.0), 0.0], [0.0, 0.0]], [[0], [0]])
    logits = routing.logits.clone().requires_grad_()
    routing.probs = logits.softmax(-1)
    switch_aux_loss(routing).backward()
    # d/dlogits of 2 · mean_t(p_t0): p(1-p) per token for expert 0, opposite for expert 1
    expected = torch.tensor([[0.75 * 0.25, -0.75 * 0.25], [0.25, -0.25]], dtype=torch.float64)
    assert_close(logits.grad, expected)


def test_z_loss_on_hand_built_logits():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # logsumexp: log 2 and log 4
    assert router_z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)


def test_attention_router_gradcheck_float64():
    torch.manual_seed(0)
    router = attention_router(hidden=4, experts=3).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in router.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in router.parameters()]

    def logits(x, *weights):
        return functional_call(router, dict(zip(names, weights)), (x,))

    assert torch.autograd.gradcheck(logits, (x, *params))


@pytest.mark.parametrize("order", ["topk_softmax", "softmax_topk"])
def test_selection_weights_gradcheck_float64(order):
    torch.manual_seed(0)
    logits = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: select_experts(z, 2, order, True).weights, (logits,))


def test_linear_router_and_its_noise():
    torch.manual_seed(0)
    router = LinearRouter(8, 4, noisy=True)
    torch.nn.init.normal_(router.weight)
    torch.nn.init.normal_(router.noise.weight, std=0.1)
    x = torch.randn(4096, 8)
    clean = x @ router.weight.T
    router.eval()
    assert_close(router(x), clean)  # no noise at evaluation
    router.train()
    eps = (router(x) - clean) / torch.nn.functional.softplus(x @ router.noise.weight.T)
    assert abs(eps.mean().item()) < 0.05 and abs(eps.std().item() - 1.0) < 0.05  # ε ~ N(0, 1)
    assert sorted(name for name, _ in router.named_parameters()) == ["noise.weight", "weight"]
