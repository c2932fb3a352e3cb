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
from megamoe.config.choices import FfnType, Router, RouterMode, RouterOrder
from megamoe.config.layers import is_mixed, shown
from megamoe.config.schema import rotary_dim
from megamoe.models.hf_mapping import LLAMA_NAMES, HFConfigReader, NameTable, PairBuffer, TokenIds, refuse_unexportable

Tensors = Iterable[tuple[str, torch.Tensor]]

NAMES = NameTable("Yuan2-M32", {
    **LLAMA_NAMES,
    "layers.{i}.attn.lf.conv1.weight": "model.layers.{i}.self_attn.lf_gate.conv1.weight",
    "layers.{i}.attn.lf.conv1.bias": "model.layers.{i}.self_attn.lf_gate.conv1.bias",
    "layers.{i}.attn.lf.conv2.weight": "model.layers.{i}.self_attn.lf_gate.conv2.weight",
    "layers.{i}.attn.lf.conv2.bias": "model.layers.{i}.self_attn.lf_gate.conv2.bias",
    "layers.{i}.attn.lf.norm.weight": "model.layers.{i}.self_attn.lf_gate.output_layernorm.weight",
    "layers.{i}.mlp.router.query.weight": "model.layers.{i}.mlp.gate.query.weight",
    "layers.{i}.mlp.router.key.weight": "model.layers.{i}.mlp.gate.key.weight",
    "layers.{i}.mlp.router.value.weight": "model.layers.{i}.mlp.gate.value.weight",
    "layers.{i}.mlp.experts.{e}.w1": "model.layers.{i}.mlp.experts.{e}.w1.weight",
    "layers.{i}.mlp.experts.{e}.w2": "model.layers.{i}.mlp.experts.{e}.w2.weight",
})
CONV_WEIGHTS = ("attn.lf.conv1.weight", "attn.lf.conv2.weight")  # HF adds a trailing kernel dim of 1
QK = ("attn.q_proj.weight", "attn.k_proj.weight")  # after ``layers.{i}.``
HF_QK = ("self_attn.q_proj.weight", "self_attn.k_proj.weight")  # after ``model.layers.{i}.``

_HF_IGNORED = re.compile(r".*rotary_emb\.inv_freq")  # a buffer some Yuan HF files persist


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


def _hf_qk(layer: int, pair: Optional[tuple[torch.Tensor, torch.Tensor]],
           num_heads: int) -> Iterator[tuple[str, torch.Tensor]]:
    if pair:
        q_proj, k_proj = interleave_qk(*pair, num_heads)
        yield f"model.layers.{layer}.self_attn.q_proj.weight", q_proj
        yield f"model.layers.{layer}.self_attn.k_proj.weight", k_proj


def _our_qk(layer: int, pair: Optional[tuple[torch.Tensor, torch.Tensor]],
            num_heads: int) -> Iterator[tuple[str, torch.Tensor]]:
    if pair:
        wq, wk = deinterleave_qk(*pair, num_heads)
        yield f"layers.{layer}.attn.q_proj.weight", wq
        yield f"layers.{layer}.attn.k_proj.weight", wk


