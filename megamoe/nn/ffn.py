"""The SwiGLU feed-forward block: the dense FFN option and, batched, every MoE expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.nn.init import seeded_normal_


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) ⊙ up, where ``gate_up`` = [gate | up] along the last dim (Yuan's w1 layout)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    """out = w2(silu(gate) ⊙ up) with [gate | up] = w1(x); no biases, as in Yuan 2.0.

    ``w1`` stacks the gate rows [0:ffn] above the up rows [ffn:], the layout of the Yuan
    Hugging Face ``w1`` and of Megatron's fused fc1, so checkpoints convert by copying.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden_size, 2 * ffn_hidden_size, bias=False)
        self.w2 = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x)))

    def reset_parameters(self, std: float, *key: object) -> None:
        """Initialise from ``key`` (the block's global identity) so any model split agrees."""
        seeded_normal_(self.w1.weight, std, *key, "w1.weight")
        seeded_normal_(self.w2.weight, std, *key, "w2.weight")
