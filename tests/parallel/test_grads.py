"""Gradient sync, norm and clipping in one process (the multi-process cases are in tests/dist)."""

from __future__ import annotations

import math
from typing import Iterator, Optional

import pytest
import torch
import torch.distributed as dist
from torch.nn import Parameter

from megamoe.parallel import grads
from megamoe.parallel.grads import GradChunk, GradSync, clip_grads_, global_grad_norm


def _params(shapes: list[tuple[int, ...]], seed: int) -> list[Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = [Parameter(torch.zeros(s)) for s in shapes]
    for p in params:
        p.grad = torch.randint(-50, 50, p.shape, generator=gen).float()  # sums and /2, /4 are exact
    return params


def _sync(dense: list[Parameter], expert: list[Parameter], group: Optional[dist.ProcessGroup], divisor: int,
          bucket_numel: int = 10_000, overlap: bool = False) -> GradSync:
    """A GradSync over one chunk whose step has started with the parameters' current gradients."""
    grads = [p.grad for p in dense + expert]
    sync = GradSync([GradChunk("chunk", dense, expert)], group, group, bucket_mb=bucket_numel * 4 / 2**20,
                    overlap=overlap)
    sync.start_step(divisor)
    for p, g in zip(dense + expert, grads):
        p.grad = g  # assigned over the views: finish adopts them
    return sync


def test_without_groups_grads_are_only_divided() -> None:
    """dp=2, ep=2 leaves edp=1: no expert communication, but the expert grads are still halved."""
    dense, expert = _params([(3, 4), (5,)], seed=1), _params([(2, 3, 3)], seed=2)
    expected = [p.grad / 2 for p in dense + expert]
    dense[1].grad = None
    expected[1] = torch.zeros(5)
    _sync(dense, expert, None, divisor=2).finish()
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
    """With one process the all-reduce is the identity, so any misplaced element shows."""
    dense, expert = _params([(3, 4), (5,), (2, 2, 2)], seed=3), _params([(2, 3, 3), (1,)], seed=4)
    expected = [p.grad / 4 for p in dense + expert]
    _sync(dense, expert, world_of_one, divisor=4, bucket_numel=bucket_numel).finish()
    for p, e in zip(dense + expert, expected):
        assert torch.equal(p.grad, e)


def test_buffers_stay_below_the_int32_limit(world_of_one: dist.ProcessGroup, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk whose gradients would reach the limit gets several buffers, each below it, split at
    parameter boundaries (the limit stands in for 2^31 − 1 elements); every element still goes back."""
    monkeypatch.setattr(grads, "MAX_BUFFER_ELEMENTS", 20)
    dense, expert = _params([(3, 4), (5,), (2, 2, 2)], seed=3), _params([(2, 3, 3), (1,), (4, 4)], seed=4)
    expected = [p.grad / 4 for p in dense + expert]
    sync = _sync(dense, expert, world_of_one, divisor=4, bucket_numel=7)
    # laid out in reverse (backward's order): dense 8 + 5 | 12, experts 16 + 1 | 18
    assert [buffer.numel() for buffer in sync._buffers] == [13, 12, 17, 18]
    sync.finish()
    for p, e in zip(dense + expert, expected):
        assert torch.equal(p.grad, e)


def test_gradients_live_in_the_buffers_and_accumulate_in_place(world_of_one: dist.ProcessGroup) -> None:
    """Autograd adds into the buffer views (no copy to reduce), and a new step starts from zero."""
    layer = torch.nn.Linear(3, 2)
    sync = GradSync([GradChunk("layer", list(layer.parameters()), [])], world_of_one, None)
    views = []
    for _ in range(2):
        sync.start_step(divisor=1)
        views = [p.grad for p in layer.parameters()]
        for _ in range(2):
            layer(torch.ones(1, 3)).sum().backward()
        sync.finish()
        assert all(p.grad is v for p, v in zip(layer.parameters(), views))
        assert torch.equal(layer.bias.grad, torch.full((2,), 2.0))


class _Recorder:
    """Stands in for dist.all_reduce: records which bucket went when (the identity as the sum)."""

    def __init__(self) -> None:
        self.launched: list[tuple[int, str]] = []
        self.phase = "backward"

    def __call__(self, tensor: torch.Tensor, group: object = None, async_op: bool = False) -> None:
        self.launched.append((tensor.numel(), self.phase))


@pytest.mark.parametrize("overlap", [True, False])
def test_overlap_launches_buckets_in_order_during_the_last_backward(overlap: bool, monkeypatch: pytest.MonkeyPatch,
                                                                   world_of_one: dist.ProcessGroup) -> None:
    """Two linear layers, one bucket per parameter: with overlap every bucket goes during the
    armed backward, the second layer's first (its gradients are final first); without, all
    go in finish(). Only the last backward is armed: the first micro-batch launches nothing."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False), torch.nn.Linear(3, 2, bias=False))
    recorder = _Recorder()
    monkeypatch.setattr(dist, "all_reduce", recorder)
    sync = GradSync([GradChunk(model, list(model.parameters()), [])], world_of_one, None, bucket_mb=6 * 4 / 2**20,
                    overlap=overlap)
    sync.start_step(divisor=1)
    model(torch.ones(1, 4)).sum().backward()
    assert recorder.launched == []
    sync.arm(model)
    model(torch.ones(1, 4)).sum().backward()
    recorder.phase = "finish"
    sync.finish()
    when = "backward" if overlap else "finish"
    assert recorder.launched == [(6, when), (6, when), (6, when)]  # 2·3 = one bucket, then 4·3 = two


def test_a_parameter_without_gradient_holds_back_later_buckets(monkeypatch: pytest.MonkeyPatch,
                                                               world_of_one: dist.ProcessGroup) -> None:
    """Buckets go in one fixed order on every rank: one that waits for an unused parameter keeps
    every bucket after it waiting until flush, even when those are ready."""
    used, unused, first = (Parameter(torch.zeros(2)) for _ in range(3))
    recorder = _Recorder()
    monkeypatch.setattr(dist, "all_reduce", recorder)
    # laid out in reverse: first's bucket is the last, unused's the middle one
    sync = GradSync([GradChunk("c", [first, unused, used], [])], world_of_one, None, bucket_mb=2 * 4 / 2**20,
                    overlap=True)
    sync.start_step(divisor=1)
    sync.arm("c")
    (used.sum() + first.sum()).backward()
    assert len(recorder.launched) == 1  # used's bucket; first's waits behind unused's
    sync.flush("c")
    assert len(recorder.launched) == 3
    sync.finish()
    assert len(recorder.launched) == 3


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