def to_hf(tensors: Tensors, cfg: DictConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Our layout-independent (name, tensor) stream → the official HF (name, tensor) stream."""
    num_heads, tied = cfg.model.num_heads, cfg.model.tie_embeddings
    pairs = PairBuffer(QK)
    for name, tensor in tensors:
        layer = split_layer_name(name)
        if layer and layer[1] in QK:
            yield from _hf_qk(layer[0], pairs.add(f"layer {layer[0]}", QK.index(layer[1]), tensor), num_heads)
            continue
        yield NAMES.hf(name), tensor.unsqueeze(-1) if layer and layer[1] in CONV_WEIGHTS else tensor
        if tied and name == "embed.weight":
            yield "lm_head.weight", tensor.clone()
    pairs.check_empty()


def from_hf(tensors: Tensors, cfg: DictConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """The official HF (name, tensor) stream → our layout-independent stream (exact inverse of :func:`to_hf`)."""
    num_heads, tied = cfg.model.num_heads, cfg.model.tie_embeddings
    pairs = PairBuffer(HF_QK)
    for name, tensor in tensors:
        if is_ignored_hf_tensor(name, tied):
            continue
        ours = NAMES.ours(name)
        layer = split_layer_name(ours)
        if layer and layer[1] in QK:
            yield from _our_qk(layer[0], pairs.add(f"layer {layer[0]}", QK.index(layer[1]), tensor), num_heads)
            continue
        yield ours, tensor.squeeze(-1) if layer and layer[1] in CONV_WEIGHTS else tensor
    pairs.check_empty()


# --------------------------------------------------------------------------------------------
# config.json


def check_exportable(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first setting the Yuan2-M32 HF format cannot express."""
    m, moe = cfg.model, cfg.moe
    hf_rotary = m.hidden_size // m.num_heads
    problems = [
        (m.ffn_type != FfnType.MOE, "model.ffn_type", f"'{m.ffn_type}'",
         "every layer there is MoE (upcycle a dense checkpoint first)"),
        (is_mixed(m, moe), "moe.layer_freq", shown(moe.layer_freq),
         "every layer there is MoE (its config.json has no key for dense layers): train with moe.layer_freq=1"),
        (not m.use_lfa, "model.use_lfa", "false", "its modeling code always applies LFA"),
        (rotary_dim(m) != hf_rotary, "model.rotary_percent", f"{m.rotary_percent} (rotary dim {rotary_dim(m)})",
         f"its code rotates hidden_size / num_heads = {hf_rotary} dims of each head; {_rotary_fix(m, hf_rotary)}"),
        (moe.router != Router.ATTENTION, "moe.router", f"'{moe.router}'", "it has only the attention router"),
        (moe.num_shared_experts > 0, "moe.num_shared_experts", str(moe.num_shared_experts), "it has no shared experts"),
        (moe.aux_free_bias, "moe.aux_free_bias", "true", "it has no expert-selection bias"),
        (moe.router_mode != RouterMode.TOKEN_CHOICE, "moe.router_mode", f"'{moe.router_mode}'",
         "its experts are chosen per token"),
        (moe.capacity_factor is not None, "moe.capacity_factor", str(moe.capacity_factor), "it drops no token"),
    ]
    refuse_unexportable("Yuan2-M32", problems)


def _rotary_fix(m: Any, hf_rotary: int) -> str:
    """The settings (train with them) that make the rotary dims the official code's: the head
    width for the same rotary share, or the share for the same head width."""
    fixes = []
    if m.rotary_percent > 0 and (hf_rotary / m.rotary_percent).is_integer():
        fixes.append(f"model.head_dim={int(hf_rotary / m.rotary_percent)}")
    if hf_rotary <= m.head_dim:
        fixes.append(f"model.rotary_percent={hf_rotary / m.head_dim}")
    return "a model it can run sets " + " or ".join(fixes) if fixes else "no head width fits it"


def hf_config(cfg: DictConfig, tokens: TokenIds) -> dict[str, Any]:
    """config.json for ``cfg`` in the keys the official modeling code reads (docs/yuan2-m32.md §7, §9).

    The official routing is softmax → top-k → divide by their sum when ``norm_topk_prob``; our
    "topk_softmax" order equals it with ``norm_topk_prob`` true. The official code builds its
    rotary embedding with base 10000 whatever the config says; ``rope_theta`` records ours.
    The token ids are the run's tokenizer's: the official code reads ``eod_token`` and
    ``sep_token`` whatever the vocabulary (``sep_token`` only for a loss mask the export turns
    off: the eod id when the tokenizer has no separator).
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
            "norm_topk_prob": moe.router_order == RouterOrder.TOPK_SOFTMAX or moe.norm_topk_prob,
            "gated_linear_unit": True,
        },
        "use_lfa": False,
        "use_shareqk": False,
        "use_flash_attention": False,
        "causal_mask": True,
        "use_loss_mask": False,
        "reset_attention_mask": cfg.data.reset_attention_mask,  # the official training-mode mask (docs/yuan2-m32.md §9)
        "reset_position_ids": False,
        "output_router_logits": False,
        "use_cache": True,
        **tokens.llama_ids(),
        "eod_token": tokens.eod,
        "sep_token": tokens.eod if tokens.sep is None else tokens.sep,
    }


def config_from_hf(config: dict[str, Any], source: str = "config.json") -> dict[str, dict[str, Any]]:
    """The ``model`` and ``moe`` config values that rebuild the architecture of an HF ``config.json``
    (and its ``initializer_range``, a training setting: hf_mapping.TRAINING_KEYS).

    Returned as nested sections, ready for ``OmegaConf.merge``. Raises UserError naming the
    config.json key when it is missing or describes something our model cannot build (shared
    Q/K, a non-gated FFN, YaRN, a rotary dim that is not an even part of the head).
    """
    read = HFConfigReader(config, source, "Yuan2-M32")
    get, refuse = read.get, read.refuse
    if get("model_type", None) != "yuan":
        refuse("model_type", f"is {get('model_type', None)!r}, not 'yuan'")
    read.expect("use_shareqk", False, "megamoe's attention has separate q and k projections")
    read.expect("moe_config.gated_linear_unit", True, "megamoe's experts are SwiGLU")
    read.expect("use_yarn", False, "megamoe has no YaRN rotary scaling")
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    projection = get("attention_projection_size", hidden)
    if hidden % heads or projection % heads:
        refuse("num_attention_heads", f"= {heads} does not divide hidden_size {hidden} and the projection {projection}")
    head_dim, rotary = projection // heads, hidden // heads  # the HF code rotates hidden / heads dims
    if rotary % 2 or rotary > head_dim:
        refuse("hidden_size",
               f"/ num_attention_heads = {rotary} rotary dims is not an even part of head dim {head_dim}")
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
        **read.present({"initializer_range": "init_std"}),
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


