"""Models as checkpoints see them, for the tests of every family: random weights, the global
(name, tensor) stream of a single-process model, the way back, and a stream that records what
its consumer holds."""

from __future__ import annotations

import re
import weakref
from typing import Iterable, Iterator

import torch
from omegaconf import DictConfig

from megamoe.checkpoint.names import expert_bank_names, expert_tensor_name
from megamoe.models import build_stage
from megamoe.nn.decoder import Decoder

_EXPERT = re.compile(r"(.+\.mlp\.experts)\.(\d+)\.(w1|w2)")


def random_model(cfg: DictConfig, seed: int = 0) -> Decoder:
    """A model with every parameter random (norm weights ≠ 1, biases ≠ 0): a swapped tensor shows."""
    torch.manual_seed(seed)
    model = build_stage(cfg)
    model.reset_parameters(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def model_tensors(model: Decoder) -> Iterator[tuple[str, torch.Tensor]]:
    """A single-process model's tensors under the checkpoint's global names (banks split per expert)."""
    banks = expert_bank_names(model)
    for name, tensor in model.state_dict().items():
        if name in banks:
            yield from ((expert_tensor_name(name, e), tensor[e]) for e in range(tensor.shape[0]))
        else:
            yield name, tensor


def load_model(cfg: DictConfig, tensors: Iterable[tuple[str, torch.Tensor]]) -> Decoder:
    """The inverse of :func:`model_tensors`: stack per-expert tensors back into banks, load strictly."""
    state: dict[str, torch.Tensor] = {}
    banks: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in tensors:
        if match := _EXPERT.fullmatch(name):
            banks.setdefault(f"{match[1]}.{match[3]}", {})[int(match[2])] = tensor
        else:
            state[name] = tensor
    state.update({bank: torch.stack([experts[e] for e in sorted(experts)]) for bank, experts in banks.items()})
    model = build_stage(cfg)
    model.load_state_dict(state, strict=True)
    return model.eval()


class Tracker:
    """Hands out fresh copies of a stream and records what the consumer still holds at each pull."""

    def __init__(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.tensors, self.alive = tensors, weakref.WeakSet()
        self.peak_count = self.peak_bytes = 0

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.tensors:
            self.peak_count = max(self.peak_count, len(self.alive))
            self.peak_bytes = max(self.peak_bytes, sum(t.numel() * t.element_size() for t in self.alive))
            copy = tensor.clone()
            self.alive.add(copy)
            yield name, copy
            del copy
