"""A pre-norm decoder with MoE (or dense SwiGLU) FFNs, buildable one pipeline stage at a time.

Both model families here share this skeleton — embedding, ``h = h + attn(norm(h)); h = h +
mlp(norm(h))`` per layer, a final norm and the output head — and differ in the attention block
each passes in (Yuan: LFA + partial RoPE; Qwen-MoE: grouped-query attention with biases).

``Decoder(model, moe, recompute, layers, pre_process, post_process)`` holds only the layers in
``layers`` — the embedding when it is the first stage, the final norm and the output head when
it is the last — so no rank ever materialises the whole model. Layers sit in a ``ModuleDict``
keyed by their *global* index and every parameter is initialised from its global name, so
names and values are the same whatever the pipeline split.

Tensor names are the families' common checkpoint layout: ``embed.weight``,
``layers.{i}.input_norm / attn.* / post_attn_norm / mlp.*``, ``final_norm.weight``,
``lm_head.weight``; the MoE block's names come from megamoe.nn.moe.layer, a dense layer's FFN is
``mlp.w1.weight`` / ``mlp.w2.weight`` (megamoe.nn.ffn). Which layers are MoE: ``moe.layer_freq``
(megamoe.config.layers), by global index, so every stage of a split agrees.

``forward(x, position_ids, cache)`` with a :class:`~megamoe.nn.kv_cache.KVCache` decodes
incrementally (x continues the cached positions; megamoe.inference); without one it is the
training computation, unchanged. ``document_ids`` (``data.reset_attention_mask``) keep every
layer's attention inside each document of a packed row (megamoe.nn.documents).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterable, Iterator, Optional, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megamoe.config.choices import Recompute
from megamoe.config.layers import moe_layer_flags
from megamoe.config.schema import ModelConfig, MoEConfig, rotary_dim
from megamoe.nn.attention import AttentionBlock
from megamoe.nn.documents import Documents
from megamoe.nn.ffn import SwiGLU
from megamoe.nn.init import seeded_normal_
from megamoe.nn.kv_cache import KVCache, LayerCache
from megamoe.nn.moe.dispatcher import TokenExchange
from megamoe.nn.moe.layer import MoELayer
from megamoe.nn.norms import RMSNorm
from megamoe.nn.rope import RotaryEmbedding

# An attention block: built from the model section; forward(normed hidden [b, s, H], (cos, sin)) → [b, s, H]
# (generation also passes a third argument, the layer's LayerCache: megamoe.nn.kv_cache; training with
# data.reset_attention_mask passes documents=Documents: megamoe.nn.documents); reset_parameters(std, *key)
# initialises it from its global identity.
AttentionFactory = Callable[[ModelConfig], AttentionBlock]


class DecoderLayer(nn.Module):
    """Pre-norm block: h = h + attn(input_norm(h)); h = h + mlp(post_attn_norm(h)).

    ``mlp`` is the MoE layer (router + experts) when ``moe_ffn``, else one dense SwiGLU FFN (a
    dense model's layers, and the dense layers ``moe.layer_freq`` puts between MoE ones).
    ``recompute_attention`` (train.activation_checkpointing=selective) keeps only the attention
    block's input and recomputes it (projections, scores) in the backward pass.
    """

    def __init__(self, model: ModelConfig, moe: MoEConfig, attention: AttentionFactory, layer_index: int,
                 moe_ffn: bool, recompute_attention: bool, exchange: Optional[TokenExchange] = None) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.recompute_attention = recompute_attention
        self.input_norm = RMSNorm(model.hidden_size, model.rms_norm_eps)
        self.attn = attention(model)
        self.post_attn_norm = RMSNorm(model.hidden_size, model.rms_norm_eps)
        self.mlp: MoELayer | SwiGLU
        if moe_ffn:
            self.mlp = MoELayer(model.hidden_size, moe, layer_index, exchange)
        else:
            self.mlp = SwiGLU(model.hidden_size, model.dense_ffn_hidden_size)

    def reset_parameters(self, std: float, seed: int) -> None:
        key = (seed, "layers", self.layer_index)
        self.input_norm.reset_parameters()
        self.post_attn_norm.reset_parameters()
        self.attn.reset_parameters(std, *key, "attn")
        if isinstance(self.mlp, MoELayer):
            self.mlp.reset_parameters(std, seed)  # keys on its own layer index and global expert ids
        else:
            self.mlp.reset_parameters(std, *key, "mlp")

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: Optional[LayerCache] = None, documents: Optional[Documents] = None) -> torch.Tensor:
        x = self.input_norm(h)
        attn = self.attn if documents is None else partial(self.attn, documents=documents)
        if cache is not None:
            h = h + self.attn(x, rope, cache)
        elif self.recompute_attention and torch.is_grad_enabled():
            h = h + checkpoint(attn, x, rope, use_reentrant=False)
        else:
            h = h + attn(x, rope)
        return h + self.mlp(self.post_attn_norm(h))


class Decoder(nn.Module):
    """The layers ``layers`` of a decoder, plus embedding / head when asked (a pipeline stage).

    Tied embeddings (``model.tie_embeddings``): a module holding both ends computes the logits
    with ``embed.weight`` (one parameter). A last stage without the embedding owns
    ``lm_head.weight``, initialised from the embedding's key so both copies start equal; the
    trainer keeps them equal by summing their gradients across the two stages.
    ``recompute`` is train.activation_checkpointing: "full" keeps only each layer's input.
    """

    def __init__(self, model: ModelConfig, moe: MoEConfig, attention: AttentionFactory, recompute: str = "none",
                 layers: Optional[range] = None, pre_process: bool = True, post_process: bool = True,
                 exchange: Optional[TokenExchange] = None) -> None:
        super().__init__()
        layers = range(model.num_layers) if layers is None else layers
        if not 0 <= layers.start <= layers.stop <= model.num_layers:
            raise ValueError(f"layer range [{layers.start}, {layers.stop}) is not inside [0, {model.num_layers})")
        self.init_std, self.tie_embeddings = model.init_std, model.tie_embeddings
        self.recompute_layers = recompute == Recompute.FULL
        self.pre_process, self.post_process = pre_process, post_process
        self.embed = nn.Embedding(model.vocab_size, model.hidden_size) if pre_process else None
        self.rotary = RotaryEmbedding(rotary_dim(model), model.rotary_base)
        moe_ffn = moe_layer_flags(model, moe)
        self.layers = nn.ModuleDict({
            str(i): DecoderLayer(model, moe, attention, i, moe_ffn[i], recompute == Recompute.SELECTIVE, exchange)
            for i in layers})
        self.final_norm = RMSNorm(model.hidden_size, model.rms_norm_eps) if post_process else None
        owns_head = post_process and not (model.tie_embeddings and pre_process)
        self.lm_head = nn.Linear(model.hidden_size, model.vocab_size, bias=False) if owns_head else None

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Initialise every parameter from (seed, its global name): N(0, init_std), norms 1, biases 0."""
        if self.embed is not None:
            seeded_normal_(self.embed.weight, self.init_std, seed, "embed", "weight")
        for layer in self.decoder_layers():
            layer.reset_parameters(self.init_std, seed)
        if self.final_norm is not None:
            self.final_norm.reset_parameters()
        if self.lm_head is not None:
            head_key = "embed" if self.tie_embeddings else "lm_head"  # a tied copy starts equal
            seeded_normal_(self.lm_head.weight, self.init_std, seed, head_key, "weight")

    def forward(self, x: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [b, s, V] on the last stage (inference, evaluation, HF conversion), else hidden
        states [b, s, H]. Training never builds the logits: it feeds :meth:`hidden_states` and
        :attr:`head_weight` to megamoe.nn.loss.chunked_lm_loss."""
        h = self.hidden_states(x, position_ids, cache, document_ids)
        return F.linear(h, self.head_weight) if self.post_process else h

    def hidden_states(self, x: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                      cache: Optional[KVCache] = None, document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: token ids [b, s] on the first stage, else hidden states [b, s, H] → hidden states
        [b, s, H], final-normed on the last stage (the head's input).

        position_ids [b, s] default to 0..s-1; pass restarted ones for ``reset_position_ids``,
        and with ``cache`` the ones ``cache.advance`` returned for these positions.
        document_ids [b, s] (``reset_attention_mask``; not with ``cache``, which decodes one
        document per row) keep attention inside each document.
        """
        if cache is not None and document_ids is not None:
            raise ValueError("decoding with a KV cache takes one document per row: no document_ids")
        h = self.embed(x) if self.embed is not None else x
        if position_ids is None:
            position_ids = torch.arange(h.shape[1], device=h.device).expand(h.shape[0], -1)
        rope = self.rotary(position_ids)
        documents = Documents(document_ids) if document_ids is not None else None
        recompute = self.recompute_layers and torch.is_grad_enabled()
        for layer in self.decoder_layers():
            if cache is not None:
                h = layer(h, rope, cache.layer(layer.layer_index))
            elif recompute:
                h = checkpoint(layer, h, rope, use_reentrant=False, documents=documents)
            else:
                h = layer(h, rope, documents=documents)
        return self.final_norm(h) if self.final_norm is not None else h  # (the last stage's)

    @property
    def head_weight(self) -> nn.Parameter:
        """The output head [V, H] of the last stage: ``lm_head``'s, or the embedding on a tied model holding both."""
        if not self.post_process:
            raise RuntimeError("only the last stage holds the output head")
        head = self.lm_head if self.lm_head is not None else self.embed
        assert head is not None  # a last stage without lm_head holds the tied embedding
        return cast(nn.Parameter, head.weight)  # torch types a module's weight as a plain Tensor

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The vocabulary matrices this stage holds (the embedding, an untied or copied head)."""
        return [cast(nn.Parameter, module.weight) for module in (self.embed, self.lm_head) if module is not None]

    def tied_parameter(self) -> Optional[nn.Parameter]:
        """This stage's end of a tied embedding split over stages (the first stage's embedding, the
        last stage's head copy): the trainer sums the two ends' gradients. None otherwise."""
        if not self.tie_embeddings or self.pre_process == self.post_process:
            return None
        end = self.embed if self.pre_process else self.lm_head
        assert end is not None  # the first stage holds the embedding, a last stage without it the head copy
        return cast(nn.Parameter, end.weight)

    def tied_copies(self) -> dict[str, str]:
        """Parameters that are copies of another stage's, by name → the name of the original
        (a checkpoint stores the original once)."""
        return {"lm_head.weight": "embed.weight"} if self.tie_embeddings and self.lm_head is not None else {}

    def decoder_layers(self) -> Iterable[DecoderLayer]:
        """The layers this stage holds, in global layer order (``layers`` as their type: an
        nn.ModuleDict's values are typed as any module)."""
        return cast(Iterable[DecoderLayer], self.layers.values())

    def moe_layers(self) -> Iterator[MoELayer]:
        """The MoE layers this stage holds, in global layer order (for stats and aux-free bias updates)."""
        return (layer.mlp for layer in self.decoder_layers() if isinstance(layer.mlp, MoELayer))
