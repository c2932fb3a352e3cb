"""Mixture-of-experts layer, decomposed as in Megatron-Core: router, dispatcher, experts."""

from megamoe.nn.moe.dispatcher import LocalExchange, TokenExchange
from megamoe.nn.moe.experts import ExpertBank
from megamoe.nn.moe.layer import MoEAuxLossBackward, MoELayer, MoEStats
from megamoe.nn.moe.router import AttentionRouter, LinearRouter, Routing, select_experts, select_tokens

__all__ = [
    "AttentionRouter", "ExpertBank", "LinearRouter", "LocalExchange", "MoEAuxLossBackward", "MoELayer",
    "MoEStats", "Routing", "TokenExchange", "select_experts", "select_tokens",
]
