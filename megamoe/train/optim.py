"""AdamW with Megatron's weight-decay rule, on the fastest kernel the machine has.

Decoupled weight decay pulls weights towards zero; on gains (norm weights) and biases that only
shifts the function, so — as in Megatron and GPT-style training — every parameter with fewer
than two dimensions is left undecayed. Embeddings are matrices but their rows are only trained
by the tokens that occur, so decaying them is a choice (``train.decay_embeddings``; Megatron
decays them).
"""

from __future__ import annotations

from typing import Collection

import torch
from omegaconf import DictConfig
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool,
                 embeddings: Collection[nn.Parameter] = ()) -> list[dict]:
    """Two AdamW groups, always in this order: ``decay`` and ``no_decay`` (either may be empty).

    ``embeddings`` are the vocabulary matrices (what a stage model's ``embedding_parameters()``
    declares; known by identity, not by name). A fixed group layout keeps optimizer state dicts
    comparable across pipeline stages.
    """
    embedding_ids = {id(p) for p in embeddings}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or (id(p) in embedding_ids and not decay_embeddings)
        (no_decay if skip else decay).append(p)
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


def _apex_fused_adam() -> type | None:
    """NVIDIA apex's FusedAdam when apex is installed (NGC images); never a dependency."""
    try:
        from apex.optimizers import FusedAdam
    except ImportError:  # no apex, PyPI's unrelated "apex" package, or apex without its CUDA extensions
        return None
    return FusedAdam


def build_optimizer(model: nn.Module, train_cfg: DictConfig,
                    embeddings: Collection[nn.Parameter] = ()) -> torch.optim.Optimizer:
    """AdamW(β1, β2, eps) over :func:`param_groups`; the loop sets the lr of every step.

    On CUDA: apex FusedAdam (AdamW mode) if importable, else torch's fused AdamW. On CPU:
    torch's fused AdamW too — elementwise, so bit-identical run to run and across layouts, and
    ~6× faster than the for-loop version on the MoE's many expert parameters.
    """
    groups = param_groups(model, train_cfg.weight_decay, train_cfg.decay_embeddings, embeddings)
    kwargs = {"lr": train_cfg.lr, "betas": (train_cfg.beta1, train_cfg.beta2), "eps": train_cfg.eps}
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    fused_adam = _apex_fused_adam() if on_cuda else None
    if fused_adam is not None:
        return fused_adam(groups, adam_w_mode=True, **kwargs)
    return torch.optim.AdamW(groups, fused=True, **kwargs)
