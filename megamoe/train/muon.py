"""Muon: momentum whose update for each weight matrix is orthogonalised by Newton–Schulz iterations.

Jordan et al. (2024) introduced it for the hidden matrices of a network; Moonshot's "Muon is
Scalable for LLM Training" (Liu et al., 2025) scaled it to a 16B-total MoE (Moonlight) by adding
decoupled weight decay and an update scale that matches AdamW's update RMS. For a matrix W
(A × B) with gradient G and momentum buffer M, one step is

    M ← μ·M + (1 − μ)·G                          (an average of the gradients)
    U ← (1 − μ)·G + μ·M   with Nesterov, else M
    O ← NS(U)                                    (≈ the orthogonal factor P·Qᵀ of U = P·Σ·Qᵀ)
    W ← W·(1 − lr·λ) − lr·s(A, B)·O

NS first divides U by its Frobenius norm (so the scale of M does not matter: Moonlight's
M ← μ·M + G gives the same O), then runs quintic Newton–Schulz iterations X ← aX + (bA + cA²)X,
A = XXᵀ, whose coefficients (3.4445, −4.7750, 2.0315) push every singular value into roughly
[0.7, 1.2] in 5 steps instead of to exactly 1 in many. An orthogonal A × B matrix has RMS
1/√max(A, B); ``match_rms_adamw`` scales it by s = 0.2·√max(A, B) to an RMS of 0.2, about
AdamW's, so AdamW's learning rate and weight decay carry over (Moonlight's finding).

What a "matrix" is: a Linear weight as it is; a convolution [out, in, k] as [out, in·k]; an
expert bank [E, A, B] as its E matrices; a SwiGLU ``w1`` that stacks the gate above the up
projection as those two. Matrices of one shape are orthogonalised as one batch (``torch.bmm``:
no Python loop over experts or layers), in bf16 on CUDA and in the parameters' own dtype
elsewhere (CPU bf16 matmuls are slow and would only add noise to a CPU run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence, TypeVar

import torch
from torch import Tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7  # floor of the Frobenius norm U is divided by (a zero update stays zero)
# Elements of one Newton–Schulz batch: bounds the transient memory of the stacked copies (256 MiB in bf16).
BATCH_ELEMENTS = 1 << 27

ADJUST_LR = {  # train.muon.adjust_lr → the update's scale for an A × B matrix
    "match_rms_adamw": lambda rows, cols: 0.2 * math.sqrt(max(rows, cols)),  # Moonlight: AdamW's lr carries over
    "original": lambda rows, cols: math.sqrt(max(1.0, rows / cols)),  # Keller Jordan's, for a Muon-tuned lr
    "none": lambda rows, cols: 1.0,
}


@dataclass(frozen=True)
class Matrices:
    """How Muon sees one parameter: ``count`` matrices of ``rows × cols`` (a reshape of it)."""

    count: int
    rows: int
    cols: int

    @classmethod
    def of(cls, param: Tensor, bank: bool, stacked: int = 1) -> "Matrices":
        """``param`` [E, A, …] if it is an expert ``bank`` (one matrix per expert), else [A, …]; the
        trailing dims flatten into the columns; ``stacked`` matrices sit on top of each other in A."""
        lead = param.shape[0] if bank else 1
        rows = param.shape[1 if bank else 0]
        return cls(lead * stacked, rows // stacked, param[0].numel() // rows if bank else param.numel() // rows)

    def view(self, tensor: Tensor) -> Tensor:
        return tensor.reshape(self.count, self.rows, self.cols)

    def scale(self, adjust_lr: str) -> float:
        return ADJUST_LR[adjust_lr](self.rows, self.cols)


def orthogonalize(update: Tensor, steps: int) -> Tensor:
    """Newton–Schulz of each matrix of ``update`` [n, A, B], in its dtype: ≈ P·Qᵀ for each P·Σ·Qᵀ."""
    a, b, c = NS_COEFFICIENTS
    wide = update.shape[-2] <= update.shape[-1]
    x = update if wide else update.mT  # iterate on the A × A Gram matrix of the shorter side
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=NS_EPS)
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x if wide else x.mT


def newton_schulz_dtype(param: Tensor) -> torch.dtype:
    """bf16 on CUDA (Moonlight's and Keller Jordan's choice: the iteration tolerates it), else the parameter's."""
    return torch.bfloat16 if param.is_cuda else param.dtype


ParamT = TypeVar("ParamT", bound=Tensor)


def shape_batches(params: Iterable[ParamT], matrices: Mapping[ParamT, Matrices],
                  budget: int = BATCH_ELEMENTS) -> list[list[ParamT]]:
    """``params`` in batches whose matrices share one shape, each within ``budget`` elements (a larger
    parameter is a batch of its own), in a fixed order: a run and its resumed copy batch alike."""
    by_shape: dict[tuple[int, int], list[list[ParamT]]] = {}
    filled: dict[tuple[int, int], int] = {}  # elements in each shape's last batch
    for param in params:
        shape = (matrices[param].rows, matrices[param].cols)
        batches = by_shape.setdefault(shape, [[]])
        if batches[-1] and filled[shape] + param.numel() > budget:
            batches.append([])
            filled[shape] = 0
        batches[-1].append(param)
        filled[shape] = filled.get(shape, 0) + param.numel()
    return [batch for batches in by_shape.values() for batch in batches]


def muon_(params: Sequence[Tensor], buffers: list[Tensor], matrices: list[Matrices], *, lr: float, weight_decay: float,
          momentum: float, nesterov: bool, ns_steps: int, adjust_lr: str) -> None:
    """One Muon step of ``params`` (gradients in ``.grad``; all of one matrix shape, one Newton–Schulz
    batch) with their momentum ``buffers`` (updated in place, in the parameters' dtype)."""
    updates = []
    for param, buffer, m in zip(params, buffers, matrices):
        grad = param.grad
        assert grad is not None, "muon_ steps parameters that have gradients"
        buffer.lerp_(grad, 1 - momentum)
        update = grad.lerp(buffer, momentum) if nesterov else buffer
        updates.append(m.view(update).to(newton_schulz_dtype(param)))
    orthogonal = orthogonalize(torch.cat(updates), ns_steps).split([m.count for m in matrices])
    for param, o, m in zip(params, orthogonal, matrices):
        param.mul_(1 - lr * weight_decay)
        param.add_(o.reshape(param.shape), alpha=-lr * m.scale(adjust_lr))


def newton_schulz_flops(matrices: Iterable[Matrices], steps: int) -> int:
    """Matmul FLOPs of orthogonalising each of ``matrices`` once: per iteration on an A × B matrix
    (A ≤ B after orienting it) XXᵀ costs 2A²B, the Gram polynomial 2A³, its product with X 2A²B."""
    total = 0
    for m in matrices:
        short, long = sorted((m.rows, m.cols))
        total += m.count * steps * (4 * short * short * long + 2 * short**3)
    return total
