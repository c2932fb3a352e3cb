"""Sparse upcycling: an MoE checkpoint whose experts start as the FFN of a trained dense one.

Training an MoE from a dense checkpoint instead of from scratch is how Qwen1.5-MoE-A2.7B was
built from Qwen-1.8B (Komatsuzaki et al. 2022, "Sparse Upcycling"). Our convention, for a dense
SwiGLU FFN of width F, ``copies`` N, ``granularity`` G and ``top_k`` K:

- Fine-grained experts (Qwen1.5-MoE, DeepSeekMoE): the FFN's width is cut into G contiguous
  slices of F/G; slice g holds gate rows [g·F/G, (g+1)·F/G) and the same up rows of ``w1``,
  and the same columns of ``w2``. The MoE has E = N·G experts of width F/G; expert
  e = n·G + g is copy n of slice g.
- Each token picks K·G experts (``moe.top_k``), so it still runs K dense FFNs' worth of FLOPs.
- The router is fresh, drawn from the seed exactly as a from-scratch MoE would draw it, but
  for N experts, each row then repeated G times ("virtual groups", He et al. 2024, arXiv
  2410.07524, as in Megatron-Core's upcycling): the G slices of a copy score alike, so the top
  K·G are K whole copies. With ``w2`` scaled by G (exact: the FFN is linear in ``w2``) and
  combine weights that sum to 1, the upcycled model at step 0 computes what the dense model
  computes, Σ_copies w·G·Σ_g slice_g(x) = FFN(x), for any G. With G = 1 the experts are exact
  copies.
- Combine weights sum to 1 under ``topk_softmax``, and under ``softmax_topk`` only when they are
  renormalised: Qwen's un-renormalised top-k of a softmax sums to less than 1, by a different
  amount for every token. The upcycled model therefore sets ``moe.norm_topk_prob``; expert
  choice (``moe.router_mode``), which gives each token a varying number of experts, is refused.
- With a shared expert (``shared_expert``, Qwen1.5-MoE's layout): the shared expert is the dense
  FFN itself, behind a sigmoid gate whose weight starts at 0, so it adds sigmoid(0)·FFN(x) =
  FFN(x)/2; the routed experts' ``w2`` is scaled by G/2 instead of G, so they add the other
  half. From the first step on, the gate learns per token how much the shared expert keeps.

- ``layer_freq`` (``moe.layer_freq``, Megatron's meaning) picks the layers that become MoE; the
  others keep their dense FFN as it is (DeepSeek-style dense first layers, or every other layer).

Everything else (embedding, attention, norms, head) is passed through unchanged. The
conversion streams: each dense FFN tensor of a layer that becomes MoE is turned into its
experts and dropped.
"""

from __future__ import annotations

from typing import Iterable, Iterator, cast

import torch
from omegaconf import DictConfig, OmegaConf

from megamoe.checkpoint.names import expert_tensor_name, split_layer_name
from megamoe.config.choices import FfnType, RouterMode
from megamoe.config.layers import KEY, LayerFreq, moe_layer_flags
from megamoe.errors import ConfigError
from megamoe.nn.moe.dispatcher import LocalExchange
from megamoe.nn.moe.layer import MoELayer

Tensors = Iterable[tuple[str, torch.Tensor]]
DENSE_FFN = {"mlp.w1.weight": "w1", "mlp.w2.weight": "w2"}  # a dense layer's SwiGLU, after ``layers.{i}.``


