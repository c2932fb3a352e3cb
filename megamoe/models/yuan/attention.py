"""Yuan 2.0 attention: Localized Filtering (LFA) on Q and K, rotary embedding, causal SDPA.

LFA (Yuan 2.0, §3.1) makes Q and K see a little local order before attention: two causal
kernel-2 convolutions along the sequence (H → H/2 → H, with bias, no activation), a residual
and an RMSNorm. V is projected from the unfiltered input. Output t depends on tokens t-2..t
only, so causal attention stays causal. In incremental decoding the layer cache supplies each
convolution's input at the position before the new ones (megamoe.nn.kv_cache). With attention
inside documents (megamoe.nn.documents) a document's first token sees a zero previous input in
both convolutions, as a row's first token does: the filter, too, stays inside the document
(the official code never resets it; docs/yuan2-m32.md §4).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.config.schema import ModelConfig
from megamoe.nn.attention import AttentionBlock, causal_attention, split_heads
from megamoe.nn.documents import Documents
from megamoe.nn.init import seeded_normal_
from megamoe.nn.kv_cache import LayerCache
from megamoe.nn.norms import RMSNorm


class CausalConv(nn.Module):
    """y[t] = W[:, :, 0]·x[t-1] + W[:, :, 1]·x[t] + b, with x[-1] = 0, for x [b, s, in].

    ``weight`` [out, in, 2] is a Conv1d kernel whose index 0 is the previous token, the
    layout of Yuan's Conv2d(kernel (2, 1)) weight [out, in, 2, 1] without the trailing 1.
    Written as two matmuls on [b, s, ·] tensors so no transpose to channels-first is needed.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, 2))
        self.bias = nn.Parameter(torch.empty(out_features))

    def reset_parameters(self, std: float, *key: object) -> None:
        seeded_normal_(self.weight, std, *key, "weight")
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, previous: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``previous`` [b, s, in]: x[t-1] for each t, when x continues earlier positions; by
        default x shifted right by one token, zero at t = 0."""
        if previous is None:
            previous = F.pad(x, (0, 0, 1, 0))[:, :-1]
        return F.linear(previous, self.weight[:, :, 0]) + F.linear(x, self.weight[:, :, 1], self.bias)


class LocalizedFiltering(nn.Module):
    """LF(x) = RMSNorm(conv2(conv1(x)) + x): the filter Yuan applies before the Q/K projections."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.conv1 = CausalConv(hidden_size, hidden_size // 2)
        self.conv2 = CausalConv(hidden_size // 2, hidden_size)
        self.norm = RMSNorm(hidden_size, eps)

    def reset_parameters(self, std: float, *key: object) -> None:
        self.conv1.reset_parameters(std, *key, "conv1")
        self.conv2.reset_parameters(std, *key, "conv2")
        self.norm.reset_parameters()

    def forward(self, x: torch.Tensor, cache: Optional[LayerCache] = None,
                documents: Optional[Documents] = None) -> torch.Tensor:
        if cache is not None:
            h = self.conv1(x, cache.previous_inputs("conv1", x))
            return self.norm(self.conv2(h, cache.previous_inputs("conv2", h)) + x)
        if documents is not None:
            h = self.conv1(x, documents.previous(x))
            return self.norm(self.conv2(h, documents.previous(h)) + x)
        return self.norm(self.conv2(self.conv1(x)) + x)


class YuanAttention(AttentionBlock):
    """Multi-head causal self-attention with LFA on Q/K and RoPE on part of each head.

    ``q_proj`` and ``k_proj`` are the plain per-head Q and K maps (head h = rows
    h·head_dim … (h+1)·head_dim); Yuan's Hugging Face checkpoints interleave them, which is
    the checkpoint converter's business, not the model's.
    """

    def __init__(self, model_cfg: ModelConfig) -> None:
        super().__init__()
        hidden, projection = model_cfg.hidden_size, model_cfg.num_heads * model_cfg.head_dim
        self.num_heads, self.head_dim = model_cfg.num_heads, model_cfg.head_dim
        self.lf = LocalizedFiltering(hidden, model_cfg.rms_norm_eps) if model_cfg.use_lfa else None
        self.q_proj = nn.Linear(hidden, projection, bias=False)
        self.k_proj = nn.Linear(hidden, projection, bias=False)
        self.v_proj = nn.Linear(hidden, projection, bias=False)
        self.o_proj = nn.Linear(projection, hidden, bias=False)

    def reset_parameters(self, std: float, *key: object) -> None:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            seeded_normal_(getattr(self, name).weight, std, *key, name, "weight")
        if self.lf is not None:
            self.lf.reset_parameters(std, *key, "lf")

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: Optional[LayerCache] = None, documents: Optional[Documents] = None) -> torch.Tensor:
        """x: the normalised hidden states [b, s, H]; rope: (cos, sin) from RotaryEmbedding;
        cache: this layer's decoding state when x continues cached positions; documents: the
        rows' documents, when attention (and LFA) stays inside each."""
        filtered = self.lf(x, cache, documents) if self.lf is not None else x
        q, k = split_heads(self.q_proj(filtered), self.head_dim), split_heads(self.k_proj(filtered), self.head_dim)
        v = split_heads(self.v_proj(x), self.head_dim)
        return self.o_proj(causal_attention(q, k, v, rope, cache, documents))
