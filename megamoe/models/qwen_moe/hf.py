"""The Qwen2-MoE Hugging Face layout (transformers' ``Qwen2MoeForCausalLM``, which also runs
Qwen1.5-MoE) ↔ megamoe's layout-independent tensors: the Qwen-MoE family's adapter. The mapping
is pure, one stream of ``(name, tensor)`` pairs into another; megamoe.checkpoint.hf_files reads
and writes the files.

What the HF layout does differently from ours:

- A SwiGLU's input weights are two tensors, ``gate_proj`` and ``up_proj``; ours are one, ``w1``
  = [gate rows; up rows] (megamoe.nn.ffn), and ``down_proj`` is our ``w2``. Export cuts each
  routed expert's, the shared expert's and a dense layer's ``w1`` in two; import joins the
  halves, holding the first until its partner arrives — one pair at most, in the files' order.
- Which layers are MoE: transformers makes layer i sparse when i is not in ``mlp_only_layers``
  and (i + 1) % ``decoder_sparse_step`` == 0 (and ``num_experts`` > 0); the others are a dense
  SwiGLU of ``intermediate_size`` (``model.layers.{i}.mlp.gate_proj`` …). Ours is
  ``moe.layer_freq`` (Megatron's rule, i % N == 0: a different phase), so import writes the
  layers as the shortest ``moe.layer_freq`` (an int where one selects them, else the 0 / 1
  list) and export the ``decoder_sparse_step`` that leaves the fewest ``mlp_only_layers``.
- The router is ``mlp.gate``, the shared expert ``mlp.shared_expert`` and its sigmoid gate
  ``mlp.shared_expert_gate``. Our ``moe.num_shared_experts`` experts of width F run as one
  SwiGLU of width N·F (megamoe.nn.moe.layer), which is HF's one shared expert of
  ``shared_expert_intermediate_size`` N·F.
- A tied model has no ``lm_head.weight`` in the files (transformers' save_pretrained writes
  none); reading one ignores it if present.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
from omegaconf import DictConfig

from megamoe.config.choices import FfnType, Router, RouterMode, RouterOrder
from megamoe.config.layers import layer_freq_of, moe_layer_flags
from megamoe.models.hf_mapping import LLAMA_NAMES, HFConfigReader, NameTable, PairBuffer, TokenIds, refuse_unexportable
from megamoe.nn.attention import kv_heads

Tensors = Iterable[tuple[str, torch.Tensor]]

ARCHITECTURE = "Qwen2-MoE"
NAMES = NameTable(ARCHITECTURE, {
    **LLAMA_NAMES,
    **{f"layers.{{i}}.attn.{p}.bias": f"model.layers.{{i}}.self_attn.{p}.bias" for p in ("q_proj", "k_proj", "v_proj")},
    "layers.{i}.mlp.router.weight": "model.layers.{i}.mlp.gate.weight",
    "layers.{i}.mlp.experts.{e}.w2": "model.layers.{i}.mlp.experts.{e}.down_proj.weight",
    "layers.{i}.mlp.shared_experts.w2.weight": "model.layers.{i}.mlp.shared_expert.down_proj.weight",
    "layers.{i}.mlp.shared_expert_gate.weight": "model.layers.{i}.mlp.shared_expert_gate.weight",
    "layers.{i}.mlp.w2.weight": "model.layers.{i}.mlp.down_proj.weight",  # a dense layer's SwiGLU
})
# Our fused SwiGLU input weight → the HF module that holds its two halves as HALVES.
GATE_UP = NameTable(ARCHITECTURE, {
    "layers.{i}.mlp.experts.{e}.w1": "model.layers.{i}.mlp.experts.{e}",
    "layers.{i}.mlp.shared_experts.w1.weight": "model.layers.{i}.mlp.shared_expert",
    "layers.{i}.mlp.w1.weight": "model.layers.{i}.mlp",
})
HALVES = ("gate_proj.weight", "up_proj.weight")


def is_ignored_hf_tensor(name: str, tied: bool) -> bool:
    """A tied model's head, if a file carries one, is the embedding again."""
    return tied and name == "lm_head.weight"


# --------------------------------------------------------------------------------------------
# tensors


def _swiglu_half(name: str) -> Optional[tuple[str, int]]:
    """``…experts.5.up_proj.weight`` → (``…experts.5``, 1): the HF module and which half of our
    w1 the tensor is; None for any other tensor."""
    for slot, half in enumerate(HALVES):
        module = name.removesuffix("." + half)
        if module != name and GATE_UP.get_ours(module) is not None:
            return module, slot
    return None


