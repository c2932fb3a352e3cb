"""Gradient sync, norm and clipping in one process (the multi-process cases are in tests/dist)."""

from __future__ import annotations

import math
from typing import Iterator

import pytest
import torch
import torch.distributed as dist
from torch.nn import Parameter

from megamoe.parallel.grads import GradSync, clip_grads_, global_grad_norm, plan_buckets


def _params(shapes: list[tuple[int, ...]], seed: int) -> list[Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = [Parameter(torch.zeros(s)) for s in shapes]
    for p in params:
        p.grad = torch.randint(-50, 50, p.shape, generator=gen).float()  # sums and /2, /4 are exact
    return params


@pytest.mark.parametrize("bucket_numel", [1, 3, 5, 7, 16, 1000])
def test_bucket_plan_matches_chunking_the_concatenation(bucket_numel: int) -> None:
    """Element k of the concatenated gradients belongs to bucket k // B at offset k % B."""
    numels = [15, 0, 7, 16, 1, 4]
    buckets = plan_buckets(numels, bucket_numel)
    placed = []
    for b, bucket in enumerate(buckets):
        for pc in bucket:
            placed += [(pc.param, pc.start + j, b, pc.offset + j) for j in range(pc.numel)]
    reference, k = [], 0
    for param, numel in enumerate(numels):
        for j in range(numel):
            reference.append((param, j, k // bucket_numel, k % bucket_numel))
            k += 1
    assert placed == reference
    assert all(sum(pc.numel for pc in b) == bucket_numel for b in buckets[:-1])


def test_without_groups_grads_are_only_divided() -> None:
    """dp=2, ep=2 leaves edp=1: no expert communication, but the expert grads are still halved."""
    dense, expert = _params([(3, 4), (5,)], seed=1), _params([(2, 3, 3)], seed=2)
    expected = [p.grad / 2 for p in dense + expert]
    dense[1].grad = None
    expected[1] = torch.zeros(5)
    GradSync(dense, expert, None, None, dp_size=2).all_reduce()
    for p, e in zip(dense + expert, expected):
        assert torch.equal(p.grad, e)


@pytest.fixture
def world_of_one() -> Iterator[dist.ProcessGroup]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("bucket_numel", [1, 4, 7, 10_000])
def test_bucketed_path_moves_every_element_back(world_of_one: dist.ProcessGroup, bucket_numel: int) -> None:
    """With one process the all-reduce is the identity, so any mis-packed element shows."""
    dense, expert = _params([(3, 4), (5,), (2, 2, 2)], seed=3), _params([(2, 3, 3), (1,)], seed=4)
    expected = [p.grad / 4 for p in dense + expert]
    GradSync(dense, expert, world_of_one, world_of_one, dp_size=4, bucket_mb=bucket_numel * 4 / 2**20).all_reduce()
    for p, e in zip(dense + expert, expected):
        assert torch.equal(p.grad, e)


def test_norm_counts_replicas_once_and_skips_excluded() -> None:
    dense, expert = _params([(3, 4), (5,)], seed=5), _params([(2, 3, 3)], seed=6)
    flat = torch.cat([p.grad.flatten() for p in dense + expert])
    assert torch.allclose(global_grad_norm(dense, expert, 1, 1, None), flat.norm(), rtol=1e-6)
    # this rank's share when the dense part is replicated 4× and the experts 2×
    share = (torch.cat([p.grad.flatten() for p in dense]).square().sum() / 4 + expert[0].grad.square().sum() / 2).sqrt()
    assert torch.allclose(global_grad_norm(dense, expert, 4, 2, None), share, rtol=1e-6)
    without = torch.cat([dense[1].grad.flatten(), expert[0].grad.flatten()]).norm()
    assert torch.allclose(global_grad_norm(dense, expert, 1, 1, None, exclude={dense[0]}), without, rtol=1e-6)


def test_nonfinite_norm_is_returned() -> None:
    dense = _params([(3,)], seed=7)
    dense[0].grad[1] = math.inf
    assert global_grad_norm(dense, [], 1, 1, None).isinf()
    dense[0].grad[1] = math.nan
    assert global_grad_norm(dense, [], 1, 1, None).isnan()


def test_clipping() -> None:
    params = _params([(3, 4), (5,)], seed=8)
    before = [p.grad.clone() for p in params]
    norm = global_grad_norm(params, [], 1, 1, None)
    clip_grads_(params, 0.0, norm)  # 0 = off
    clip_grads_(params, 2 * norm.item(), norm)  # under the limit
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))
    clip_grads_(params, 1.0, norm)
    for p, b in zip(params, before):
        torch.testing.assert_close(p.grad, b / (norm + 1e-6))
    assert global_grad_norm(params, [], 1, 1, None).item() == pytest.approx(1.0, rel=1e-5)
