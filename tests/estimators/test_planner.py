"""The planner's step-time model and layout choice, checked against hand computations."""

from __future__ import annotations

import dataclasses

import pytest

from megamoe.config import compose
from megamoe.estimators import balance, memory
from megamoe.estimators.planner import (
    GPUS,
    Hardware,
    Layout,
    evaluate_layout,
    layouts,
    max_imbalance,
    plan,
    schedules,
    step_time,
    with_layout,
)

# One "GPU" of 1 TFLOP/s and 8 Gb/s (1 GB/s) links, two per node, so the figures are easy to follow.
TOY = Hardware("toy", memory_gib=64, peak_tflops=1.0, gpus_per_node=2, intra_node_gbps=8, inter_node_gbps=8,
               efficiency=1.0)


def tiny(*overrides: str):
    return compose(["+exp=tiny", "train.global_batch=16", *overrides])


def _step(cfg, gpus: int, layout: Layout, hw: Hardware = TOY):
    candidate = with_layout(cfg, layout)
    return candidate, step_time(candidate, memory.grid_shape(candidate, gpus), hw, balance.stage_layers(candidate))


def test_one_gpu_is_all_compute() -> None:
    cfg, step = _step(tiny(), 1, Layout(1, 1, 1, "1f1b", 2, "none", "even"))
    flops_per_token = balance.stage_costs(cfg, [4])[0]
    assert step.compute == pytest.approx(16 * 64 * flops_per_token / 1e12)  # the whole batch on one GPU
    assert step.bubble == step.all_to_all == step.send_recv == step.grad_reduce == 0


def test_1f1b_bubble_and_send_recv() -> None:
    """pp 2, m = 8 micro-batches of 2 × 64 tokens: (m + pp − 1) slots of the slowest rank's time."""
    cfg, step = _step(tiny(), 2, Layout(2, 1, 1, "1f1b", 2, "none", "even"))
    tokens = 2 * 64
    slowest = max(balance.stage_costs(cfg, [2, 2])) * tokens / 1e12
    boundary = 2 * tokens * 64 * 2 / 1e9  # forward + backward, bf16 hidden states, 1 GB/s
    assert step.compute == pytest.approx(8 * slowest)
    assert step.send_recv == pytest.approx(8 * boundary)
    assert step.bubble == pytest.approx(1 * (slowest + boundary))


def test_interleaving_shrinks_the_bubble_by_the_chunk_count() -> None:
    _, plain = _step(tiny(), 2, Layout(2, 1, 1, "1f1b", 2, "none", "even"))
    _, interleaved = _step(tiny(), 2, Layout(2, 1, 2, "interleaved_1f1b", 2, "none", "even"))
    assert interleaved.compute == pytest.approx(plain.compute)
    assert interleaved.bubble < plain.bubble / 1.5  # (pp − 1) / v slots, each with two chunks' send / recv


def test_all_to_all_and_gradient_reduce_follow_the_group_links() -> None:
    """ep 2 stays inside a node of 2; dp 4 spans two nodes, so it runs at the inter-node rate."""
    fast = dataclasses.replace(TOY, intra_node_gbps=80)
    cfg, inside = _step(tiny(), 4, Layout(1, 2, 1, "1f1b", 2, "none", "even"), fast)
    _, slow_link = _step(tiny(), 4, Layout(1, 2, 1, "1f1b", 2, "none", "even"), TOY)
    assert inside.all_to_all == pytest.approx(slow_link.all_to_all / 10)  # ep over NVLink-like links
    assert inside.grad_reduce == pytest.approx(slow_link.grad_reduce)  # dp 4 crosses nodes either way
    tokens, copies = 2 * 64, 4  # dispatch and combine, forward and backward
    per_layer = copies * tokens * 2 * 64 * 2 / 2 / 1e9  # top-2 copies, hidden 64, bf16, half leave the rank
    assert slow_link.all_to_all == pytest.approx(2 * 4 * per_layer)  # 2 micro-batches per rank, 4 layers


