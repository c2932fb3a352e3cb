"""Expert placement and the all-to-all regroup index, in one process (exchanges: tests/dist)."""

from __future__ import annotations

import pytest
import torch

from megamoe.config import compose
from megamoe.model.moe import ExpertBank
from megamoe.model.yuan import YuanModel
from megamoe.parallel.expert import expert_range, is_expert_param, source_major_to_expert_major


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


def test_expert_params_are_exactly_the_expert_banks_of_the_model() -> None:
    cfg = compose(["+exp=tiny", "moe.num_shared_experts=1"])  # shared experts are dense params
    with torch.device("meta"):
        model = YuanModel(cfg)
    banks = {
        f"{module_name}.{name}"
        for module_name, module in model.named_modules()
        if isinstance(module, ExpertBank)
        for name, _ in module.named_parameters()
    }
    names = [name for name, _ in model.named_parameters()]
    assert len(banks) == 2 * cfg.model.num_layers
    assert {name for name in names if is_expert_param(name)} == banks
    assert any("shared_experts" in name for name in names)


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
