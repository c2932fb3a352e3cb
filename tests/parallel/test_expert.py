"""Expert placement and the all-to-all regroup index, in one process (exchanges: tests/dist)."""

from __future__ import annotations

import pytest
import torch

from megamoe.checkpoint.names import expert_bank_names
from megamoe.config import compose
from megamoe.models import build_stage
from megamoe.nn.moe import ExpertBank
from megamoe.nn.moe.experts import expert_parameters
from megamoe.parallel.expert import expert_range, source_major_to_expert_major


@pytest.mark.parametrize("num_experts, ep_size", [(8, 1), (8, 2), (8, 8), (32, 4)])
def test_expert_ranges_partition_the_experts_in_rank_order(num_experts: int, ep_size: int) -> None:
    ranges = [expert_range(num_experts, ep_size, r) for r in range(ep_size)]
    assert [e for owned in ranges for e in owned] == list(range(num_experts))
    assert {len(owned) for owned in ranges} == {num_experts // ep_size}


def test_expert_range_rejects_uneven_split_and_bad_rank() -> None:
    with pytest.raises(ValueError, match="num_experts=8 is not divisible by parallel.ep=3"):
        expert_range(8, 3, 0)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        expert_range(8, 2, 2)


def test_expert_params_are_the_expert_banks_whatever_they_are_called() -> None:
    """Which gradients are averaged over edp (experts) is decided by module type, not by names:
    renaming a layer's bank moves its names but not its parameters' group."""
    cfg = compose(["+exp=tiny", "moe.num_shared_experts=1"])  # shared experts are dense params
    with torch.device("meta"):
        model = build_stage(cfg)
    banks = [module for module in model.modules() if isinstance(module, ExpertBank)]
    assert len(banks) == cfg.model.num_layers
    expected = {id(p) for bank in banks for p in (bank.w1, bank.w2)}
    assert {id(p) for p in expert_parameters(model)} == expected
    moe = model.layers["1"].mlp
    moe.routed = moe.experts  # the same bank under another name ...
    del moe.experts
    assert "layers.1.mlp.routed.w1" in expert_bank_names(model) and "layers.1.mlp.experts.w1" not in dict(
        model.named_parameters())
    assert {id(p) for p in expert_parameters(model)} == expected  # ... is still the experts' group
    shared = {id(p) for p in moe.shared_experts.parameters()}
    assert shared and not shared & expected


def _regroup_reference(counts: torch.Tensor) -> list[int]:
    """Row numbers of the [source][expert] blocks, listed expert by expert, source by source."""
    starts, offset = {}, 0
    for s in range(counts.shape[0]):
        for e in range(counts.shape[1]):
            starts[s, e], offset = offset, offset + int(counts[s, e])
    return [starts[s, e] + i for e in range(counts.shape[1]) for s in range(counts.shape[0])
            for i in range(int(counts[s, e]))]


@pytest.mark.parametrize("shape", [(1, 1), (1, 4), (4, 1), (2, 4), (4, 2), (3, 5)])
def test_regroup_index_matches_block_by_block_reference(shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    for trial in range(20):
        counts = torch.randint(0, 4, shape, generator=gen) * (torch.rand(shape, generator=gen) > 0.3)
        if trial == 0:
            counts.zero_()  # nothing received at all
        total = int(counts.sum())
        index = source_major_to_expert_major(counts, total)
        assert index.tolist() == _regroup_reference(counts)
        inverse = source_major_to_expert_major(counts.t(), total)  # as AllToAllExchange.combine uses it
        assert torch.equal(index[inverse], torch.arange(total))
