"""Token dispatch: sort (token, expert) assignments by expert, exchange, and put them back.

The MoE layer runs: permute → ``TokenExchange.dispatch`` → experts → ``TokenExchange.combine``
→ unpermute. Permute sorts the routing's (token, expert, weight) assignments by expert once (one
argsort, one gather), so each expert sees one contiguous slice; unpermute weights each expert
output and sums it back into its token with one ``index_add``. Nothing here assumes k experts
per token: token choice makes T·k assignments, expert choice N·c. The exchange in between is
the only step that differs between a single process (:class:`LocalExchange`) and expert
parallelism (an all-to-all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from megamoe.nn.moe.router import Routing


class TokenExchange(Protocol):
    """Moves expert-sorted tokens to the ranks that hold their experts, and back.

    Contract (what an expert-parallel implementation must keep):

    - ``dispatch(tokens, tokens_per_expert)``: ``tokens`` [n, H] are this rank's assignments
      sorted by GLOBAL expert id, ``tokens_per_expert`` (int64 [num_experts]) their counts.
      Returns the rows for this rank's experts ``first_expert .. first_expert +
      num_local_experts - 1``, grouped by local expert (contiguous, in expert order), and the
      row count of each group as a Python list. With expert parallelism each group is the
      concatenation of the contributions of source ranks 0, 1, ... (counts are exchanged first,
      then the tokens with uneven splits).
    - ``combine(expert_output)``: the exact reverse of the most recent ``dispatch``: takes
      [sum(local counts), H] in the order dispatch returned and gives back [n, H] in the order
      of dispatch's input. Both directions must be differentiable (the backward of dispatch is
      the reverse exchange).
    """

    num_local_experts: int
    first_expert: int

    def dispatch(self, tokens: torch.Tensor, tokens_per_expert: torch.Tensor) -> tuple[torch.Tensor, list[int]]: ...

    def combine(self, expert_output: torch.Tensor) -> torch.Tensor: ...


class LocalExchange:
    """All experts live in this process (ep = 1): nothing moves."""

    def __init__(self, num_experts: int) -> None:
        self.num_local_experts = num_experts
        self.first_expert = 0

    def dispatch(self, tokens: torch.Tensor, tokens_per_expert: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        return tokens, tokens_per_expert.tolist()  # the layer's one host sync

    def combine(self, expert_output: torch.Tensor) -> torch.Tensor:
        return expert_output


@dataclass
class Permutation:
    """Where each row of the expert-sorted token matrix came from, to send results back."""

    source_token: torch.Tensor  # int64 [m]: token row of each sorted assignment
    weights: torch.Tensor  # [m]: its combine weight
    tokens_per_expert: torch.Tensor  # int64 [num_experts]: rows per expert after drops
    dropped: torch.Tensor  # int64 scalar: assignments dropped by the capacity limit


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """GShard's per-expert capacity: ceil(factor · T · k / N) assignments."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def permute(x: torch.Tensor, routing: Routing, capacity: Optional[int] = None) -> tuple[torch.Tensor, Permutation]:
    """Gather the rows of ``x`` [T, H] once per assignment, sorted by expert.

    Dropless when ``capacity`` is None (also expert choice, whose selection is the capacity).
    Otherwise each expert keeps its ``capacity`` highest-weighted assignments (ties: the earlier
    assignment, i.e. the lower token under token choice) and the rest are dropped and counted; a
    token whose every assignment is dropped gets zero from the MoE (the residual carries it).
    """
    flat_experts = routing.experts.flatten()
    flat_weights = routing.weights.flatten()
    counts = routing.tokens_per_expert
    if capacity is None:
        order = torch.argsort(flat_experts, stable=True)
        dropped = counts.new_zeros(())
    else:
        by_weight = torch.argsort(flat_weights, descending=True, stable=True)
        order = by_weight[torch.argsort(flat_experts[by_weight], stable=True)]
        group_start = torch.cumsum(counts, dim=0) - counts
        rank_in_expert = torch.arange(order.numel(), device=order.device) - group_start[flat_experts[order]]
        keep = rank_in_expert < capacity
        order, dropped, counts = order[keep], (~keep).sum(), counts.clamp(max=capacity)
    assert routing.tokens is not None  # filled in by Routing.__post_init__
    source_token = routing.tokens.flatten()[order]
    return x.index_select(0, source_token), Permutation(source_token, flat_weights[order], counts, dropped)


def unpermute(expert_output: torch.Tensor, permutation: Permutation, num_tokens: int) -> torch.Tensor:
    """Σ_k w_k · Expert_k(x) per token: weight each sorted row and add it into its token.

    Weights are cast to the activation dtype first, as Yuan does before combining.
    """
    weighted = expert_output * permutation.weights.to(expert_output.dtype).unsqueeze(-1)
    out = expert_output.new_zeros(num_tokens, expert_output.shape[-1])
    return out.index_add(0, permutation.source_token, weighted)
