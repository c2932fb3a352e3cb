"""Expert parallelism on real gloo groups: the all-to-all exchange against one process.

Routing is arranged so every awkward split occurs: rank 0 sends nothing to any other rank,
the last expert receives no tokens at all, and ranks hold different numbers of tokens. Some
rank still receives rows from several sources for several of its experts, so the received
blocks must be regrouped from [source][expert] to [expert][source].
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from megamoe.config.schema import MoEConfig
from megamoe.nn.moe import MoELayer
from megamoe.parallel.expert import AllToAllExchange, expert_range

from .launcher import run_distributed

NUM_EXPERTS = 8
HIDDEN = 12


# --- the exchange alone --------------------------------------------------------------------


def _exchange_inputs(rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank's expert-sorted rows (all distinct) and per-expert counts, with the awkward splits built in."""
    gen = torch.Generator().manual_seed(100 + rank)
    counts = torch.randint(1, 4, (NUM_EXPERTS,), generator=gen)
    counts[1] = 0  # expert 1 receives nothing from anyone
    if rank == 0:
        counts[expert_range(NUM_EXPERTS, world_size, 0).stop :] = 0  # rank 0 sends only to itself
    if rank == world_size - 1 and world_size > 2:
        counts[:] = 0  # the last rank has no tokens at all (with 2 ranks, rank 1 must send to rank 0)
    return torch.randn(int(counts.sum()), 3, generator=gen), counts


def _expert_of_row(counts: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(NUM_EXPERTS), counts)


def _exchange_worker(rank: int, world_size: int) -> dict[str, Any]:
    tokens, counts = _exchange_inputs(rank, world_size)
    tokens.requires_grad_(True)
    exchange = AllToAllExchange(NUM_EXPERTS, dist.group.WORLD)
    local, local_counts = exchange.dispatch(tokens, counts)
    # "expert" e multiplies by e + 1, so a row sent to the wrong expert shows in the result
    scale = torch.repeat_interleave(torch.arange(len(local_counts)) + exchange.first_expert + 1.0,
                                    torch.tensor(local_counts, dtype=torch.int64))
    back = exchange.combine(local * scale.unsqueeze(-1))
    grad_out = torch.randn(back.shape, generator=torch.Generator().manual_seed(200 + rank))
    back.backward(grad_out)
    return {"local": local.detach(), "local_counts": local_counts, "back": back.detach(),
            "grad": tokens.grad, "grad_out": grad_out}


def test_all_to_all_round_trip_with_empty_splits(runs: dict[str, list[dict[str, Any]]], world_size: int) -> None:
    results = runs["exchange"]
    inputs = [_exchange_inputs(r, world_size) for r in range(world_size)]
    sent = torch.stack([counts for _, counts in inputs])  # [source rank, global expert]
    mixed = [int(((sent[:, expert_range(NUM_EXPERTS, world_size, r)] > 0).sum(0) >= 2).sum()) for r in range(world_size)]
    assert max(mixed) >= 2, "no rank gets rows from ≥ 2 sources for ≥ 2 of its experts: the regroup goes untested"
    for rank, got in enumerate(results):
        owned = expert_range(NUM_EXPERTS, world_size, rank)
        # each local expert's rows: source 0's rows for it, then source 1's, ...
        rows = [tokens[_expert_of_row(counts) == e] for e in owned for tokens, counts in inputs]
        assert torch.equal(got["local"], torch.cat(rows).reshape(-1, 3))
        assert got["local_counts"] == [sum(int(c[e]) for _, c in inputs) for e in owned]
        tokens, counts = inputs[rank]
        factor = (_expert_of_row(counts) + 1.0).unsqueeze(-1)
        assert torch.equal(got["back"], tokens * factor)
        assert torch.equal(got["grad"], got["grad_out"] * factor)


# --- inside the MoE layer, against the single-process layer ----------------------------------

MOE = MoEConfig(num_experts=NUM_EXPERTS, top_k=2, ffn_hidden_size=16, router="linear", aux_free_bias=True,
                num_shared_experts=1)


