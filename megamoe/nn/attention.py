"""The core every family's attention block shares: heads in, RoPE, causal SDPA, heads out.

A family's block owns its projections (and whatever it does before them, e.g. Yuan's LFA);
from projected queries, keys and values the computation is the same. K and V may have fewer
heads than Q (grouped-query attention): each K/V head then serves num_heads / num_kv_heads
consecutive query heads, which SDPA does natively (``enable_gqa``) without materialising
repeated K/V — so autograd saves K and V at their own, smaller size.

With a :class:`~megamoe.nn.kv_cache.LayerCache` (incremental decoding) the queries are the new
positions only and the keys the cached ones plus the new: SDPA's ``is_causal`` would align the
mask to the top-left corner, so the cache's explicit mask (causal offset, key padding) is used.
With :class:`~megamoe.nn.documents.Documents` (``data.reset_attention_mask``) each query sees
the keys of its own document only.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.config.schema import ModelConfig
from megamoe.nn.documents import Documents
from megamoe.nn.kv_cache import LayerCache
from megamoe.nn.rope import apply_rotary


class AttentionBlock(nn.Module):
    """The base of a model family's attention block (megamoe.nn.decoder.AttentionFactory builds
    one per layer): ``forward(normed hidden [b, s, H], (cos, sin), cache=None, documents=None)``
    → [b, s, H]; :meth:`reset_parameters` initialises it from its global identity."""

    def reset_parameters(self, std: float, *key: object) -> None:
        raise NotImplementedError


def kv_heads(model: ModelConfig) -> int:
    """K/V heads per layer: ``model.num_kv_heads``, or one per query head when it is unset."""
    return model.num_kv_heads or model.num_heads


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[b, s, heads·head_dim] → [b, heads, s, head_dim]."""
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                     cache: Optional[LayerCache] = None, documents: Optional[Documents] = None) -> torch.Tensor:
    """q [b, heads, s, d], k and v [b, kv_heads, s, d] → [b, s, heads·d]: RoPE on q and k (the
    first cos.shape[-1] dims of each head), causal softmax(q·kᵀ / √d)·v per query head.

    With ``cache`` the s positions follow the cached ones: k and v join the cache (after RoPE)
    and the queries attend to every cached and new key the cache's mask allows. With
    ``documents`` a query attends to the keys of its own document only."""
    q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    gqa = k.shape[1] != q.shape[1]
    if cache is not None:
        k, v = cache.append(k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask, enable_gqa=gqa)
    elif documents is not None:
        out = documents.attention(q, k, v, gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return out.transpose(1, 2).flatten(2)