def test_only_moe_layers_exchange_tokens_and_reduce_experts() -> None:
    """Layers 0 and 3 dense (moe.layer_freq): the all-to-all runs in the 2 MoE layers, and the
    expert gradients reduced over edp (here 2) are those of 2 layers: 2 × 8 experts of 3·64·128,
    fp32, a ring of 2 at 1 GB/s."""
    layout = Layout(1, 2, 1, "1f1b", 2, "none", "even")
    _, uniform = _step(tiny(), 4, layout)
    _, mixed = _step(tiny("moe.layer_freq=[0,1,1,0]", "model.dense_ffn_hidden_size=96"), 4, layout)
    assert mixed.all_to_all == pytest.approx(uniform.all_to_all / 2)
    experts = 2 * 8 * 3 * 64 * 128 // 2  # this ep rank's half of each layer's experts
    # tiny's parameters less its experts, and 2 routers (3·8·64) that became 2 dense FFNs
    dense = 924_864 - 4 * 8 * 3 * 64 * 128 - 2 * 3 * 8 * 64 + 2 * 3 * 64 * 96
    ring = 2 * (4 - 1) / 4 * 4 * dense / 1e9 + 2 * (2 - 1) / 2 * 4 * experts / 1e9
    assert mixed.grad_reduce == pytest.approx(ring)


def test_layouts_cover_every_shape_once() -> None:
    shapes = {(lay.pp, lay.ep, lay.virtual_stages) for lay in layouts(tiny(), 8)}
    assert {(pp, ep) for pp, ep, _ in shapes} == {(pp, ep) for pp in (1, 2, 4) for ep in (1, 2, 4, 8) if ep * pp <= 8}
    assert all(v == 1 for pp, _, v in shapes if pp == 1)
    by_chunks = {v: {lay.schedule for lay in layouts(tiny(), 8) if lay.virtual_stages == v} for v in (1, 2)}
    assert by_chunks == {1: {"1f1b"},
                         2: {"interleaved_1f1b", "interleaved_zero_bubble", "zbv_zero_bubble", "dualpipev"}}
    assert schedules(4) == ("interleaved_1f1b", "interleaved_zero_bubble")  # a V holds exactly two


def test_memory_is_the_estimator_s_and_too_much_is_rejected() -> None:
    cfg = tiny()
    layout = Layout(2, 1, 1, "1f1b", 2, "none", "auto")
    fitted = evaluate_layout(cfg, layout, 2, TOY)
    expected = balance.memory_per_gpu(with_layout(cfg, layout), 2)[1].total / memory.GIB
    assert fitted.memory_gib == pytest.approx(expected)
    small = dataclasses.replace(TOY, memory_gib=expected / 0.9 * 0.99)
    rejected = evaluate_layout(cfg, layout, 2, small)
    assert rejected.reason.startswith("out of memory") and rejected.memory_gib == pytest.approx(expected)
    invalid = evaluate_layout(cfg, Layout(2, 1, 8, "interleaved_1f1b", 2, "none", "even"), 2, TOY)
    assert invalid.reason.startswith("not valid")


@pytest.mark.slow
def test_m32_on_80gb_needs_expert_parallelism() -> None:
    """The paper's layout (pp 8, ep 1) does not fit an 80 GiB GPU; the best layout spreads the experts."""
    cfg = compose(["+exp=m32_2000b"])
    result = plan(cfg, 256, GPUS["h100-80gb"])
    best = result.plans[0]
    assert best.memory_gib <= GPUS["h100-80gb"].usable_gib and best.layout.ep > 1
    assert not any(p.layout.pp == 8 and p.layout.ep == 1 for p in result.plans)
    assert 0.2 < best.mfu < GPUS["h100-80gb"].efficiency  # the bubble and the communication cost something


@pytest.mark.slow
def test_imbalance_grows_the_memory_and_the_best_layout_says_how_much_it_takes() -> None:
    """M32 on 256 H100s: the estimate grows with the expert imbalance (the busiest ep rank receives
    more rows); the planner's best layout fits up to the largest imbalance it reports, and not
    past it."""
    cfg, hw = compose(["+exp=m32_2000b"]), GPUS["h100-80gb"]
    best = plan(cfg, 256, hw).plans[0]
    at = {f: evaluate_layout(cfg, best.layout, 256, hw, f).memory_gib for f in (1.0, 1.5)}
    assert at[1.5] > at[1.0] == pytest.approx(best.memory_gib)
    most = max_imbalance(cfg, best.layout, 256, hw)
    assert 1.0 < most < 16
    assert evaluate_layout(cfg, best.layout, 256, hw, most).memory_gib <= hw.usable_gib
    assert evaluate_layout(cfg, best.layout, 256, hw, most + 0.02).reason.startswith("out of memory")
    assert max_imbalance(compose(["+exp=tiny"]), Layout(1, 1, 1, "1f1b", 2, "none", "even"), 1, TOY) == 4.0  # E / k
