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
  combine weights that sum to 1 (``topk_softmax``, or ``softmax_topk`` with
  ``norm_topk_prob``), the upcycled model at step 0 computes what the dense model computes,
  Σ_copies w·G·Σ_g slice_g(x) = FFN(x), for any G. With G = 1 the experts are exact copies.

Everything else (embedding, attention, norms, head) is passed through unchanged. The
conversion streams: each dense FFN tensor is turned into its experts and dropped.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from megamoe.checkpoint.names import expert_tensor_name, split_layer_name
from megamoe.config import ConfigError
from megamoe.nn.moe.dispatcher import LocalExchange
from megamoe.nn.moe.layer import MoELayer

Tensors = Iterable[tuple[str, torch.Tensor]]
DENSE_FFN = {"mlp.w1.weight": "w1", "mlp.w2.weight": "w2"}  # a dense layer's SwiGLU, after ``layers.{i}.``


def upcycled_config(dense_cfg: DictConfig, copies: int, granularity: int = 1, top_k: int = 2) -> DictConfig:
    """The MoE config of the upcycled model: ``dense_cfg`` with N·G experts of width F/G, top-K·G."""
    m = dense_cfg.model
    if m.ffn_type != "dense":
        raise ConfigError(f"model.ffn_type: the source checkpoint is '{m.ffn_type}', upcycling needs a dense one")
    if dense_cfg.moe.num_shared_experts > 0:
        raise ConfigError("moe.num_shared_experts: upcycling builds routed experts only; set it to 0")
    for flag, value in (("--num-experts", copies), ("--granularity", granularity), ("--top-k", top_k)):
        if value < 1:
            raise ConfigError(f"{flag}: {value} must be >= 1")
    if m.dense_ffn_hidden_size % granularity:
        raise ConfigError(f"--granularity: {granularity} does not divide the dense FFN width "
                          f"model.dense_ffn_hidden_size={m.dense_ffn_hidden_size}")
    if top_k > copies:
        raise ConfigError(f"--top-k: {top_k} is more than the {copies} copies of the dense FFN (--num-experts)")
    return OmegaConf.merge(dense_cfg, {  # type: ignore[return-value]
        "model": {"ffn_type": "moe"},
        "moe": {"num_experts": copies * granularity, "ffn_hidden_size": m.dense_ffn_hidden_size // granularity,
                "top_k": top_k * granularity},
    })


def fresh_router(cfg: DictConfig, layer_index: int, seed: int, granularity: int) -> dict[str, torch.Tensor]:
    """Layer ``layer_index``'s router (and expert bias, if any) for N = E / G experts, rows repeated G times.

    Built by a MoELayer that holds none of the experts, so its ``reset_parameters`` draws the
    router exactly as a from-scratch model with N experts would.
    """
    copies = cfg.moe.num_experts // granularity
    moe = OmegaConf.merge(cfg.moe, {"num_experts": copies})
    layer = MoELayer(cfg.model.hidden_size, moe, layer_index, exchange=LocalExchange(0))
    layer.reset_parameters(cfg.model.init_std, seed)
    return {f"layers.{layer_index}.mlp.{name}": tensor.repeat_interleave(granularity, dim=0)
            for name, tensor in layer.state_dict().items() if not name.startswith("experts.")}


def upcycle(tensors: Tensors, cfg: DictConfig, granularity: int, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """A dense checkpoint's (name, tensor) stream → the upcycled MoE's, for ``cfg`` from :func:`upcycled_config`."""
    num_experts, width = cfg.moe.num_experts, cfg.moe.ffn_hidden_size
    for name, tensor in tensors:
        layer = split_layer_name(name)
        if layer is None or layer[1] not in DENSE_FFN:
            yield name, tensor
            continue
        i, which = layer[0], DENSE_FFN[layer[1]]
        if which == "w1":
            yield from fresh_router(cfg, i, seed, granularity).items()
            gate, up = tensor.chunk(2)
            slices = [torch.cat([gate[g * width:(g + 1) * width], up[g * width:(g + 1) * width]])
                      for g in range(granularity)]
        else:
            slices = [tensor[:, g * width:(g + 1) * width] * granularity for g in range(granularity)]
        bank = f"layers.{i}.mlp.experts.{which}"
        for expert in range(num_experts):
            yield expert_tensor_name(bank, expert), slices[expert % granularity].clone()
