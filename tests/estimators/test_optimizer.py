"""Muon's Newton–Schulz FLOPs per layer and rank, and the planner's step that includes them."""

from __future__ import annotations

import pytest

from megamoe.config import compose
from megamoe.estimators import balance, optimizer, planner
from megamoe.estimators.memory import grid_shape


def test_adamw_has_no_newton_schulz() -> None:
    cfg = compose(["+exp=tiny"])
    assert optimizer.newton_schulz_per_layer(cfg) == (optimizer.LayerNewtonSchulz(0, 0),) * 4


def test_expert_banks_are_counted_by_hand_and_split_over_expert_parallel_ranks() -> None:
    """tiny: 8 experts of H 64 → FFN 128, gate and up stacked in w1: 3 × 8 matrices of 64 × 128,
    each 4A²B + 2A³ per iteration; a dense layer (moe.layer_freq) has no routed experts."""
    cfg = compose(["+exp=tiny", "train.optimizer=muon", "moe.layer_freq=[0,1,1,0]", "model.dense_ffn_hidden_size=96"])
    steps, short, long = cfg.train.muon.ns_steps, 64, 128
    per_layer = optimizer.newton_schulz_per_layer(cfg)
    assert per_layer[1].experts == per_layer[2].experts == 3 * 8 * steps * (4 * short**2 * long + 2 * short**3)
    assert per_layer[0].experts == per_layer[3].experts == 0
    assert per_layer[0].shared > 0 and per_layer[0].shared != per_layer[1].shared  # a dense FFN against a router
    assert optimizer.rank_newton_schulz_flops(cfg, [1, 2], ep=2) == (
        per_layer[1].shared + per_layer[2].shared + per_layer[1].experts)


def test_the_planner_charges_muon_its_slowest_rank_s_newton_schulz() -> None:
    """The same layout under AdamW and Muon: the step differs by the Newton–Schulz term only,
    the slowest rank's FLOPs ÷ the sustained throughput."""
    adamw, muon = (compose(["+exp=tiny", "parallel.pp=2", "parallel.ep=2", f"train.optimizer={name}"])
                   for name in ("adamw", "muon"))
    hw, layers, lay = planner.GPUS["h100-80gb"], balance.stage_layers(muon), grid_shape(muon, 8)
    with_adamw, with_muon = (planner.step_time(cfg, lay, hw, layers) for cfg in (adamw, muon))
    assert with_adamw.newton_schulz == 0
    held = [[0, 1], [2, 3]]
    expected = max(optimizer.rank_newton_schulz_flops(muon, r, 2) for r in held) / hw.sustained_flops
    assert with_muon.newton_schulz == pytest.approx(expected) and expected > 0
    assert with_muon.total - with_adamw.total == pytest.approx(expected)
