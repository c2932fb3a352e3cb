"""Qwen-MoE attention (Qwen1.5-MoE / Qwen2-MoE): grouped-query attention with biases on the
q/k/v projections and none on the output, RoPE over the whole head, causal SDPA."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megamoe.config.schema import ModelConfig
from megamoe.nn.attention import AttentionBlock, causal_attention, kv_heads, split_heads
from megamoe.nn.documents import Documents
from megamoe.nn.init import seeded_normal_
from megamoe.nn.kv_cache import LayerCache


class GroupedQueryAttention(AttentionBlock):
    """``num_heads`` query heads over ``num_kv_heads`` K/V heads (``model.num_kv_heads``; unset =
    one each); K/V head j serves query heads j·g … (j+1)·g − 1, g = num_heads / num_kv_heads,
    the grouping of transformers' ``repeat_kv``. q/k/v carry biases when ``model.qkv_bias``."""

    def __init__(self, model_cfg: ModelConfig) -> None:
        super().__init__()
        hidden, self.head_dim = model_cfg.hidden_size, model_cfg.head_dim
        queries, keys = model_cfg.num_heads * self.head_dim, kv_heads(model_cfg) * self.head_dim
        self.q_proj = nn.Linear(hidden, queries, bias=model_cfg.qkv_bias)
        self.k_proj = nn.Linear(hidden, keys, bias=model_cfg.qkv_bias)
        self.v_proj = nn.Linear(hidden, keys, bias=model_cfg.qkv_bias)
        self.o_proj = nn.Linear(queries, hidden, bias=False)

    def reset_parameters(self, std: float, *key: object) -> None:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            projection = getattr(self, name)
            seeded_normal_(projection.weight, std, *key, name, "weight")
            if projection.bias is not None:
                nn.init.zeros_(projection.bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: Optional[LayerCache] = None, documents: Optional[Documents] = None) -> torch.Tensor:
        """x: the normalised hidden states [b, s, H]; rope: (cos, sin) from RotaryEmbedding;
        cache: this layer's decoding state (K/V cached at the K/V head count) when x continues cached positions;
        documents: the rows' documents, when attention stays inside each."""
        q, k, v = (split_heads(projection(x), self.head_dim) for projection in (self.q_proj, self.k_proj, self.v_proj))
        return self.o_proj(causal_attention(q, k, v, rope, cache, documents))
