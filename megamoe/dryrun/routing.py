"""Routing is data: the expert loads a fake step assumes, and the token exchanges that use them.

Fake tensors carry shapes but no values, so the sizes of a dropless MoE's buffers — which follow
how the router spreads the tokens over the experts — need an assumption: the busiest expert's
load ÷ the mean load (``--expert-imbalance``, :class:`megamoe.estimators.routing.ExpertLoads`).
The dry run plays ep rank 0, the holder of expert 0, which it makes the busiest, and every
source rank routes alike: the ranks' busiest tokens all meet on one expert (the worst case).

The MoE layer's own code runs (router, permutation, the all-to-all and its regroup index, the
grouped GEMMs); only the host sync that reads the routing counts — the one place a MoE layer
turns data into sizes — is answered from the assumption, by the exchanges below.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch.distributed as dist
from torch import Tensor, nn

from megamoe.estimators.routing import ExpertLoads
from megamoe.nn.moe.dispatcher import LocalExchange
from megamoe.nn.moe.layer import MoELayer
from megamoe.parallel.expert import AllToAllExchange


class AssumedLocalExchange(LocalExchange):
    """ep = 1: every expert is local; its rows per expert are the assumed loads."""

    def __init__(self, loads: list[int]) -> None:
        super().__init__(len(loads))
        self.loads = loads

    def dispatch(self, tokens: Tensor, tokens_per_expert: Tensor) -> tuple[Tensor, list[int]]:
        _check_rows(tokens, sum(self.loads))
        return tokens, list(self.loads)


class AssumedAllToAll(AllToAllExchange):
    """The all-to-all exchange (its collectives and regroup index run) with the split sizes of
    the assumed routing: this rank sends its loads to the experts' ranks and receives, from
    each of the ep sources, the same loads of its own experts."""

    def __init__(self, loads: list[int], ep_group: dist.ProcessGroup) -> None:
        super().__init__(len(loads), ep_group)
        self.loads = loads

    def split_sizes(self, tokens_per_expert: Tensor, recv: Tensor) -> list[int]:
        local = self.num_local_experts
        per_rank = [sum(self.loads[r * local:(r + 1) * local]) for r in range(self.ep_size)]
        mine = self.loads[self.first_expert:self.first_expert + local]
        return per_rank + [sum(mine)] * self.ep_size + [self.ep_size * load for load in mine]

    def dispatch(self, tokens: Tensor, tokens_per_expert: Tensor) -> tuple[Tensor, list[int]]:
        _check_rows(tokens, sum(self.loads))
        return super().dispatch(tokens, tokens_per_expert)


def _check_rows(tokens: Tensor, expected: int) -> None:
    if tokens.shape[0] != expected:
        raise RuntimeError(f"the dry run assumed {expected} routed rows per micro-batch, the MoE layer dispatched "
                           f"{tokens.shape[0]}: its micro-batch is not the configured train.micro_batch × seq_len")


def assume_routing(models: Sequence[nn.Module], loads: ExpertLoads, tokens: int,
                   ep_group: Optional[dist.ProcessGroup]) -> None:
    """Give every MoE layer of ``models`` an exchange whose sizes are ``loads`` for micro-batches
    of ``tokens`` tokens (one exchange for all of them, as the trainer builds)."""
    rows = loads.rows(tokens)
    exchange = AssumedAllToAll(rows, ep_group) if ep_group is not None else AssumedLocalExchange(rows)
    for model in models:
        for layer in model.modules():
            if isinstance(layer, MoELayer):
                layer.exchange = exchange
