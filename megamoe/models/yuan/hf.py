"""The Yuan2-M32 Hugging Face layout ↔ megamoe's layout-independent tensors (the Yuan family's
adapter). The mapping is pure: it turns one stream of ``(name, tensor)`` pairs into another and
never holds more than one layer's q/k pair; megamoe.checkpoint.hf_files reads and writes the files.

What the official layout does differently from ours (docs/yuan2-m32.md §3, §8, §9):

- ``q_proj`` / ``k_proj`` are not plain Q and K. The official forward concatenates
  q_proj(x) and k_proj(x), views the result as [heads, 2·head_dim] and splits each head into
  (q_h, k_h): head h's Wq is rows [2h·d, 2h·d + d) of cat(q_proj, k_proj) and its Wk the next
  d rows. Converting therefore needs both halves of a layer at once.
- The LFA convolutions are Conv2d weights [out, in, 2, 1]; ours are [out, in, 2] (kernel index
  0 = the previous token in both).
- Tied embeddings are written twice (``lm_head.weight`` = the embedding) with
  ``tie_word_embeddings: true``; reading a tied model ignores ``lm_head.weight``, as the
  official code does.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Iterator, Optional

import torch
from omegaconf import DictConfig

from megamoe.checkpoint.names import split_layer_name
from megamoe.cli import UserError
from megamoe.config import ConfigError
from megamoe.nn.rope import rotary_dim

Tensors = Iterable[tuple[str, torch.Tensor]]

# Tensors outside the decoder layers.
GLOBAL_NAMES = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight",
                "lm_head.weight": "lm_head.weight"}
# Per layer: our name after ``layers.{i}.`` → the HF name after ``model.layers.{i}.``.
LAYER_NAMES = {
    "input_norm.weight": "input_layernorm.weight",
    "post_attn_norm.weight": "post_attention_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "attn.lf.conv1.weight": "self_attn.lf_gate.conv1.weight",
    "attn.lf.conv1.bias": "self_attn.lf_gate.conv1.bias",
    "attn.lf.conv2.weight": "self_attn.lf_gate.conv2.weight",
    "attn.lf.conv2.bias": "self_attn.lf_gate.conv2.bias",
    "attn.lf.norm.weight": "self_attn.lf_gate.output_layernorm.weight",
    "mlp.router.query.weight": "mlp.gate.query.weight",
    "mlp.router.key.weight": "mlp.gate.key.weight",
    "mlp.router.value.weight": "mlp.gate.value.weight",
}
CONV_WEIGHTS = ("attn.lf.conv1.weight", "attn.lf.conv2.weight")  # HF adds a trailing kernel dim of 1
QK = ("attn.q_proj.weight", "attn.k_proj.weight")

_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_OURS_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(w1|w2)")
_HF_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(w1|w2)\.weight")
_HF_IGNORED = re.compile(r".*rotary_emb\.inv_freq")  # a buffer some Yuan HF files persist

# Ids of Yuan's sentencepiece tokenizer (docs/yuan2-m32.md §7), written only for its padded vocabulary.
YUAN_VOCAB_SIZE = 135040
YUAN_TOKEN_IDS = {"bos_token_id": 1, "eos_token_id": 77185, "pad_token_id": 77185,
                  "eod_token": 77185, "sep_token": 77187}


# --------------------------------------------------------------------------------------------
# names


def hf_name(name: str) -> str:
    """Our layout-independent name → the official Hugging Face name."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    if layer := split_layer_name(name):
        i, rest = layer
        if rest in LAYER_NAMES:
            return f"model.layers.{i}.{LAYER_NAMES[rest]}"
        if expert := _OURS_EXPERT.fullmatch(rest):
            return f"model.layers.{i}.mlp.experts.{expert[1]}.{expert[2]}.weight"
    raise UserError(f"{name}: this tensor has no counterpart in the Yuan2-M32 Hugging Face layout")


_OURS_GLOBAL = {hf: ours for ours, hf in GLOBAL_NAMES.items()}
_OURS_LAYER_NAMES = {hf: ours for ours, hf in LAYER_NAMES.items()}


def our_name(name: str) -> str:
    """The official Hugging Face name → our layout-independent name."""
    if name in _OURS_GLOBAL:
        return _OURS_GLOBAL[name]
    if layer := _HF_LAYER.fullmatch(name):
        i, rest = layer[1], layer[2]
        if rest in _OURS_LAYER_NAMES:
            return f"layers.{i}.{_OURS_LAYER_NAMES[rest]}"
        if expert := _HF_EXPERT.fullmatch(rest):
            return f"layers.{i}.mlp.experts.{expert[1]}.{expert[2]}"
    raise UserError(f"{name}: not a Yuan2-M32 Hugging Face tensor name")


def is_ignored_hf_tensor(name: str, tied: bool) -> bool:
    """HF tensors that carry nothing for us: persisted rotary buffers, and a tied model's head."""
    return bool(_HF_IGNORED.fullmatch(name)) or (tied and name == "lm_head.weight")


# --------------------------------------------------------------------------------------------
# tensors


