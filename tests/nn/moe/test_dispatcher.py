"""Sort-based dispatch and combine against a per-token loop; capacity-factor dropping; token choice
unchanged bit for bit by routings becoming assignment lists."""

import dataclasses
from typing import Optional

import pytest
import torch
from torch.testing import assert_close

from megamoe.nn.moe.dispatcher import LocalExchange, Permutation, expert_capacity, permute, unpermute
from megamoe.nn.moe.router import Routing, select_experts


def expert_fn(e: int, rows: torch.Tensor) -> torch.Tensor:
    """A distinct nonlinear function per expert, so a row sent to the wrong expert shows."""
    return torch.tanh(rows * (e + 1)) + e


def run_sorted(x: torch.Tensor, routing: Routing, capacity=None) -> tuple[torch.Tensor, torch.Tensor]:
    """permute → LocalExchange → per-expert slices → combine → unpermute."""
    exchange = LocalExchange(routing.probs.shape[-1])
    sorted_tokens, perm = permute(x, routing, capacity)
    local, counts = exchange.dispatch(sorted_tokens, perm.tokens_per_expert)
    outputs = torch.cat([expert_fn(e, rows) for e, rows in enumerate(local.split(counts))])
    return unpermute(exchange.combine(outputs), perm, x.shape[0]), perm.dropped


def per_token_reference(x: torch.Tensor, routing: Routing, kept=None) -> torch.Tensor:
    """out_t = Σ_k w_tk · f_{e_tk}(x_t), looping over tokens and their k choices."""
    rows = []
    for t in range(x.shape[0]):
        row = torch.zeros_like(x[t])
        for slot in range(routing.experts.shape[1]):
            if kept is None or (t, slot) in kept:
                e = int(routing.experts[t, slot])
                row = row + routing.weights[t, slot] * expert_fn(e, x[t])
        rows.append(row)
    return torch.stack(rows)


def random_routing(tokens: int, experts: int, k: int, seed: int = 0) -> tuple[torch.Tensor, Routing]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 5, generator=gen)
    logits = torch.randn(tokens, experts, generator=gen) * 2
    return x, select_experts(logits, k, "topk_softmax")


def test_permute_groups_rows_by_expert():
    x, routing = random_routing(40, 6, 2)
    sorted_tokens, perm = permute(x, routing)
    owner = routing.experts.flatten()[torch.argsort(routing.experts.flatten(), stable=True)]
    assert torch.equal(owner, torch.repeat_interleave(torch.arange(6), perm.tokens_per_expert))
    assert torch.equal(sorted_tokens, x[perm.source_token])
    assert perm.tokens_per_expert.sum() == 80 and perm.dropped == 0


@pytest.mark.parametrize("tokens,experts,k", [(40, 6, 2), (7, 8, 3), (1, 4, 1)])
def test_dispatch_and_combine_match_a_per_token_loop(tokens, experts, k):
    x, routing = random_routing(tokens, experts, k)
    x.requires_grad_()
    routing.weights.requires_grad_()
    out, dropped = run_sorted(x, routing)
    expected = per_token_reference(x, routing)
    assert_close(out, expected)
    assert dropped == 0
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, routing.weights), grad)
    want = torch.autograd.grad(expected, (x, routing.weights), grad)
    for a, b in zip(got, want):
        assert_close(a, b)


def test_capacity_drops_the_lowest_weighted_and_counts_them():
    # Four tokens all on expert 0 (k=1) with weights 0.1, 0.9, 0.5, 0.7; capacity 2 keeps tokens 1 and 3.
    x = torch.randn(4, 5)
    weights = torch.tensor([[0.1], [0.9], [0.5], [0.7]])
    experts = torch.zeros(4, 1, dtype=torch.int64)
    routing = Routing(experts, weights, torch.full((4, 2), 0.5), torch.zeros(4, 2), torch.tensor([4, 0]))
    out, dropped = run_sorted(x, routing, capacity=2)
    assert dropped == 2
    assert_close(out, per_token_reference(x, routing, kept={(1, 0), (3, 0)}))
    assert torch.equal(out[0], torch.zeros(5)) and torch.equal(out[2], torch.zeros(5))


def test_capacity_matches_a_per_expert_reference():
    x, routing = random_routing(60, 4, 2, seed=3)
    capacity = expert_capacity(60, 2, 4, capacity_factor=0.75)  # ceil(0.75 · 60 · 2 / 4) = 23 of an average 30
    kept = set()
    for e in range(4):
        slots = [(t, s) for t in range(60) for s in range(2) if routing.experts[t, s] == e]
        slots.sort(key=lambda ts: -float(routing.weights[ts]))
        kept.update(slots[:capacity])
    out, dropped = run_sorted(x, routing, capacity)
    assert capacity == 23
    assert int(dropped) == 120 - len(kept) > 0
    assert_close(out, per_token_reference(x, routing, kept))


def test_local_exchange_moves_nothing():
    exchange = LocalExchange(4)
    tokens = torch.randn(6, 3)
    local, counts = exchange.dispatch(tokens, torch.tensor([1, 0, 3, 2]))
    assert local is tokens and counts == [1, 0, 3, 2]
    assert exchange.combine(local) is local
    assert (exchange.first_expert, exchange.num_local_experts) == (0, 4)


def permute_token_major(
    x: torch.Tensor, routing: Routing, capacity: Optional[int] = None
) -> tuple[torch.Tensor, Permutation]:
    """``permute`` as it was when a routing could only be [T, k] (commit 14a4eff), kept verbatim
    as the reference that token choice still permutes bit for bit the same."""
    flat_experts = routing.experts.flatten()
    flat_weights = routing.weights.flatten()
    counts = routing.tokens_per_expert
    if capacity is None:
        order = torch.argsort(flat_experts, stable=True)
        dropped = counts.new_zeros(())
    else:
        by_weight = torch.argsort(flat_weights, descending=True, stable=True)
        order = by_weight[torch.argsort(flat_experts[by_weight], stable=True)]
        group_start = torch.cumsum(counts, dim=0) - counts
        rank_in_expert = torch.arange(order.numel(), device=order.device) - group_start[flat_experts[order]]
        keep = rank_in_expert < capacity
        order, dropped, counts = order[keep], (~keep).sum(), counts.clamp(max=capacity)
    source_token = order // routing.experts.shape[-1]
    return x.index_select(0, source_token), Permutation(source_token, flat_weights[order], counts, dropped)


@pytest.mark.parametrize("capacity", [None, 23])
def test_token_choice_permutes_bit_for_bit_as_before_assignment_lists(capacity):
    """The [T, k] routing and the same assignments as a flat list with explicit tokens."""
    x, routing = random_routing(60, 4, 2, seed=3)
    flat = Routing(routing.experts.flatten(), routing.weights.flatten(), routing.probs, routing.logits,
                   routing.tokens_per_expert, tokens=torch.arange(60).repeat_interleave(2))
    want_rows, want = permute_token_major(x, routing, capacity)
    assert capacity is None or want.dropped > 0
    for layout in (routing, flat):
        rows, got = permute(x, layout, capacity)
        assert torch.equal(rows, want_rows)
        for field in dataclasses.fields(Permutation):
            assert torch.equal(getattr(got, field.name), getattr(want, field.name)), field.name
