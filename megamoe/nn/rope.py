"""Rotary position embedding on the first ``rotary_dim`` dims of each head (NeoX rotate-half).

Yuan 2.0-M32 rotates 128 of each head's 256 dims (``rotary_percent`` 0.5), base 10000 in
pretraining. Positions come in as ``position_ids`` [b, s] so they can restart after each
end-of-document token (Megatron's ``--reset-position-ids``). cos/sin are built in fp32 from
the positions on every call: there is no cached buffer, so a model built on the meta device
needs nothing re-materialised.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Maps position ids [b, s] to (cos, sin), each [b, 1, s, rotary_dim] in fp32."""

    def __init__(self, rotary_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
        self.rotary_dim = rotary_dim
        self.base = base

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=position_ids.device)
        inv_freq = self.base ** (-half / self.rotary_dim)  # [rotary_dim / 2]
        angles = position_ids.float()[..., None] * inv_freq  # [b, s, rotary_dim / 2]
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # both halves share a frequency
        return angles.cos(), angles.sin()

    def extra_repr(self) -> str:
        return f"rotary_dim={self.rotary_dim}, base={self.base}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) → (-x2, x1) on the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x [b, heads, s, head_dim]; the rest pass through.

    cos/sin are fp32, so type promotion runs the rotation in (at least) fp32; the result is
    cast back to x's dtype.
    """
    rotary_dim = cos.shape[-1]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    rot = rot * cos + rotate_half(rot) * sin
    return torch.cat([rot.to(x.dtype), rest], dim=-1)
