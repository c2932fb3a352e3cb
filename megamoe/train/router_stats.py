"""What the routers did during a step: tokens per expert, the balancing losses, dropped tokens.

Every MoE layer leaves a detached summary of its last forward (``MoELayer.last_stats``); forward
hooks add them up over the step's micro-batches, on device, without a host sync. They are
reduced over the data-parallel group only when a step reports them (a log step) or when the
aux-loss-free bias needs the global counts, so an ordinary step pays no extra collective.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from megamoe.compat import in_backward_pass
from megamoe.nn.moe.layer import MoELayer

# A layer's step summary travels as one float64 row: the expert counts, then these sums.
SUMS = ("aux_loss", "z_loss", "dropped", "unrouted", "tokens", "forwards")


@dataclass
class LayerRouting:
    """One MoE layer's routing over a step, summed over its micro-batches (and the data-parallel
    replicas once reduced): divide by ``forwards`` for the mean losses, by ``tokens`` for shares."""

    tokens_per_expert: Tensor  # [E] assignments per expert, before capacity drops
    aux_loss: float  # Switch loss (unscaled by its coefficient)
    z_loss: float  # router z-loss (unscaled)
    dropped: float  # assignments dropped by the capacity limit
    unrouted: float  # tokens that reached no expert
    tokens: float  # tokens routed
    forwards: float  # forward passes

    @classmethod
    def of_row(cls, row: Tensor) -> "LayerRouting":
        counts, sums = row[:-len(SUMS)], row[-len(SUMS):].tolist()
        return cls(counts, **dict(zip(SUMS, sums)))

    def row(self) -> Tensor:
        return torch.cat([self.tokens_per_expert.double(), torch.tensor([getattr(self, s) for s in SUMS],
                                                                        dtype=torch.float64)])


@dataclass
class RouterStats:
    """The step's routing so far, per MoE layer of this rank (filled by forward hooks)."""

    layers: dict[int, MoELayer]
    device_sums: dict[int, Tensor] = field(default_factory=dict)  # layer → counts and the device-side sums
    host_sums: dict[int, list[float]] = field(default_factory=dict)  # layer → [tokens, forwards]
    recording: bool = True

    def __post_init__(self) -> None:
        for index, layer in self.layers.items():
            layer.register_forward_hook(lambda module, args, out, i=index: self._add(i, module, args))

    def _add(self, index: int, layer: MoELayer, args: Any) -> None:
        # Activation checkpointing re-runs forward inside backward: count each token once.
        if not self.recording or in_backward_pass():
            return
        stats = layer.last_stats
        assert stats is not None  # the forward that ran this hook set it
        row = torch.cat([stats.tokens_per_expert.double(), torch.stack(
            [stats.aux_loss.double(), stats.z_loss.double(), stats.dropped.double(), stats.unrouted.double()])])
        tokens, forwards = self.host_sums.get(index, [0.0, 0.0])
        self.device_sums[index] = self.device_sums[index] + row if index in self.device_sums else row
        self.host_sums[index] = [tokens + args[0].shape[:-1].numel(), forwards + 1]

    def clear(self) -> None:
        self.device_sums, self.host_sums = {}, {}

    def reduce(self, group: Optional[dist.ProcessGroup]) -> dict[int, LayerRouting]:
        """This rank's layers' routing summed over ``group`` (the data-parallel replicas: the whole
        global batch); resets."""
        keys = sorted(self.device_sums)
        if not keys:
            return {}
        table = torch.stack([self.device_sums[k] for k in keys])
        host = torch.tensor([self.host_sums[k] for k in keys], dtype=torch.float64, device=table.device)
        table = torch.cat([table, host], dim=1)
        self.clear()
        if group is not None:
            dist.all_reduce(table, group=group)
        return {k: LayerRouting.of_row(row) for k, row in zip(keys, table.cpu())}
