"""Muon's math: Newton–Schulz against its definition, batched banks against single matrices, the
matrix views, the update scales, the shape batches, and one step against torch's own Muon."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from megamoe.train.muon import Matrices, muon_, newton_schulz_flops, orthogonalize, shape_batches

COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic, as Moonlight and torch use it


def reference_newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """One matrix, from the definition: X ← aX + (bA + cA²)X with A = XXᵀ, on the wide orientation,
    after dividing by the Frobenius norm."""
    a, b, c = COEFFICIENTS
    tall = g.shape[0] > g.shape[1]
    x = g.T if tall else g
    x = x / max(float(torch.linalg.matrix_norm(x)), 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (16, 16)])
def test_orthogonalize_matches_the_definition(shape: tuple[int, int]) -> None:
    g = torch.randn(3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = torch.stack([reference_newton_schulz(m) for m in g])
    torch.testing.assert_close(orthogonalize(g, 5), expected, rtol=1e-12, atol=1e-12)


def test_orthogonalize_approximates_the_polar_factor() -> None:
    """For U = P·Σ·Qᵀ the result is ≈ P·Qᵀ: singular values near 1 (in Keller Jordan's ~[0.7, 1.2]),
    singular vectors kept. A wrong coefficient or a missing normalisation breaks either."""
    g = torch.randn(1, 32, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    o = orthogonalize(g, 5)[0]
    values = torch.linalg.svdvals(o)
    assert 0.6 < float(values.min()) and float(values.max()) < 1.25, values
    p, _, qt = torch.linalg.svd(g[0], full_matrices=False)
    cosine = float((o * (p @ qt)).sum() / (o.norm() * (p @ qt).norm()))
    assert cosine > 0.98
    assert orthogonalize(torch.zeros(1, 4, 6), 5).abs().max() == 0  # a zero update stays zero


@pytest.mark.parametrize("shape", [(8, 24, 16), (8, 16, 24)])
def test_batched_bank_equals_each_matrix_alone(shape: tuple[int, int, int]) -> None:
    """An expert bank is one batch: each expert gets exactly what it would alone (so the result does
    not depend on how many experts a rank holds, or which other matrices share its batch)."""
    bank = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    alone = torch.cat([orthogonalize(bank[e:e + 1], 5) for e in range(shape[0])])
    assert torch.equal(orthogonalize(bank, 5), alone)


def test_bf16_iteration_stays_close_to_fp32() -> None:
    """What CUDA runs: the same iteration in bf16 (error ~1e-2 of entries of size ~1/√32)."""
    g = torch.randn(4, 32, 64, generator=torch.Generator().manual_seed(3))
    error = (orthogonalize(g.bfloat16(), 5).float() - orthogonalize(g, 5)).abs().max()
    assert float(error) < 0.03


def test_matrix_views() -> None:
    linear, conv, bank = torch.empty(64, 32), torch.empty(32, 64, 2), torch.empty(8, 256, 64)
    assert Matrices.of(linear, bank=False) == Matrices(1, 64, 32)
    assert Matrices.of(conv, bank=False) == Matrices(1, 32, 128)  # [out, in·kernel]
    assert Matrices.of(bank, bank=True, stacked=2) == Matrices(16, 128, 64)  # 8 experts × (gate, up)
    assert Matrices.of(torch.empty(256, 64), bank=False, stacked=2) == Matrices(2, 128, 64)  # a SwiGLU w1
    w1 = torch.arange(8 * 256 * 64.0).reshape(8, 256, 64)
    views = Matrices.of(w1, bank=True, stacked=2).view(w1)
    assert torch.equal(views[5], w1[2, 128:])  # expert 2's up projection


@pytest.mark.parametrize(("adjust_lr", "expected"), [("match_rms_adamw", 0.2), ("original", None), ("none", None)])
def test_update_scale(adjust_lr: str, expected: float | None) -> None:
    """Moonlight's scale gives an orthogonal A × B matrix an RMS of 0.2, whatever its shape."""
    for rows, cols in ((64, 16), (16, 64), (32, 32)):
        q = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), dtype=torch.float64))[0]
        q = q if rows >= cols else q.T
        scale = Matrices(1, rows, cols).scale(adjust_lr)
        rms = float((scale * q).pow(2).mean().sqrt())
        if adjust_lr == "match_rms_adamw":
            assert math.isclose(rms, expected, rel_tol=1e-9)
        else:
            assert scale == (math.sqrt(max(1.0, rows / cols)) if adjust_lr == "original" else 1.0)


def test_shape_batches_group_by_shape_within_the_budget() -> None:
    a, b, c, d = torch.empty(4, 8), torch.empty(8, 4), torch.empty(4, 8), torch.empty(2, 4, 8)
    matrices = {a: Matrices(1, 4, 8), b: Matrices(1, 8, 4), c: Matrices(1, 4, 8), d: Matrices(2, 4, 8)}
    batches = shape_batches([a, b, c, d], matrices)
    assert [[id(p) for p in batch] for batch in batches] == [[id(a), id(c), id(d)], [id(b)]]
    small = shape_batches([a, b, c, d], matrices, budget=64)
    assert [[id(p) for p in batch] for batch in small] == [[id(a), id(c)], [id(d)], [id(b)]]


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon is in torch >= 2.9")
@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_torch_muon_on_matrices(nesterov: bool) -> None:
    """torch's Muon (2-D only, Newton–Schulz always in bf16) against ours in fp32: the same updates up
    to bf16's rounding (~1.5% of the largest change); another scale rule or momentum rule is off by
    30% or more (the decay is checked exactly in tests/train/test_optim.py)."""
    torch.manual_seed(4)
    ours, theirs = nn.Linear(48, 24, bias=False), nn.Linear(48, 24, bias=False)
    theirs.load_state_dict(ours.state_dict())
    start = ours.weight.detach().clone()
    settings = {"lr": 0.01, "weight_decay": 0.1, "momentum": 0.95, "nesterov": nesterov}
    reference = torch.optim.Muon(theirs.parameters(), adjust_lr_fn="match_rms_adamw", **settings)
    buffer, matrices = torch.zeros_like(ours.weight), [Matrices.of(ours.weight, bank=False)]
    for _ in range(3):
        grad = torch.randn_like(start)
        ours.weight.grad, theirs.weight.grad = grad.clone(), grad.clone()
        with torch.no_grad():
            muon_([ours.weight], [buffer], matrices, ns_steps=5, adjust_lr="match_rms_adamw", **settings)
        reference.step()
    moved = (theirs.weight - start).detach()
    torch.testing.assert_close((ours.weight - start).detach(), moved, rtol=0, atol=0.04 * float(moved.abs().max()))
    torch.testing.assert_close(buffer, reference.state[theirs.weight]["momentum_buffer"], rtol=1e-6, atol=1e-7)


def test_newton_schulz_flops_count_the_matmuls() -> None:
    """One iteration on 4 × 8 (and on its transpose): XXᵀ 2·4·4·8, G² 2·4·4·4, (bG + cG²)X 2·4·4·8."""
    per_iteration = 2 * 4 * 4 * 8 + 2 * 4 * 4 * 4 + 2 * 4 * 4 * 8
    assert newton_schulz_flops([Matrices(3, 4, 8), Matrices(1, 8, 4)], steps=5) == 4 * 5 * per_iteration
