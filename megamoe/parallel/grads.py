"""Gradient synchronisation over data-parallel replicas, the global grad norm, and clipping.

Layout (docs/parallelism.md, "The grid"): world = pp × dp and dp = edp × ep. A pipeline stage's
dense parameters are replicated on its dp ranks; each expert lives on one rank of every ep
group, so it is replicated on the edp ranks of its stage. Dense gradients are therefore summed
over dp, expert gradients over edp, and the norm counts every replica as a fraction of one copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import Parameter
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

BYTES_PER_FP32 = 4
# A flat gradient buffer stays below 2^31 elements, the reach of a 32-bit index (the dry run,
# megamoe.dryrun.overflow, flags any tensor beyond it): M32's experts on one rank of its paper
# layout (ep 1, 3 layers per stage) would otherwise share one buffer of 4.8 × 10^9 elements.
MAX_BUFFER_ELEMENTS = 2**31 - 1


@dataclass(frozen=True)
class GradChunk:
    """One model chunk's parameters (a pipeline stage module): ``key`` names it to
    :meth:`GradSync.arm` / :meth:`GradSync.flush`; dense ones reduce over dp, experts over edp."""

    key: object
    dense: list[Parameter]
    expert: list[Parameter]


class _Bucket:
    """A slice of one chunk's flat gradient buffer: reduced by one collective, once every
    parameter overlapping it has its final gradient (or its chunk is flushed)."""

    def __init__(self, flat: Tensor, params: list[Parameter]) -> None:
        self.flat, self.params = flat, params
        self.waiting = len(params)
        self.work: Optional[dist.Work] = None


class _Queue:
    """The buckets reduced over one process group, in the one order every rank of the group
    launches them: bucket k goes only after bucket k - 1, so ranks whose gradients become final
    in a different order (an expert without tokens on one of them) still pair their collectives."""

    def __init__(self, group: Optional[dist.ProcessGroup]) -> None:
        self.group, self.launched = group, 0
        self.buckets: list[_Bucket] = []

    def launch_ready(self, adopt: Callable[[list[Parameter]], None]) -> None:
        while self.launched < len(self.buckets) and self.buckets[self.launched].waiting == 0:
            bucket = self.buckets[self.launched]
            adopt(bucket.params)
            if self.group is not None:
                bucket.work = dist.all_reduce(bucket.flat, group=self.group, async_op=True)
            self.launched += 1


class GradSync:
    """Average gradients over data parallelism: dense over ``dp_group``, experts over ``edp_group``.

    Each chunk's dense (and expert) gradients live in one flat buffer (the parameters' dtype;
    split where it would reach :data:`MAX_BUFFER_ELEMENTS`):
    ``param.grad`` is a view into it, so autograd accumulates in place and a bucket is a
    contiguous slice reduced with no copy (Megatron's grad buffer). Parameters are laid out in
    reverse order, the order backward finishes them, and cut into buckets of ``bucket_mb``.

    Without overlap, :meth:`finish` reduces every bucket after the backward. With
    ``overlap=True`` (``parallel.overlap_grad_reduce``) a chunk is :meth:`arm`-ed for its last
    backward: a post-accumulate-grad hook marks each parameter final, and a bucket whose
    parameters are all final starts its async all-reduce while backward goes on; :meth:`flush`
    launches the rest of a chunk when its backward is over (the zero-bubble weight pass adds to
    ``.grad`` itself, so no hook sees it); :meth:`finish` waits. Both paths reduce the same
    buckets with the same bytes in the same order: the results are bit-identical.

    The sum is divided by ``divisor`` (:meth:`start_step`): dp, times the micro-batch count
    where the pipeline leaves its micro-batch gradients summed. Experts are divided by dp too,
    not edp: an expert's local gradient already sums the tokens of every rank of its ep group
    (they reached it through the all-to-all), so after the edp sum it holds the sum over all dp
    ranks' micro-batches, exactly like a dense gradient.

    A group of ``None`` means that size is 1: nothing to reduce, so those gradients stay where
    autograd puts them (no buffer to zero, no accumulation into one: at dp = 1 a step costs what
    it would without GradSync) and are only divided.
    """

    def __init__(self, chunks: Sequence[GradChunk], dp_group: Optional[dist.ProcessGroup],
                 edp_group: Optional[dist.ProcessGroup], bucket_mb: float = 25.0, overlap: bool = False) -> None:
        bucket_numel = max(1, int(bucket_mb * 2**20) // BYTES_PER_FP32)
        self.overlap, self.divisor = overlap, 1
        self._queues = [_Queue(dp_group), _Queue(edp_group)]
        self._views: dict[Parameter, Tensor] = {}
        self._buffers: list[Tensor] = []
        self._local: list[Parameter] = []  # gradients with no group to reduce over
        self._chunk_buckets: dict[object, list[_Bucket]] = {}
        self._armed: set[object] = set()
        self._open = False
        for chunk in chunks:
            self._chunk_buckets[chunk.key] = []
            for params, queue in ((chunk.dense, self._queues[0]), (chunk.expert, self._queues[1])):
                if queue.group is None:
                    self._local += params
                    continue
                buckets = self._lay_out(list(reversed(params)), bucket_numel)
                queue.buckets += buckets
                self._chunk_buckets[chunk.key] += buckets
                for p in params if overlap else ():  # without overlap nothing listens: no hook per gradient
                    holding = [b for b in buckets if any(q is p for q in b.params)]
                    p.register_post_accumulate_grad_hook(self._hook(chunk.key, holding))

    def _lay_out(self, params: list[Parameter], bucket_numel: int) -> list[_Bucket]:
        """Flat buffers for ``params`` (views become their gradients), cut into buckets: one
        buffer, or consecutive runs of the parameters below :data:`MAX_BUFFER_ELEMENTS` each."""
        if len({p.dtype for p in params}) > 1:
            raise TypeError("GradSync keeps flat buffers of one dtype per chunk: its parameters must share it")
        runs: list[list[Parameter]] = []
        filled = MAX_BUFFER_ELEMENTS
        for p in params:
            if filled + p.numel() > MAX_BUFFER_ELEMENTS:
                runs.append([])
                filled = 0
            runs[-1].append(p)
            filled += p.numel()
        return [bucket for run in runs for bucket in self._lay_out_buffer(run, bucket_numel)]

    def _lay_out_buffer(self, params: list[Parameter], bucket_numel: int) -> list[_Bucket]:
        buffer = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        self._buffers.append(buffer)
        offsets = [0]
        for p in params:
            self._views[p] = buffer[offsets[-1]: offsets[-1] + p.numel()].view_as(p)
            offsets.append(offsets[-1] + p.numel())
        buckets = []
        for start in range(0, buffer.numel(), bucket_numel):
            stop = min(start + bucket_numel, buffer.numel())
            inside = [p for p, a, b in zip(params, offsets, offsets[1:]) if a < stop and b > start]
            buckets.append(_Bucket(buffer[start:stop], inside))
        return buckets

    def _hook(self, key: object, buckets: list[_Bucket]) -> Callable[[Parameter], None]:
        def on_final_grad(_: Parameter) -> None:
            if key in self._armed:
                for bucket in buckets:
                    bucket.waiting -= 1
                self._launch_ready()
        return on_final_grad

    def _adopt(self, params: list[Parameter]) -> None:
        """Make sure each gradient is its buffer view (code that assigned ``.grad`` is copied in)."""
        for p in params:
            view = self._views[p]
            if p.grad is not view:
                view.copy_(p.grad) if p.grad is not None else view.zero_()
                p.grad = view

    def _launch_ready(self) -> None:
        for queue in self._queues:
            queue.launch_ready(self._adopt)

    def start_step(self, divisor: int) -> None:
        """Zero the gradients (views of the buffers; local ones are dropped) before a step's first backward."""
        for buffer in self._buffers:
            buffer.zero_()
        for p, view in self._views.items():
            p.grad = view
        for p in self._local:
            p.grad = None
        for queue in self._queues:
            queue.launched = 0
            for bucket in queue.buckets:
                bucket.waiting, bucket.work = len(bucket.params), None
        self.divisor, self._armed, self._open = divisor, set(), True

    def arm(self, key: object) -> None:
        """Chunk ``key`` starts its last backward of the step: final gradients may go now."""
        if self.overlap and self._open:
            self._armed.add(key)

    def flush(self, key: object) -> None:
        """Chunk ``key``'s backward is over: launch whatever of it is still waiting."""
        if self.overlap and self._open:
            for bucket in self._chunk_buckets[key]:
                bucket.waiting = 0
            self._launch_ready()

    def finish(self) -> None:
        """Launch every bucket not launched yet, wait for all, divide: each gradient is now its
        data-parallel average."""
        for buckets in self._chunk_buckets.values():
            for bucket in buckets:
                bucket.waiting = 0
        self._launch_ready()
        for queue in self._queues:
            for bucket in queue.buckets:
                if bucket.work is not None:
                    bucket.work.wait()
                if self.divisor != 1:
                    bucket.flat.div_(self.divisor)
        for p in self._local:  # a parameter backward did not reach still takes its (zero) update
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            elif self.divisor != 1:
                p.grad.div_(self.divisor)
        self._armed, self._open = set(), False


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
    total = (_sum_of_squares(params_dense, exclude_ids) / dp_size
             + _sum_of_squares(params_expert, exclude_ids) / edp_size)
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
