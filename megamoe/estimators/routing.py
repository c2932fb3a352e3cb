"""How the router spreads tokens over experts, as an assumption: a dropless MoE's buffers follow it.

Routing is data, so the estimators (megamoe.estimators.memory, the planner) and the dry run
(megamoe.dryrun) take one number for it: the **expert imbalance** F, the busiest expert's load
÷ the mean load (``--expert-imbalance``; 1.0 = perfectly balanced). The busiest expert gets
F · k·T / E of a micro-batch's T tokens' k·T assignments (at most T: a token picks an expert at
most once, so F ≤ E / k), the others share the rest evenly, and every data-parallel rank routes
alike — their busiest tokens all meet on one expert, the worst case for the expert-parallel
rank that holds it. Its all-to-all receive buffers and expert GEMMs then hold
:meth:`ExpertLoads.busiest_rank_share` × the balanced rows.

With a capacity (``moe.capacity_factor``) each expert keeps at most its capacity of the rows,
so the buffers are bounded whatever F is, and F only moves what is dropped; expert choice
(``moe.router_mode=expert_choice``) gives every expert exactly its capacity, so F plays no part.
"""

from __future__ import annotations

from dataclasses import dataclass

from megamoe.config.choices import RouterMode
from megamoe.config.schema import MoEConfig
from megamoe.errors import UserError
from megamoe.nn.moe.dispatcher import expert_capacity


@dataclass(frozen=True)
class ExpertLoads:
    """The assumed routing of one MoE configuration: ``imbalance`` is F (module docstring)."""

    num_experts: int
    top_k: int
    imbalance: float = 1.0
    capacity_factor: float | None = None
    expert_choice: bool = False

    @classmethod
    def of(cls, moe: MoEConfig, imbalance: float = 1.0) -> "ExpertLoads":
        """The loads of ``moe`` under imbalance F; a UserError naming --expert-imbalance when F is impossible."""
        loads = cls(moe.num_experts, moe.top_k, imbalance, moe.capacity_factor,
                    moe.router_mode == RouterMode.EXPERT_CHOICE)
        most = loads.max_imbalance
        if not 1.0 <= imbalance <= most:
            raise UserError(f"--expert-imbalance: {imbalance:g} is outside [1, {most:g}]: the busiest expert's load ÷ "
                            f"the mean is at least 1 and at most num_experts / top_k = {moe.num_experts} / "
                            f"{moe.top_k} (every token routed to it)")
        return loads

    @property
    def max_imbalance(self) -> float:
        """The largest F there is: one expert receiving every token once, E / k."""
        return self.num_experts / self.top_k

    def rows(self, tokens: int) -> list[int]:
        """Rows each expert receives from one rank's micro-batch of ``tokens`` tokens (after any
        capacity drop); expert 0 is the busiest."""
        e, k = self.num_experts, self.top_k
        if self.expert_choice:
            return [min(tokens, expert_capacity(tokens, k, e, self.capacity_factor or 1.0))] * e
        total = tokens * k
        busiest = total if e == 1 else min(tokens, round(self.imbalance * total / e))
        rest, extra = divmod(total - busiest, max(1, e - 1))
        rows = [busiest] + [rest + (i < extra) for i in range(e - 1)]
        if self.capacity_factor is None:
            return rows
        capacity = expert_capacity(tokens, k, e, self.capacity_factor)
        return [min(r, capacity) for r in rows]

    def busiest_rank_share(self, ep: int, tokens: int) -> float:
        """Rows the expert-parallel rank holding the busiest expert receives ÷ a balanced dropless
        routing's (k · tokens per rank): its dispatch buffers and expert GEMMs scale with it."""
        local = self.num_experts // ep
        return sum(self.rows(tokens)[:local]) * self.num_experts / (local * self.top_k * tokens)