def _full_layer() -> MoELayer:
    """The single-process layer whose router sends rank 0's tokens only to rank 0's experts.

    Router rows of experts 0..1 get a large weight on input feature 0, which only rank 0's
    tokens carry strongly (ep ≤ 4, so rank 0 owns at least experts 0 and 1); the selection
    bias rules the last expert out for everyone.
    """
    layer = MoELayer(HIDDEN, MOE, layer_index=0)
    layer.reset_parameters(std=0.2, seed=1234)
    with torch.no_grad():
        layer.router.weight[:2, 0] += 2.0
        layer.expert_bias[-1] = -2.0  # below any other expert's probability + bias (≥ 0)
    return layer


def _layer_inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank's tokens (a different number per rank) and the upstream gradient of its output."""
    gen = torch.Generator().manual_seed(300 + rank)
    tokens = torch.randn(9 + 4 * rank, HIDDEN, generator=gen)
    if rank == 0:
        tokens[:, 0] += 4.0
    return tokens, torch.randn(tokens.shape, generator=gen)


def _layer_worker(rank: int, world_size: int) -> dict[str, Any]:
    exchange = AllToAllExchange(NUM_EXPERTS, dist.group.WORLD)
    owned = slice(exchange.first_expert, exchange.first_expert + exchange.num_local_experts)
    layer = MoELayer(HIDDEN, MOE, layer_index=0, exchange=exchange)
    full = _full_layer().state_dict()
    layer.load_state_dict({k: v[owned] if k.startswith("experts.") else v for k, v in full.items()})
    tokens, grad_out = _layer_inputs(rank)
    tokens.requires_grad_(True)
    out = layer(tokens)
    out.backward(grad_out)
    return {"out": out.detach(), "grad": tokens.grad, "routed": layer.last_stats.tokens_per_expert,
            "param_grads": {name: p.grad for name, p in layer.named_parameters()}}


def test_moe_layer_with_all_to_all_equals_single_process(runs: dict[str, list[dict[str, Any]]], world_size: int) -> None:
    results = runs["layer"]
    routed = torch.stack([r["routed"] for r in results])  # [source rank, global expert]
    assert routed[0, expert_range(NUM_EXPERTS, world_size, 0).stop :].sum() == 0, "rank 0 must send only to itself"
    assert routed[:, -1].sum() == 0 and routed[1:, :2].sum() > 0, "routing lost its empty/non-empty splits"

    inputs = [_layer_inputs(r) for r in range(world_size)]
    tokens = torch.cat([t for t, _ in inputs]).requires_grad_(True)
    reference = _full_layer()
    out = reference(tokens)
    out.backward(torch.cat([g for _, g in inputs]))
    close = dict(rtol=1e-5, atol=1e-6)
    for got, want_out, want_grad in zip(results, out.detach().split([len(t) for t, _ in inputs]),
                                        tokens.grad.split([len(t) for t, _ in inputs])):
        torch.testing.assert_close(got["out"], want_out, **close)
        torch.testing.assert_close(got["grad"], want_grad, **close)
    for name, param in reference.named_parameters():
        if name.startswith("experts."):  # each rank's slice saw every rank's tokens for its experts
            got = torch.cat([r["param_grads"][name] for r in results])
        else:  # replicated: each rank's grad is its own tokens' share
            got = sum(r["param_grads"][name] for r in results)
        torch.testing.assert_close(got, param.grad, **close, msg=lambda m: f"{name}: {m}")


# --- one process group per world size runs both workers (starting processes is the slow part) ---


def _worker(rank: int, world_size: int, _: Any) -> dict[str, dict[str, Any]]:
    return {"exchange": _exchange_worker(rank, world_size), "layer": _layer_worker(rank, world_size)}


@pytest.fixture(scope="module", params=[2, pytest.param(4, marks=pytest.mark.slow)], ids=lambda n: f"world{n}")
def world_size(request: pytest.FixtureRequest) -> int:
    return request.param


@pytest.fixture(scope="module")
def runs(world_size: int) -> dict[str, list[dict[str, Any]]]:
    per_rank = run_distributed(_worker, world_size)
    return {test: [result[test] for result in per_rank] for test in ("exchange", "layer")}