def interleave_qk(wq: torch.Tensor, wk: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain per-head Wq, Wk [heads·d, H] → the official (q_proj, k_proj).

    Stacks each head's q rows above its k rows ([heads, 2, d, H]) and cuts the result in two
    row-halves. Each half is its own tensor (safetensors refuses tensors that share memory).
    """
    fused = torch.stack([wq.unflatten(0, (num_heads, -1)), wk.unflatten(0, (num_heads, -1))], dim=1).flatten(0, 2)
    half = wq.shape[0]
    return fused[:half].clone(), fused[half:].clone()


def deinterleave_qk(q_proj: torch.Tensor, k_proj: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official (q_proj, k_proj) → plain per-head Wq, Wk; the exact inverse of :func:`interleave_qk`."""
    fused = torch.cat([q_proj, k_proj]).unflatten(0, (num_heads, 2, -1))  # [heads, (q, k), d, H]
    return fused[:, 0].flatten(0, 1), fused[:, 1].flatten(0, 1)


class _PairBuffer:
    """Holds a layer's q (or k) until its partner arrives: the only tensors a conversion keeps."""

    def __init__(self) -> None:
        self.pending: dict[int, dict[int, torch.Tensor]] = {}

    def add(self, layer: int, slot: int, tensor: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        pair = self.pending.setdefault(layer, {})
        pair[slot] = tensor
        if len(pair) < 2:
            return None
        del self.pending[layer]
        return pair[0], pair[1]

    def check_empty(self, names: tuple[str, str]) -> None:
        for layer, pair in self.pending.items():
            have, missing = (names[0], names[1]) if 0 in pair else (names[1], names[0])
            raise UserError(f"layer {layer}: found {have} but not {missing}; the checkpoint is incomplete")


def _hf_qk(layer: int, pair: Optional[tuple[torch.Tensor, torch.Tensor]], num_heads: int) -> Iterator[tuple[str, torch.Tensor]]:
    if pair:
        q_proj, k_proj = interleave_qk(*pair, num_heads)
        yield f"model.layers.{layer}.self_attn.q_proj.weight", q_proj
        yield f"model.layers.{layer}.self_attn.k_proj.weight", k_proj


def _our_qk(layer: int, pair: Optional[tuple[torch.Tensor, torch.Tensor]], num_heads: int) -> Iterator[tuple[str, torch.Tensor]]:
    if pair:
        wq, wk = deinterleave_qk(*pair, num_heads)
        yield f"layers.{layer}.attn.q_proj.weight", wq
        yield f"layers.{layer}.attn.k_proj.weight", wk


def to_hf(tensors: Tensors, cfg: DictConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Our layout-independent (name, tensor) stream → the official HF (name, tensor) stream."""
    num_heads, tied = cfg.model.num_heads, cfg.model.tie_embeddings
    pairs = _PairBuffer()
    for name, tensor in tensors:
        layer = split_layer_name(name)
        if layer and layer[1] in QK:
            yield from _hf_qk(layer[0], pairs.add(layer[0], QK.index(layer[1]), tensor), num_heads)
            continue
        yield hf_name(name), tensor.unsqueeze(-1) if layer and layer[1] in CONV_WEIGHTS else tensor
        if tied and name == "embed.weight":
            yield "lm_head.weight", tensor.clone()
    pairs.check_empty(QK)


def from_hf(tensors: Tensors, cfg: DictConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """The official HF (name, tensor) stream → our layout-independent stream (exact inverse of :func:`to_hf`)."""
    num_heads, tied = cfg.model.num_heads, cfg.model.tie_embeddings
    pairs = _PairBuffer()
    for name, tensor in tensors:
        if is_ignored_hf_tensor(name, tied):
            continue
        ours = our_name(name)
        layer = split_layer_name(ours)
        if layer and layer[1] in QK:
            yield from _our_qk(layer[0], pairs.add(layer[0], QK.index(layer[1]), tensor), num_heads)
            continue
        yield ours, tensor.squeeze(-1) if layer and layer[1] in CONV_WEIGHTS else tensor
    pairs.check_empty((LAYER_NAMES[QK[0]], LAYER_NAMES[QK[1]]))


# --------------------------------------------------------------------------------------------
# config.json


def check_exportable(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first setting the Yuan2-M32 HF format cannot express."""
    m, moe = cfg.model, cfg.moe
    hf_rotary = m.hidden_size // m.num_heads
    problems = [
        (m.ffn_type != "moe", "model.ffn_type", f"'{m.ffn_type}'",
         "every layer there is MoE (upcycle a dense checkpoint first)"),
        (not m.use_lfa, "model.use_lfa", "false", "its modeling code always applies LFA"),
        (rotary_dim(m) != hf_rotary, "model.rotary_percent", f"{m.rotary_percent} (rotary dim {rotary_dim(m)})",
         f"its code rotates hidden_size / num_heads = {hf_rotary} dims of each head"),
        (moe.router != "attention", "moe.router", f"'{moe.router}'", "it has only the attention router"),
        (moe.num_shared_experts > 0, "moe.num_shared_experts", str(moe.num_shared_experts), "it has no shared experts"),
        (moe.aux_free_bias, "moe.aux_free_bias", "true", "it has no expert-selection bias"),
    ]
    for bad, key, value, why in problems:
        if bad:
            raise ConfigError(f"{key}: {value} cannot be exported to the Yuan2-M32 Hugging Face format: {why}")


def hf_config(cfg: DictConfig) -> dict[str, Any]:
    """config.json for ``cfg`` in the keys the official modeling code reads (docs/yuan2-m32.md §7, §9).

    The official routing is softmax → top-k → divide by their sum when ``norm_topk_prob``; our
    "topk_softmax" order equals it with ``norm_topk_prob`` true. The official code builds its
    rotary embedding with base 10000 whatever the config says; ``rope_theta`` records ours.
    Token ids are Yuan's tokenizer's when the vocabulary is its padded 135040, else left unset.
    """
    check_exportable(cfg)
    m, moe = cfg.model, cfg.moe
    return {
        "architectures": ["YuanForCausalLM"],
        "model_type": "yuan",
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "attention_projection_size": m.num_heads * m.head_dim,
        "max_position_embeddings": m.max_position_embeddings,
        "model_max_length": m.max_position_embeddings,
        "rms_norm_eps": m.rms_norm_eps,
        "rope_theta": m.rotary_base,
        "hidden_act": "silu",
        "initializer_range": m.init_std,
        "tie_word_embeddings": m.tie_embeddings,
        "moe_config": {
            "moe_num_experts": moe.num_experts,
            "moe_top_k": moe.top_k,
            "ffn_hidden_size": moe.ffn_hidden_size,
            "norm_topk_prob": moe.router_order == "topk_softmax" or moe.norm_topk_prob,
            "gated_linear_unit": True,
        },
        "use_lfa": False,
        "use_shareqk": False,
        "use_flash_attention": False,
        "causal_mask": True,
        "use_loss_mask": False,
        "reset_attention_mask": False,
        "reset_position_ids": False,
        "output_router_logits": False,
        "use_cache": True,
        **(YUAN_TOKEN_IDS if m.vocab_size == YUAN_VOCAB_SIZE else {"pad_token_id": None}),
    }


_MISSING = object()


def config_from_hf(config: dict[str, Any], source: str = "config.json") -> dict[str, dict[str, Any]]:
    """The ``model`` and ``moe`` config values that rebuild the architecture of an HF ``config.json``.

    Returned as nested sections, ready for ``OmegaConf.merge``. Raises UserError naming the
    config.json key when it is missing or describes something our model cannot build (shared
    Q/K, a non-gated FFN, YaRN, a rotary dim that is not an even part of the head).
    """

    def get(key: str, default: Any = _MISSING) -> Any:
        node: Any = config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                if default is _MISSING:
                    raise UserError(f"{source}: '{key}' is missing; a Yuan2-M32 config.json needs it")
                return default
            node = node[part]
        return node

    def refuse(key: str, message: str) -> None:
        raise UserError(f"{source}: '{key}' {message}; megamoe cannot build this model")

    if get("model_type", None) != "yuan":
        refuse("model_type", f"is {get('model_type', None)!r}, not 'yuan'")
    for key, wanted in (("use_shareqk", False), ("moe_config.gated_linear_unit", True), ("use_yarn", False)):
        if get(key, wanted) != wanted:
            refuse(key, f"is {get(key)!r}")
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    projection = get("attention_projection_size", hidden)
    if hidden % heads or projection % heads:
        refuse("num_attention_heads", f"= {heads} does not divide hidden_size {hidden} and the projection {projection}")
    head_dim, rotary = projection // heads, hidden // heads  # the HF code rotates hidden / heads dims
    if rotary % 2 or rotary > head_dim:
        refuse("hidden_size", f"/ num_attention_heads = {rotary} rotary dims is not an even part of head dim {head_dim}")
    norm_topk_prob = get("moe_config.norm_topk_prob")
    model = {
        "vocab_size": get("vocab_size"),
        "hidden_size": hidden,
        "num_layers": get("num_hidden_layers"),
        "num_heads": heads,
        "head_dim": head_dim,
        "rotary_percent": rotary / head_dim,
        "rotary_base": get("rope_theta", 10000.0),
        "rms_norm_eps": get("rms_norm_eps", 1e-6),
        "max_position_embeddings": get("max_position_embeddings"),
        "tie_embeddings": get("tie_word_embeddings", True),
        "use_lfa": True,
        "ffn_type": "moe",
    }
    moe = {
        "num_experts": get("moe_config.moe_num_experts"),
        "top_k": get("moe_config.moe_top_k"),
        "ffn_hidden_size": get("moe_config.ffn_hidden_size"),
        "router": "attention",
        "norm_topk_prob": norm_topk_prob,
        "num_shared_experts": 0,
        "aux_free_bias": False,
    }
    if not norm_topk_prob:  # only softmax → top-k without renormalising reproduces it
        moe["router_order"] = "softmax_topk"
    return {"model": model, "moe": moe}


