"""Mixture-of-experts layer, decomposed as in Megatron-Core: router, dispatcher, experts."""

from megamoe.model.moe.dispatcher import LocalExchange, TokenExchange
from megamoe.model.moe.experts import ExpertBank
from megamoe.model.moe.layer import MoEAuxLossBackward, MoELayer, MoEStats
from megamoe.model.moe.router import AttentionRouter, LinearRouter, Routing, select_experts

__all__ = [
    "AttentionRouter", "ExpertBank", "LinearRouter", "LocalExchange", "MoEAuxLossBackward", "MoELayer",
    "MoEStats", "Routing", "TokenExchange", "select_experts",
]