def upcycled_config(dense_cfg: DictConfig, copies: int, granularity: int = 1, top_k: int = 2,
                    shared_expert: bool = False, layer_freq: LayerFreq | str = 1) -> DictConfig:
    """The MoE config of the upcycled model: ``dense_cfg`` with N·G experts of width F/G, top-K·G,
    renormalised combine weights, and a gated shared expert of width F when ``shared_expert``, in
    the layers ``layer_freq`` selects (``moe.layer_freq``; ConfigError names ``--layer-freq``)."""
    m = dense_cfg.model
    if m.ffn_type != FfnType.DENSE:
        raise ConfigError(f"model.ffn_type: the source checkpoint is '{m.ffn_type}', upcycling needs a dense one")
    if dense_cfg.moe.router_mode != RouterMode.TOKEN_CHOICE:
        raise ConfigError(f"moe.router_mode: '{dense_cfg.moe.router_mode}' gives each token a varying number of "
                          "experts, so the upcycled model could not start equal to the dense one; use token_choice")
    for flag, value in (("--num-experts", copies), ("--granularity", granularity), ("--top-k", top_k)):
        if value < 1:
            raise ConfigError(f"{flag}: {value} must be >= 1")
    if m.dense_ffn_hidden_size % granularity:
        raise ConfigError(f"--granularity: {granularity} does not divide the dense FFN width "
                          f"model.dense_ffn_hidden_size={m.dense_ffn_hidden_size}")
    if top_k > copies:
        raise ConfigError(f"--top-k: {top_k} is more than the {copies} copies of the dense FFN (--num-experts)")
    # merging into a DictConfig gives a DictConfig (OmegaConf types any merge as DictConfig | ListConfig)
    cfg = cast(DictConfig, OmegaConf.merge(dense_cfg, {
        "model": {"ffn_type": "moe"},
        "moe": {"num_experts": copies * granularity, "ffn_hidden_size": m.dense_ffn_hidden_size // granularity,
                "top_k": top_k * granularity, "norm_topk_prob": True, "num_shared_experts": int(shared_expert),
                "shared_expert_ffn_hidden_size": m.dense_ffn_hidden_size if shared_expert else 0,
                "shared_expert_gate": shared_expert, "layer_freq": layer_freq},
    }))
    try:
        moe_layer_flags(cfg.model, cfg.moe)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace(f"{KEY}:", "--layer-freq:", 1)) from None
    return cfg


def fresh_router(cfg: DictConfig, layer_index: int, seed: int, granularity: int) -> dict[str, torch.Tensor]:
    """Layer ``layer_index``'s router (and expert bias, if any) for N = E / G experts, rows repeated G times.

    Built by a MoELayer that holds none of the experts (nor a shared one), so its
    ``reset_parameters`` draws the router exactly as a from-scratch model with N experts would.
    """
    copies = cfg.moe.num_experts // granularity
    moe = cast(DictConfig, OmegaConf.merge(cfg.moe, {"num_experts": copies, "num_shared_experts": 0,
                                                     "shared_expert_gate": False}))
    layer = MoELayer(cfg.model.hidden_size, moe, layer_index, exchange=LocalExchange(0))
    layer.reset_parameters(cfg.model.init_std, seed)
    return {f"layers.{layer_index}.mlp.{name}": tensor.repeat_interleave(granularity, dim=0)
            for name, tensor in layer.state_dict().items() if not name.startswith("experts.")}


def upcycle(tensors: Tensors, cfg: DictConfig, granularity: int, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """A dense checkpoint's (name, tensor) stream → the upcycled MoE's, for ``cfg`` from :func:`upcycled_config`."""
    num_experts, width = cfg.moe.num_experts, cfg.moe.ffn_hidden_size
    shared = cfg.moe.num_shared_experts > 0
    routed_scale = granularity * (0.5 if shared else 1.0)  # the routed experts' share of the FFN, sliced G ways
    becomes_moe = moe_layer_flags(cfg.model, cfg.moe)
    for name, tensor in tensors:
        layer = split_layer_name(name)
        if layer is None or layer[1] not in DENSE_FFN or not becomes_moe[layer[0]]:
            yield name, tensor
            continue
        i, which = layer[0], DENSE_FFN[layer[1]]
        if which == "w1":
            yield from fresh_router(cfg, i, seed, granularity).items()
            gate, up = tensor.chunk(2)
            slices = [torch.cat([gate[g * width:(g + 1) * width], up[g * width:(g + 1) * width]])
                      for g in range(granularity)]
        else:
            slices = [tensor[:, g * width:(g + 1) * width] * routed_scale for g in range(granularity)]
        bank = f"layers.{i}.mlp.experts.{which}"
        for expert in range(num_experts):
            yield expert_tensor_name(bank, expert), slices[expert % granularity].clone()
        if shared:
            yield f"layers.{i}.mlp.shared_experts.{which}.weight", tensor
            if which == "w2":  # sigmoid(0) = 1/2: the shared expert starts with the other half
                yield f"layers.{i}.mlp.shared_expert_gate.weight", tensor.new_zeros(1, tensor.shape[0])
