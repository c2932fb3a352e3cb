"""Global tensor names: what a checkpoint calls each tensor, whatever the (dp, pp, ep) layout.

A model's names are its single-process module names (``embed.weight``,
``layers.3.attn.q_proj.weight``, …: megamoe.nn.decoder), except that each expert bank — a
parameter of an :class:`~megamoe.nn.moe.experts.ExpertBank`, whose dim 0 is the local expert —
is stored one tensor per *global* expert: ``layers.3.mlp.experts.w1`` [n, 2F, H] becomes
``layers.3.mlp.experts.{e}.w1`` [2F, H]. Which parameters are banks is decided by the module
type, not by their names.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
from omegaconf import DictConfig
from torch import nn

from megamoe.nn.moe.experts import ExpertBank

_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def split_layer_name(name: str) -> Optional[tuple[int, str]]:
    """``layers.3.attn.q_proj.weight`` → (3, "attn.q_proj.weight"); None outside the layers."""
    match = _LAYER.fullmatch(name)
    return (int(match[1]), match[2]) if match else None


def expert_tensor_name(bank_name: str, expert: int) -> str:
    """``layers.3.mlp.experts.w1`` (a bank parameter) → ``layers.3.mlp.experts.{expert}.w1``."""
    prefix, _, weight = bank_name.rpartition(".")
    return f"{prefix}.{expert}.{weight}"


def expert_bank_names(model: nn.Module) -> set[str]:
    """Names (in ``model``'s state dict) of the parameters that are expert banks."""
    return {f"{prefix}.{name}" for prefix, module in model.named_modules() if isinstance(module, ExpertBank)
            for name, _ in module.named_parameters(recurse=False)}


def model_tensor_shapes(cfg: DictConfig) -> dict[str, torch.Size]:
    """Every tensor a model checkpoint of ``cfg`` holds, with its shape (built on the meta device)."""
    from megamoe.models import build_stage  # the model is only needed to enumerate its names

    with torch.device("meta"):
        model = build_stage(cfg)
    banks = expert_bank_names(model)
    shapes: dict[str, torch.Size] = {}
    for name, tensor in model.state_dict().items():
        if name in banks:
            shapes.update({expert_tensor_name(name, e): tensor.shape[1:] for e in range(tensor.shape[0])})
        else:
            shapes[name] = tensor.shape
    return shapes