def to_hf(tensors: Tensors, cfg: DictConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Our layout-independent (name, tensor) stream → the HF (name, tensor) stream."""
    for name, tensor in tensors:
        module = GATE_UP.get_hf(name)
        if module is None:
            yield NAMES.hf(name), tensor
            continue
        for half, rows in zip(HALVES, tensor.chunk(2)):
            yield f"{module}.{half}", rows.clone()  # its own tensor: safetensors refuses shared memory


def _joined(module: str, pair: Optional[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Our w1 once both halves are in (the pair dies with this frame)."""
    if pair:
        yield GATE_UP.ours(module), torch.cat(pair)


def from_hf(tensors: Tensors, cfg: DictConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF (name, tensor) stream → our layout-independent stream (exact inverse of :func:`to_hf`)."""
    tied = cfg.model.tie_embeddings
    pairs = PairBuffer(HALVES)
    for name, tensor in tensors:
        if is_ignored_hf_tensor(name, tied):
            continue
        half = _swiglu_half(name)
        if half is None:
            yield NAMES.ours(name), tensor
        else:
            yield from _joined(half[0], pairs.add(*half, tensor))
    pairs.check_empty()


# --------------------------------------------------------------------------------------------
# config.json


def check_exportable(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first setting the Qwen2-MoE HF format cannot express."""
    m, moe = cfg.model, cfg.moe
    hf_head_dim = m.hidden_size // m.num_heads
    refuse_unexportable(ARCHITECTURE, [
        (m.ffn_type != FfnType.MOE, "model.ffn_type", f"'{m.ffn_type}'",
         "a Qwen2-MoE model has MoE layers (upcycle a dense checkpoint first)"),
        (m.head_dim != hf_head_dim, "model.head_dim", str(m.head_dim),
         f"its heads are hidden_size / num_heads = {hf_head_dim} wide: train with model.head_dim={hf_head_dim}"),
        (m.rotary_percent != 1.0, "model.rotary_percent", str(m.rotary_percent),
         "it rotates whole heads: train with model.rotary_percent=1.0"),
        (not m.qkv_bias, "model.qkv_bias", "false", "its q/k/v projections always have biases"),
        (moe.router != Router.LINEAR, "moe.router", f"'{moe.router}'", "its router is one linear map"),
        (moe.noisy_gating, "moe.noisy_gating", "true", "its router has no noise map"),
        (moe.router_mode != RouterMode.TOKEN_CHOICE, "moe.router_mode", f"'{moe.router_mode}'",
         "each token chooses its experts there"),
        (moe.aux_free_bias, "moe.aux_free_bias", "true", "it has no expert-selection bias"),
        (moe.capacity_factor is not None, "moe.capacity_factor", str(moe.capacity_factor), "it never drops tokens"),
        (moe.num_shared_experts == 0, "moe.num_shared_experts", "0", "every layer there has a shared expert"),
        (not moe.shared_expert_gate, "moe.shared_expert_gate", "false", "its shared expert is always gated"),
    ])


def hf_config(cfg: DictConfig, tokens: TokenIds) -> dict[str, Any]:
    """config.json for ``cfg`` in the keys transformers' Qwen2MoeConfig reads.

    Routing there is softmax over all experts → top-k → divided by their sum when
    ``norm_topk_prob``; our "topk_softmax" order equals it with ``norm_topk_prob`` true.
    ``intermediate_size`` is the width of the dense layers (``model.dense_ffn_hidden_size``,
    recorded also where there are none), ``decoder_sparse_step`` and ``mlp_only_layers`` say
    which they are (:func:`sparse_layout`). The token ids are the run's tokenizer's.
    """
    check_exportable(cfg)
    m, moe = cfg.model, cfg.moe
    step, mlp_only = sparse_layout(moe_layer_flags(m, moe))
    return {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.dense_ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": kv_heads(m),
        "qkv_bias": True,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings,
        "initializer_range": m.init_std,
        "rms_norm_eps": m.rms_norm_eps,
        "rope_theta": m.rotary_base,
        "tie_word_embeddings": m.tie_embeddings,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "decoder_sparse_step": step,
        "mlp_only_layers": mlp_only,
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": moe.ffn_hidden_size,
        "shared_expert_intermediate_size": moe.num_shared_experts * (moe.shared_expert_ffn_hidden_size
                                                                     or moe.ffn_hidden_size),
        "norm_topk_prob": moe.router_order == RouterOrder.TOPK_SOFTMAX or moe.norm_topk_prob,
        "router_aux_loss_coef": moe.aux_loss_coeff,
        "output_router_logits": False,
        "use_cache": True,
        **tokens.llama_ids(),
    }


def config_from_hf(config: dict[str, Any], source: str = "config.json") -> dict[str, dict[str, Any]]:
    """The ``model`` and ``moe`` config values that rebuild the architecture of a Qwen2-MoE ``config.json``,
    and its training settings (hf_mapping.TRAINING_KEYS: ``initializer_range``,
    ``router_aux_loss_coef``) when it has them.

    Returned as nested sections, ready for ``OmegaConf.merge``. Raises UserError naming the
    config.json key when it is missing or describes something megamoe does not build:
    sliding-window attention, scaled RoPE, heads of another width, no MoE layer at all.
    """
    read = HFConfigReader(config, source, ARCHITECTURE)
    get = read.get
    if get("model_type", None) != "qwen2_moe":
        read.refuse("model_type", f"is {get('model_type', None)!r}, not 'qwen2_moe'")
    read.expect("hidden_act", "silu", "megamoe's experts are SwiGLU")
    read.expect("use_sliding_window", False, "megamoe's attention is full causal attention")
    if any(kind != "full_attention" for kind in get("layer_types", None) or []):
        read.refuse("layer_types", f"is {get('layer_types')!r}: megamoe's attention is full causal attention")
    read.expect("rope_scaling", None, "megamoe's RoPE is unscaled")
    read.expect("rope_parameters.rope_type", "default", "megamoe's RoPE is unscaled")
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    if hidden % heads:
        read.refuse("num_attention_heads", f"= {heads} does not divide hidden_size {hidden}")
    if get("head_dim", None) not in (None, hidden // heads):
        read.refuse("head_dim", f"is {get('head_dim')}: megamoe reads heads of hidden_size / num_attention_heads "
                                f"= {hidden // heads} dims")
    model = {
        "vocab_size": get("vocab_size"),
        "hidden_size": hidden,
        "num_layers": get("num_hidden_layers"),
        "num_heads": heads,
        "num_kv_heads": get("num_key_value_heads", None) or heads,
        "head_dim": hidden // heads,
        "qkv_bias": get("qkv_bias", True),
        "rotary_percent": 1.0,
        "rotary_base": get("rope_parameters.rope_theta", get("rope_theta", 10000.0)),
        "rms_norm_eps": get("rms_norm_eps", 1e-6),
        "max_position_embeddings": get("max_position_embeddings"),
        "tie_embeddings": get("tie_word_embeddings", False),
        "use_lfa": False,
        "ffn_type": "moe",
        "dense_ffn_hidden_size": get("intermediate_size"),
        **read.present({"initializer_range": "init_std"}),
    }
    moe = {
        "num_experts": get("num_experts"),
        "top_k": get("num_experts_per_tok"),
        "ffn_hidden_size": get("moe_intermediate_size"),
        "router": "linear",
        "noisy_gating": False,
        "router_mode": "token_choice",
        "router_order": "softmax_topk",
        "norm_topk_prob": get("norm_topk_prob", False),
        "aux_free_bias": False,
        "capacity_factor": None,
        "num_shared_experts": 1,
        "shared_expert_ffn_hidden_size": get("shared_expert_intermediate_size"),
        "shared_expert_gate": True,
        "layer_freq": layer_freq_of(_sparse_layers(read, get("num_hidden_layers"))),
        **read.present({"router_aux_loss_coef": "aux_loss_coeff"}),
    }
    return {"model": model, "moe": moe}


def _sparse_layers(read: HFConfigReader, num_layers: int) -> list[bool]:
    """transformers' rule: layer i is sparse when i is not in mlp_only_layers, num_experts > 0 and
    (i + 1) % decoder_sparse_step == 0. UserError naming the key for values it cannot apply, or
    for a model without MoE layers (a dense Qwen2 model)."""
    step, mlp_only = read.get("decoder_sparse_step", 1), read.get("mlp_only_layers", None) or []
    if type(step) is not int or step < 1:
        read.refuse("decoder_sparse_step", f"is {step!r}: it must be a whole number >= 1")
    if not isinstance(mlp_only, list) or any(type(i) is not int or not 0 <= i < num_layers for i in mlp_only):
        read.refuse("mlp_only_layers", f"is {mlp_only!r}: it lists layer indices in [0, {num_layers})")
    if read.get("num_experts") <= 0:
        read.refuse("num_experts", f"is {read.get('num_experts')}: a Qwen2-MoE model without experts is dense")
    sparse = [i not in mlp_only and (i + 1) % step == 0 for i in range(num_layers)]
    if not any(sparse):
        read.refuse("mlp_only_layers", f"is {mlp_only} with decoder_sparse_step {step}: no layer of the "
                                       f"{num_layers} is MoE (a dense model)")
    return sparse


def sparse_layout(flags: Sequence[bool]) -> tuple[int, list[int]]:
    """(decoder_sparse_step, mlp_only_layers) that make transformers build MoE layers where ``flags``
    are true: the step whose every multiple (i + 1) holds the MoE layers and leaves the fewest
    dense ones to list (the smallest such step on a tie)."""
    candidates = []
    for step in range(1, len(flags) + 1):
        sparse = [(i + 1) % step == 0 for i in range(len(flags))]
        if all(s or not flag for s, flag in zip(sparse, flags)):
            candidates.append((sum(sparse) - sum(flags), step))
    _, step = min(candidates)
    return step, [i for i, flag in enumerate(flags) if (i + 1) % step == 0 and not flag]
