"""Rotary embedding against a per-pair 2-D rotation written from the definition."""

import math

import torch

from megamoe.nn.rope import RotaryEmbedding, apply_rotary


def reference_rotary(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, base: float) -> torch.Tensor:
    """Rotate pair (i, i + rotary_dim/2) of each head by angle p · base^(-2i/rotary_dim)."""
    out = x.double().clone()
    half = rotary_dim // 2
    b, h, s, _ = x.shape
    for bi in range(b):
        for si in range(s):
            p = float(positions[bi, si])
            for i in range(half):
                theta = p * base ** (-2.0 * i / rotary_dim)
                c, sn = math.cos(theta), math.sin(theta)
                a, bb = x[bi, :, si, i].double(), x[bi, :, si, i + half].double()
                out[bi, :, si, i] = a * c - bb * sn
                out[bi, :, si, i + half] = a * sn + bb * c
    return out


def test_matches_rotation_per_pair_and_leaves_other_dims() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 16)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [5, 9, 0, 1, 2, 300, 4000]])
    rope = RotaryEmbedding(rotary_dim=8, base=10000.0)
    y = apply_rotary(x, *rope(positions))
    torch.testing.assert_close(y.double(), reference_rotary(x, positions, 8, 10000.0), rtol=1e-5, atol=1e-5)
    assert torch.equal(y[..., 8:], x[..., 8:])


def test_scores_depend_only_on_relative_position() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 5, 32), torch.randn(1, 2, 5, 32)
    rope = RotaryEmbedding(rotary_dim=16, base=500.0)
    positions = torch.arange(5)[None]

    def scores(offset: int) -> torch.Tensor:
        cos, sin = rope(positions + offset)
        return apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).transpose(-1, -2)

    torch.testing.assert_close(scores(0), scores(37), rtol=1e-4, atol=1e-4)


def test_positions_restarting_after_eod_repeat_the_fresh_sequence() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 2, 6, 8)
    rope = RotaryEmbedding(rotary_dim=8)
    restarted = apply_rotary(x, *rope(torch.tensor([[0, 1, 2, 0, 1, 2]])))
    fresh = apply_rotary(x[:, :, 3:], *rope(torch.tensor([[0, 1, 2]])))
    torch.testing.assert_close(restarted[:, :, 3:], fresh)


def test_bf16_input_is_rotated_in_fp32_and_cast_back() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 1, 4, 8).bfloat16()
    cos, sin = RotaryEmbedding(rotary_dim=8)(torch.tensor([[0, 7, 100, 2000]]))
    assert cos.dtype == torch.float32
    y = apply_rotary(x, cos, sin)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), apply_rotary(x.float(), cos, sin).bfloat16().float())
