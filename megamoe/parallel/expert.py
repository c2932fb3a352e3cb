"""Expert parallelism: each ep rank holds a contiguous slice of the experts.

The MoE dispatcher sorts a rank's token copies by global expert id and hands them to a
``TokenExchange``. :class:`AllToAllExchange` is the one that crosses processes: counts first
(so every rank knows how much it will receive), then the tokens with uneven split sizes, and
the reverse exchange on the way back. Both token exchanges carry autograd, so the backward
pass is the same all-to-all in the opposite direction.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


def expert_range(num_experts: int, ep_size: int, ep_rank: int) -> range:
    """Global ids of the experts that ep rank ``ep_rank`` owns: [r·E/ep, (r+1)·E/ep)."""
    if num_experts % ep_size:
        raise ValueError(f"moe.num_experts={num_experts} is not divisible by parallel.ep={ep_size}")
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep rank {ep_rank} is outside [0, {ep_size})")
    per_rank = num_experts // ep_size
    return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; its gradient is the same exchange reversed."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, output_splits: list[int], input_splits: list[int], group: ProcessGroup
    ) -> Tensor:
        ctx.splits, ctx.group = (output_splits, input_splits), group
        return _all_to_all(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        output_splits, input_splits = ctx.splits
        return _all_to_all(grad, input_splits, output_splits, ctx.group), None, None, None


def _all_to_all(x: Tensor, output_splits: list[int], input_splits: list[int], group: ProcessGroup) -> Tensor:
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
    return out


def source_major_to_expert_major(counts: Tensor, total: int) -> Tensor:
    """Gather index that turns blocks laid out [source][expert] into [expert][source].

    ``counts[s, e]`` is the length of block (s, e) in the source-major layout and ``total``
    its sum (passed in: the caller already has it on the host). Row ``i`` of
    ``received[index]`` is row ``index[i]`` of ``received``: each expert's rows come out
    contiguous, ordered by source rank, so per-expert order matches one process run on the
    ranks' tokens concatenated in rank order. ``counts.t()`` gives the inverse index.
    """
    flat = counts.reshape(-1)
    block_starts = (torch.cumsum(flat, 0) - flat).view_as(counts)
    counts_em = counts.t().reshape(-1)
    # Output row i lies in expert-major block b at offset i - (rows before b); its source row
    # is that block's source-major start plus the same offset.
    shift = block_starts.t().reshape(-1) - (torch.cumsum(counts_em, 0) - counts_em)
    rows = torch.arange(total, device=counts.device)
    return torch.repeat_interleave(shift, counts_em, output_size=total) + rows


class AllToAllExchange:
    """Token exchange over an ep process group (the ``TokenExchange`` of the MoE dispatcher).

    ``dispatch`` and ``combine`` are called in pairs within one forward pass; the split
    sizes and regroup index computed by ``dispatch`` are kept for the matching ``combine``.
    """

    def __init__(self, num_experts: int, ep_group: ProcessGroup | None) -> None:
        self.group = ep_group  # None: the default group (every rank)
        self.ep_size = dist.get_world_size(ep_group)
        owned = expert_range(num_experts, self.ep_size, dist.get_rank(ep_group))
        self.num_local_experts = len(owned)
        self.first_expert = owned.start
        self._send_splits: list[int] = []
        self._recv_splits: list[int] = []
        self._inverse: Tensor | None = None

    def dispatch(self, tokens: Tensor, tokens_per_expert: Tensor) -> tuple[Tensor, list[int]]:
        """Send each token copy to the rank owning its expert; return them grouped by local expert.

        ``tokens`` [n, H] is sorted by global expert id with ``tokens_per_expert`` [E] rows per
        expert. Returns the received rows, contiguous per local expert, and their counts.
        """
        ep = self.ep_size
        # recv[s, e]: how many rows source rank s sends to our local expert e.
        recv = torch.empty_like(tokens_per_expert)
        dist.all_to_all_single(recv, tokens_per_expert.contiguous(), group=self.group)
        recv = recv.view(ep, self.num_local_experts)
        sizes = self.split_sizes(tokens_per_expert, recv)
        self._send_splits, self._recv_splits = sizes[:ep], sizes[ep : 2 * ep]
        per_local_expert = sizes[2 * ep :]

        received = _AllToAll.apply(tokens, self._recv_splits, self._send_splits, self.group)
        total = sum(self._recv_splits)
        self._inverse = source_major_to_expert_major(recv.t(), total)
        return received.index_select(0, source_major_to_expert_major(recv, total)), per_local_expert

    def split_sizes(self, tokens_per_expert: Tensor, recv: Tensor) -> list[int]:
        """Rows sent to each ep rank, received from each, and received per local expert, as one
        list: the exchange's one host sync (the dry run, whose counts are not data, overrides it)."""
        send_per_rank = tokens_per_expert.view(self.ep_size, self.num_local_experts).sum(1)
        return torch.cat([send_per_rank, recv.sum(1), recv.sum(0)]).tolist()

    def combine(self, expert_output: Tensor) -> Tensor:
        """Return expert outputs to their source ranks, in the order ``dispatch`` received them."""
        if self._inverse is None:
            raise RuntimeError("AllToAllExchange.combine called without a matching dispatch")
        source_major = expert_output.index_select(0, self._inverse)
        self._inverse = None
        return _AllToAll.apply(source_major, self._send_splits, self._recv_splits, self.group)
