"""Gradient synchronisation over data-parallel replicas, the global grad norm, and clipping.

Layout (docs/parallelism.md, "The grid"): world = pp × dp and dp = edp × ep. A pipeline stage's
dense parameters are replicated on its dp ranks; each expert lives on one rank of every ep
group, so it is replicated on the edp ranks of its stage. Dense gradients are therefore summed
over dp, expert gradients over edp, and the norm counts every replica as a fraction of one copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import Parameter
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

BYTES_PER_FP32 = 4


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, start + numel)`` of parameter ``param``'s flat gradient, at ``offset`` in a bucket."""

    param: int
    start: int
    numel: int
    offset: int


def plan_buckets(numels: Sequence[int], bucket_numel: int) -> list[list[Piece]]:
    """Cut the concatenated gradients into consecutive buckets of ``bucket_numel`` elements.

    A gradient that straddles a boundary is split between two buckets, so every bucket but the
    last is full and the communication buffers stay at two buckets whatever the largest tensor.
    """
    buckets: list[list[Piece]] = []
    bucket: list[Piece] = []
    fill = 0
    for param, numel in enumerate(numels):
        start = 0
        while start < numel:
            take = min(numel - start, bucket_numel - fill)
            bucket.append(Piece(param, start, take, fill))
            start += take
            fill += take
            if fill == bucket_numel:
                buckets.append(bucket)
                bucket, fill = [], 0
    if bucket:
        buckets.append(bucket)
    return buckets


class GradSync:
    """Average gradients over data parallelism: dense over ``dp_group``, experts over ``edp_group``.

    Both sets are summed in flat fp32 buckets (one all-reduce each, two buffers so packing the
    next bucket overlaps the current one's communication) and then divided by ``dp_size`` — for
    the experts too, not by the edp size: an expert's local gradient already sums the
    contributions of the tokens of every rank in its ep group (they reached it through the
    all-to-all, and the backward all-to-all brought their gradients back), so after the edp sum
    it holds the sum over all dp ranks' micro-batch losses, exactly like a dense gradient.

    A group of ``None`` means that size is 1: no communication, only the division. A parameter
    without a gradient (say, an expert that got no tokens) contributes zeros.
    """

    def __init__(
        self,
        params_dense: list[Parameter],
        params_expert: list[Parameter],
        dp_group: Optional[dist.ProcessGroup],
        edp_group: Optional[dist.ProcessGroup],
        dp_size: int,
        bucket_mb: float = 25.0,
    ) -> None:
        bucket_numel = max(1, int(bucket_mb * 2**20) // BYTES_PER_FP32)
        self.dp_size = dp_size
        self._sets = [
            (list(params), group, plan_buckets([p.numel() for p in params], bucket_numel))
            for params, group in ((params_dense, dp_group), (params_expert, edp_group))
        ]
        self._buffer_numel = max((sum(pc.numel for pc in b) for _, _, plan in self._sets for b in plan), default=0)
        self._buffers: list[Tensor] = []

    def all_reduce(self) -> None:
        """Replace every gradient by its data-parallel average (in place)."""
        for params, group, plan in self._sets:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = [p.grad.view(-1) for p in params]
            if group is None and self.dp_size > 1:
                for g in flat:
                    g.div_(self.dp_size)
            elif group is not None:
                self._reduce(flat, plan, group)

    def _reduce(self, flat: list[Tensor], plan: list[list[Piece]], group: dist.ProcessGroup) -> None:
        if not self._buffers and plan:
            self._buffers = [torch.empty(self._buffer_numel, dtype=torch.float32, device=flat[0].device) for _ in range(2)]
        pending: Optional[tuple[dist.Work, Tensor, list[Piece]]] = None
        for i, bucket in enumerate(plan):
            buffer = self._buffers[i % 2][: sum(pc.numel for pc in bucket)]
            for pc in bucket:
                buffer[pc.offset : pc.offset + pc.numel].copy_(flat[pc.param][pc.start : pc.start + pc.numel])
            work = dist.all_reduce(buffer, group=group, async_op=True)
            if pending is not None:  # finish bucket i - 1 while i is in flight; its buffer takes i + 1
                self._unpack(*pending, flat)
            pending = (work, buffer, bucket)
        if pending is not None:
            self._unpack(*pending, flat)

    def _unpack(self, work: dist.Work, buffer: Tensor, bucket: list[Piece], flat: list[Tensor]) -> None:
        work.wait()
        buffer.div_(self.dp_size)
        for pc in bucket:
            flat[pc.param][pc.start : pc.start + pc.numel].copy_(buffer[pc.offset : pc.offset + pc.numel])


def _sum_of_squares(params: Iterable[Parameter], exclude_ids: set[int]) -> Tensor:
    return get_total_norm([p.grad for p in params if p.grad is not None and id(p) not in exclude_ids]).square()


def global_grad_norm(
    params_dense: Sequence[Parameter],
    params_expert: Sequence[Parameter],
    dp_size: int,
    edp_size: int,
    world_group: Optional[dist.ProcessGroup],
    exclude: Iterable[Parameter] = (),
) -> Tensor:
    """L2 norm of the whole model's gradient, each parameter counted once (call after GradSync).

    After synchronisation a dense gradient is identical on the ``dp_size`` ranks of its stage and
    an expert gradient on the ``edp_size`` replicas of that expert, so each rank contributes
    ``dense² / dp_size + expert² / edp_size`` and the sum over the world adds the replicas up to
    one copy of every stage's and every expert's gradient. ``exclude`` skips parameters counted
    elsewhere (the last stage's copy of a tied embedding). ``world_group`` None = one process.
    A non-finite norm is returned as is: the loop decides what to do with the step.
    """
    exclude_ids = {id(p) for p in exclude}
    total = _sum_of_squares(params_dense, exclude_ids) / dp_size + _sum_of_squares(params_expert, exclude_ids) / edp_size
    if world_group is not None:
        dist.all_reduce(total, group=world_group)
    return total.sqrt()


def clip_grads_(params: Iterable[Parameter], max_norm: float, total_norm: Tensor) -> None:
    """Scale gradients in place by ``max_norm / (total_norm + 1e-6)`` when that is below 1.

    The rule of Megatron and ``torch.nn.utils.clip_grad_norm_``; the scale is clamped to 1 and
    always applied (multiplying by exactly 1.0 changes nothing) so there is no host sync on GPU.
    ``max_norm`` 0 disables clipping. Pass every parameter, including any excluded from the norm.
    """
    if max_norm > 0:
        clip_grads_with_norm_(list(params), max_norm, total_norm)
