"""Next-token cross entropy: from logits, and from hidden states without a micro-batch's logits.

Yuan 2.0-M32's head maps hidden 2048 to a 135,040-token vocabulary. Over a 4096-token
micro-batch the plain loss holds the logits (bf16, 1.1 GB), the fp32 log-probabilities it
saves (2.2 GB) and, in the backward pass, their gradient (2.2 GB) — more than the last
stage's layers hold. :func:`chunked_lm_loss` takes the final-normed hidden states and the head
weight instead: it computes the logits a chunk of tokens at a time, keeps one fp32 scalar per
token (the log-sum-exp), and recomputes each chunk's logits in the backward pass. It returns the same loss and
gradients as :func:`lm_loss` on the logits.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megamoe.nn.casts import compute_dtype

IGNORE_INDEX = -100  # labels that take no part in the loss (F.cross_entropy's default)

# One chunk's fp32 logits stay within this budget: 496 tokens at M32's vocabulary, so the loss
# needs a few hundred MB beyond the head weight's gradient, while each chunk's matmul
# (496 × 2048 × 135,040) is still large enough to run at a GPU's full matmul rate. Smaller
# vocabularies get longer chunks (the tiny test model's 512 tokens: one chunk).
CHUNK_LOGITS_BYTES = 256 * 2**20


def masked_mean(losses: Tensor, loss_mask: Tensor) -> Tensor:
    """Mean of per-token ``losses`` over the positions where ``loss_mask`` is nonzero (0 if none)."""
    mask = loss_mask.flatten().float()
    return (losses.flatten() * mask).sum() / mask.sum().clamp_min(1.0)


def lm_loss(logits: Tensor, labels: Tensor, loss_mask: Tensor) -> Tensor:
    """Mean next-token cross entropy (fp32) of ``logits`` [..., V] (the reference, and for evaluation)."""
    losses = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), reduction="none")
    return masked_mean(losses, loss_mask)


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk: as many as keep one chunk's fp32 logits within :data:`CHUNK_LOGITS_BYTES`."""
    return max(1, CHUNK_LOGITS_BYTES // (4 * vocab_size))


def chunked_lm_loss(hidden: Tensor, weight: Tensor, labels: Tensor, loss_mask: Tensor,
                    chunk: Optional[int] = None) -> Tensor:
    """``lm_loss(F.linear(hidden, weight), labels, loss_mask)`` holding one chunk of logits at a time.

    hidden [..., H] (the final norm's output), weight [V, H]; ``chunk`` tokens per chunk
    (default :func:`chunk_tokens`). Under autocast the logits are in its dtype, as the plain
    path's, and the softmax statistics in fp32.
    """
    losses = ChunkedCrossEntropy.apply(hidden.flatten(0, -2), weight, labels.flatten(), compute_dtype(hidden),
                                       chunk or chunk_tokens(weight.shape[0]))
    return masked_mean(losses, loss_mask)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Per-token cross entropy of ``hidden @ weight.T`` (0 at IGNORE_INDEX), computed by chunks.

    Forward keeps, per token, only the fp32 log-sum-exp; backward recomputes each chunk's
    logits and forms (softmax − onehot) · dloss, from which it writes that chunk's rows of
    grad_hidden and adds to grad_weight (fp32). The weight's cast copy lives for one pass only,
    and each chunk's temporaries die with its helper call, before the next chunk's logits.
    Both passes run with autocast off: every dtype here is explicit, and a pipeline runs the
    backward inside the caller's autocast region, which would recast the fp32 math.
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, labels: Tensor, dtype: torch.dtype,
                chunk: int) -> Tensor:
        targets, ignored = _targets(labels)
        lse = torch.empty(labels.shape, dtype=torch.float32, device=hidden.device)
        losses = torch.empty_like(lse)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for rows in _chunks(len(labels), chunk):
                lse[rows], losses[rows] = _chunk_forward(hidden[rows].to(dtype), w, targets[rows])
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.dtype, ctx.chunk = dtype, chunk
        return losses.masked_fill_(ignored, 0.0)

    @staticmethod
    def backward(ctx: Any, grad_losses: Tensor) -> tuple[Optional[Tensor], ...]:
        hidden, weight, labels, lse = ctx.saved_tensors
        targets, ignored = _targets(labels)
        scale = grad_losses.float().masked_fill(ignored, 0.0)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(ctx.dtype)
            for rows in _chunks(len(labels), ctx.chunk):
                grad_hidden[rows] = _chunk_backward(hidden[rows].to(ctx.dtype), w, targets[rows], lse[rows],
                                                    scale[rows], grad_weight)
        return grad_hidden, grad_weight, None, None, None


def _chunk_forward(h: Tensor, w: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """One chunk's fp32 log-sum-exp and loss (log-sum-exp − target logit), per token."""
    logits = F.linear(h, w).float()
    lse = torch.logsumexp(logits, dim=-1)
    return lse, lse - logits.gather(1, targets[:, None]).squeeze(1)


def _chunk_backward(h: Tensor, w: Tensor, targets: Tensor, lse: Tensor, scale: Tensor,
                    grad_weight: Tensor) -> Tensor:
    """One chunk: add its part of grad_weight; return its rows of grad_hidden."""
    probs = F.linear(h, w).float().sub_(lse[:, None]).exp_()  # softmax, from the saved log-sum-exp
    probs[torch.arange(len(h), device=h.device), targets] -= 1.0
    grad_logits = probs.mul_(scale[:, None]).to(h.dtype)
    _add_matmul_(grad_weight, grad_logits.t(), h)
    return grad_logits @ w


def _targets(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(labels with ignored positions pointing at token 0, the ignored positions)."""
    ignored = labels == IGNORE_INDEX
    return labels.masked_fill(ignored, 0), ignored


def _chunks(n: int, chunk: int) -> list[slice]:
    return [slice(start, min(start + chunk, n)) for start in range(0, n, chunk)]


def _add_matmul_(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out += a @ b, in place when the dtypes agree; else through one product in a's dtype
    (bf16 chunks into the fp32 gradient: torch has no in-place mixed-dtype addmm)."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out += a @ b
