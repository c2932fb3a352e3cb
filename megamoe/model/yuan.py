"""The Yuan 2.0 decoder, buildable one pipeline stage at a time.

``YuanModel(cfg, first_layer, last_layer, pre_process, post_process)`` holds only layers
[first_layer, last_layer) — the embedding when it is the first stage, the final norm and the
output head when it is the last — so no rank ever materialises the whole model. Layers sit in a
``ModuleDict`` keyed by their *global* index and every parameter is initialised from its global
name, so parameter names and values are the same whatever the pipeline split.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.utils.checkpoint import checkpoint

from megamoe.config.validate import rotary_dim
from megamoe.model.attention import YuanAttention
from megamoe.model.ffn import SwiGLU
from megamoe.model.init import seeded_normal_
from megamoe.model.moe.layer import MoELayer
from megamoe.model.norms import RMSNorm
from megamoe.model.rope import RotaryEmbedding


class YuanDecoderLayer(nn.Module):
    """Pre-norm block: h = h + attn(input_norm(h)); h = h + mlp(post_attn_norm(h)).

    ``mlp`` is the MoE layer (router + experts) or, for dense baselines, one SwiGLU FFN.
    ``recompute_attention`` (train.activation_checkpointing=selective) keeps only the attention
    block's input and recomputes LFA, projections and scores in the backward pass.
    """

    def __init__(self, cfg: DictConfig, layer_index: int, exchange: Optional[Any] = None) -> None:
        super().__init__()
        m = cfg.model
        self.layer_index = layer_index
        self.recompute_attention = cfg.train.activation_checkpointing == "selective"
        self.input_norm = RMSNorm(m.hidden_size, m.rms_norm_eps)
        self.attn = YuanAttention(m)
        self.post_attn_norm = RMSNorm(m.hidden_size, m.rms_norm_eps)
        self.mlp: nn.Module
        if m.ffn_type == "moe":
            self.mlp = MoELayer(m.hidden_size, cfg.moe, layer_index, exchange)
        else:
            self.mlp = SwiGLU(m.hidden_size, m.dense_ffn_hidden_size)

    def reset_parameters(self, std: float, seed: int) -> None:
        key = (seed, "layers", self.layer_index)
        self.input_norm.reset_parameters()
        self.post_attn_norm.reset_parameters()
        self.attn.reset_parameters(std, *key, "attn")
        if isinstance(self.mlp, MoELayer):
            self.mlp.reset_parameters(std, seed)  # keys on its own layer index and global expert ids
        else:
            self.mlp.reset_parameters(std, *key, "mlp")

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = self.input_norm(h)
        if self.recompute_attention and torch.is_grad_enabled():
            h = h + checkpoint(self.attn, x, rope, use_reentrant=False)
        else:
            h = h + self.attn(x, rope)
        return h + self.mlp(self.post_attn_norm(h))


class YuanModel(nn.Module):
    """Layers [first_layer, last_layer) of the Yuan decoder, plus embedding / head when asked.

    Tied embeddings (``cfg.model.tie_embeddings``): a module holding both ends computes the
    logits with ``embed.weight`` (one parameter). A last stage without the embedding owns
    ``lm_head.weight``, initialised from the embedding's key so both copies start equal; the
    trainer keeps them equal by summing their gradients across the two stages.
    """

    def __init__(
        self,
        cfg: DictConfig,
        first_layer: int = 0,
        last_layer: Optional[int] = None,
        pre_process: bool = True,
        post_process: bool = True,
        exchange: Optional[Any] = None,
    ) -> None:
        super().__init__()
        m = cfg.model
        last_layer = m.num_layers if last_layer is None else last_layer
        if not 0 <= first_layer <= last_layer <= m.num_layers:
            raise ValueError(f"layer range [{first_layer}, {last_layer}) is not inside [0, {m.num_layers})")
        self.cfg = cfg
        self.recompute_layers = cfg.train.activation_checkpointing == "full"  # keep only each layer's input
        self.first_layer, self.last_layer = first_layer, last_layer
        self.pre_process, self.post_process = pre_process, post_process
        self.embed = nn.Embedding(m.vocab_size, m.hidden_size) if pre_process else None
        self.rotary = RotaryEmbedding(rotary_dim(cfg), m.rotary_base)
        self.layers = nn.ModuleDict(
            {str(i): YuanDecoderLayer(cfg, i, exchange) for i in range(first_layer, last_layer)}
        )
        self.final_norm = RMSNorm(m.hidden_size, m.rms_norm_eps) if post_process else None
        owns_head = post_process and not (m.tie_embeddings and pre_process)
        self.lm_head = nn.Linear(m.hidden_size, m.vocab_size, bias=False) if owns_head else None

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Initialise every parameter from (seed, its global name): N(0, init_std), norms 1, biases 0."""
        std = self.cfg.model.init_std
        if self.embed is not None:
            seeded_normal_(self.embed.weight, std, seed, "embed", "weight")
        for layer in self.layers.values():
            layer.reset_parameters(std, seed)
        if self.final_norm is not None:
            self.final_norm.reset_parameters()
        if self.lm_head is not None:
            head_key = "embed" if self.cfg.model.tie_embeddings else "lm_head"  # a tied copy starts equal
            seeded_normal_(self.lm_head.weight, std, seed, head_key, "weight")

    def forward(self, x: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [b, s, V] on the last stage (inference, evaluation, HF conversion), else hidden
        states [b, s, H]. Training never builds the logits: it feeds :meth:`hidden_states` and
        :attr:`head_weight` to megamoe.model.loss.chunked_lm_loss."""
        h = self.hidden_states(x, position_ids)
        return F.linear(h, self.head_weight) if self.post_process else h

    def hidden_states(self, x: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: token ids [b, s] on the first stage, else hidden states [b, s, H] → hidden states
        [b, s, H], final-normed on the last stage (the head's input).

        position_ids [b, s] default to 0..s-1; pass restarted ones for ``reset_position_ids``.
        """
        h = self.embed(x) if self.embed is not None else x
        if position_ids is None:
            position_ids = torch.arange(h.shape[1], device=h.device).expand(h.shape[0], -1)
        rope = self.rotary(position_ids)
        recompute = self.recompute_layers and torch.is_grad_enabled()
        for layer in self.layers.values():
            h = checkpoint(layer, h, rope, use_reentrant=False) if recompute else layer(h, rope)
        return self.final_norm(h) if self.post_process else h

    @property
    def head_weight(self) -> nn.Parameter:
        """The output head [V, H] of the last stage: ``lm_head``'s, or the embedding on a tied model holding both."""
        if not self.post_process:
            raise RuntimeError("only the last stage holds the output head")
        return self.lm_head.weight if self.lm_head is not None else self.embed.weight

    def moe_layers(self) -> Iterator[MoELayer]:
        """The MoE layers this stage holds, in global layer order (for stats and aux-free bias updates)."""
        return (layer.mlp for layer in self.layers.values() if isinstance(layer.mlp, MoELayer))
