"""Gradient sync and global grad norm in real gloo process groups, against hand-made references.

One 4-process run serves both tests (starting processes is the slow part):
- GradSync with dp = 4 = edp 2 × ep 2 (ep innermost: ep groups {0,1} {2,3}, expert replicas
  {0,2} {1,3}) against the average computed here from every rank's gradients;
- global_grad_norm on a (pp=2, dp=2) grid against the norm of the unique gradients.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.nn import Parameter

from megamoe.parallel.grads import GradChunk, GradSync, global_grad_norm

from .launcher import run_distributed

DENSE, EXPERT = 0, 1

DENSE_SHAPES = [(5, 3), (7,), (4, 4), (1,)]
EXPERT_SHAPES = [(2, 3, 4), (2, 4, 3)]  # each rank's bank of 2 local experts
BUCKET_NUMELS = [1, 5, 7, 6_553_600]  # smaller than any tensor; boundaries mid-tensor; one bucket

# The grid for the norm: stage 0's first dense param is the embedding; stage 1 holds a tied copy
# (lm_head) whose gradient equals it after the tied sync. Each stage has 4 experts of shape (3, 2).
STAGE_DENSE = {0: [(6, 4), (3, 3), (5,)], 1: [(4, 2), (4,)]}
EXPERTS_PER_STAGE = 4


def _rank_grad(kind: int, rank: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Rank ``rank``'s local gradient; integer-valued, so sums and division by 4 are exact."""
    gen = torch.Generator().manual_seed(1000 * kind + 10 * rank + index)
    return torch.randint(-100, 100, shape, generator=gen).float()


def _has_grad(rank: int, index: int) -> bool:
    return not (rank == 0 and index == 1)  # rank 0 never used dense param 1: its grad is None


def _sync(rank: int) -> list[list[torch.Tensor]]:
    edp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    synced = []
    for numel in BUCKET_NUMELS:
        dense = [Parameter(torch.zeros(s)) for s in DENSE_SHAPES]
        expert = [Parameter(torch.zeros(s)) for s in EXPERT_SHAPES]
        sync = GradSync([GradChunk("stage", dense, expert)], dist.group.WORLD, edp_groups[rank % 2],
                        bucket_mb=numel * 4 / 2**20)
        sync.start_step(divisor=4)
        for i, p in enumerate(dense):
            p.grad = _rank_grad(DENSE, rank, i, p.shape) if _has_grad(rank, i) else None
        for i, p in enumerate(expert):
            p.grad = _rank_grad(EXPERT, rank, i, p.shape)
        sync.finish()
        synced.append([p.grad for p in dense + expert])
    return synced


def _unique(stage: int, kind: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The one true gradient of a parameter, whichever ranks hold a replica of it."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 * stage + 100 * kind + index))


def _embedding_grad() -> torch.Tensor:
    return _unique(0, DENSE, 0, STAGE_DENSE[0][0])


def _norms(rank: int) -> dict[tuple[int, bool], float]:
    stage, dp_rank = divmod(rank, 2)
    dense = [Parameter(torch.zeros(s)) for s in STAGE_DENSE[stage]]
    for i, p in enumerate(dense):
        p.grad = _unique(stage, DENSE, i, p.shape)
    lm_head = [Parameter(torch.zeros(STAGE_DENSE[0][0]))] if stage == 1 else []
    for p in lm_head:
        p.grad = _embedding_grad()
    norms = {}
    for ep in (1, 2):
        local = EXPERTS_PER_STAGE // ep
        first = dp_rank * local if ep == 2 else 0  # ep=1: both dp ranks hold all experts (edp=2)
        bank = Parameter(torch.zeros(local, 3, 2))
        bank.grad = torch.stack([_unique(stage, EXPERT, e, (3, 2)) for e in range(first, first + local)])
        for exclude in (True, False):
            norm = global_grad_norm(dense + lm_head, [bank], 2, 2 // ep, dist.group.WORLD, exclude=lm_head if exclude else ())
            norms[(ep, exclude)] = norm.item()
    return norms


def _worker(rank: int, world_size: int, _: Any) -> dict[str, Any]:
    return {"sync": _sync(rank), "norms": _norms(rank)}


@pytest.fixture(scope="module")
def four_ranks() -> list[dict[str, Any]]:
    return run_distributed(_worker, 4)


def test_grad_sync_dp4_ep2_equals_hand_average(four_ranks: list[dict[str, Any]]) -> None:
    dense = [sum(_rank_grad(DENSE, r, i, s) for r in range(4) if _has_grad(r, i)) / 4 for i, s in enumerate(DENSE_SHAPES)]
    for rank, result in enumerate(four_ranks):
        replicas = (rank % 2, rank % 2 + 2)
        expert = [sum(_rank_grad(EXPERT, r, i, s) for r in replicas) / 4 for i, s in enumerate(EXPERT_SHAPES)]
        for numel, grads in zip(BUCKET_NUMELS, result["sync"]):
            for i, (got, want) in enumerate(zip(grads, dense + expert)):
                assert torch.equal(got, want), f"rank {rank}, bucket of {numel} elements, param {i}"


def test_global_grad_norm_pp2_dp2_counts_each_parameter_once(four_ranks: list[dict[str, Any]]) -> None:
    unique = [_unique(s, DENSE, i, shape) for s, shapes in STAGE_DENSE.items() for i, shape in enumerate(shapes)]
    unique += [_unique(s, EXPERT, e, (3, 2)) for s in STAGE_DENSE for e in range(EXPERTS_PER_STAGE)]
    expected = torch.cat([g.flatten() for g in unique]).norm().item()
    with_copy = (expected**2 + _embedding_grad().square().sum().item()) ** 0.5  # lm_head not excluded
    for rank, result in enumerate(four_ranks):
        for ep in (1, 2):
            assert result["norms"][(ep, True)] == pytest.approx(expected, rel=1e-6), (rank, ep)
            assert result["norms"][(ep, False)] == pytest.approx(with_copy, rel=1e-6), (rank, ep)
