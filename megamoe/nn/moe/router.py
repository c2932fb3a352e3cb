"""Routers: per-token expert logits, the routing decision and the load-balancing losses.

A router maps each token to logits over the N experts. Selection and the balancing losses are
shared by both routers. Selection comes in two modes (``moe.router_mode``): token choice, where
each token picks its top-k experts (:func:`select_experts`, the paper's), and expert choice,
where each expert picks its top-c tokens (:func:`select_tokens`, Zhou et al., 2022). Both give
a :class:`Routing`: a set of (token, expert, weight) assignments. Everything here runs in (at
least) fp32 with autocast off, as in Yuan's training (``--use-fp32-router``): top-k decisions on
bf16 logits would flip on rounding noise.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.config.choices import Router, RouterOrder
from megamoe.config.schema import MoEConfig


def router_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32, or the input's dtype when it is wider (float64 gradchecks)."""
    return torch.promote_types(x.dtype, torch.float32)


@contextlib.contextmanager
def full_precision(x: torch.Tensor) -> Iterator[None]:
    """Disable autocast on ``x``'s device so router math stays in fp32 inside a bf16 model."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        yield


class AttentionRouter(nn.Module):
    """Yuan 2.0-M32's Attention Router: experts attend to each other before being scored.

    Per token, q = W_q x, k = W_k x, v = W_v x ∈ R^N. Each expert is a position with a 1-dim
    head: A = q kᵀ (N×N, no scaling), P = softmax(A) over the key experts, logits = P v.
    The N×N attention per token is computed by ``scaled_dot_product_attention`` over a batch of
    T sequences of length N: its fused kernels never materialise the [T, N, N] scores, which
    makes the router about 3× cheaper than the literal outer-product version on CPU.
    """

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.query = nn.Linear(hidden_size, num_experts, bias=False)
        self.key = nn.Linear(hidden_size, num_experts, bias=False)
        self.value = nn.Linear(hidden_size, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] → logits [T, N] in fp32."""
        dtype = router_dtype(x)
        with full_precision(x):
            qkv_weight = torch.cat([self.query.weight, self.key.weight, self.value.weight]).to(dtype)
            qkv = F.linear(x.to(dtype), qkv_weight)  # one GEMM for the three maps
            q, k, v = qkv.view(-1, 3, self.num_experts, 1).split(1, dim=1)  # each [T, 1, N, 1]
            logits = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        return logits.reshape(-1, self.num_experts)


class LinearRouter(nn.Module):
    """The classical router: logits = W x; with ``noisy`` the noisy top-k gating of Shazeer et
    al. (2017), logits + ε · softplus(W_noise x) with ε ~ N(0, 1), in training mode only."""

    def __init__(self, hidden_size: int, num_experts: int, noisy: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.noise = nn.Linear(hidden_size, num_experts, bias=False) if noisy else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] → logits [T, N] in fp32."""
        dtype = router_dtype(x)
        with full_precision(x):
            x = x.to(dtype)
            logits = F.linear(x, self.weight.to(dtype))
            if self.noise is not None and self.training:
                noise_std = F.softplus(F.linear(x, self.noise.weight.to(dtype)))
                logits = logits + torch.randn_like(logits) * noise_std
        return logits


def build_router(moe: MoEConfig, hidden_size: int) -> nn.Module:
    """The router named by ``moe.router`` ("attention" | "linear")."""
    if moe.router == Router.ATTENTION:
        return AttentionRouter(hidden_size, moe.num_experts)
    return LinearRouter(hidden_size, moe.num_experts, noisy=moe.noisy_gating)


@dataclass
class Routing:
    """One batch's routing decision: a set of (token, expert, weight) assignments.

    ``experts``, ``weights`` and ``tokens`` have one shape and list the assignments element by
    element. The dispatcher only flattens them, so a token may get any number of experts. Token
    choice lays them out [T, k] (row t: token t's choices, so ``tokens`` can be left out), expert
    choice [N, c] (row e: the tokens expert e took). Tensors are fp32 except the integer ones.
    """

    experts: torch.Tensor  # int64: each assignment's (global) expert id
    weights: torch.Tensor  # each assignment's combine weight
    probs: torch.Tensor  # [T, N]: softmax over all experts (what the aux loss balances)
    logits: torch.Tensor  # [T, N]
    tokens_per_expert: torch.Tensor  # int64 [N]: assignments per expert, before any drops
    tokens: Optional[torch.Tensor] = None  # int64: each assignment's token; None: the row ([T, k] layout)

    def __post_init__(self) -> None:
        if self.tokens is None:
            rows = torch.arange(self.experts.shape[0], device=self.experts.device)
            self.tokens = rows.unsqueeze(-1).expand_as(self.experts)


def select_experts(
    logits: torch.Tensor,
    top_k: int,
    order: str,
    norm_topk_prob: bool = True,
    expert_bias: Optional[torch.Tensor] = None,
) -> Routing:
    """Pick k experts per token and their combine weights.

    ``order="topk_softmax"`` (Megatron, vLLM, the paper): top-k of the logits, then a softmax
    over the k selected logits. ``order="softmax_topk"`` (Yuan's HF code): softmax over all N,
    top-k, divided by their sum when ``norm_topk_prob``. Selection ranks softmax(logits), which
    ranks like the logits; ``expert_bias`` (aux-loss-free balancing, DeepSeek-V3) is added to
    those probabilities for the choice only and never enters the weights.
    """
    probs = logits.softmax(dim=-1)
    scores = probs if expert_bias is None else probs + expert_bias.to(probs.dtype)
    experts = scores.topk(top_k, dim=-1).indices
    if order == RouterOrder.TOPK_SOFTMAX:
        weights = logits.gather(-1, experts).softmax(dim=-1)
    else:
        weights = probs.gather(-1, experts)
        if norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    tokens_per_expert = torch.bincount(experts.flatten(), minlength=logits.shape[-1])
    return Routing(experts, weights, probs, logits, tokens_per_expert)


def select_tokens(logits: torch.Tensor, capacity: int) -> Routing:
    """Expert choice (Zhou et al., 2022): each expert takes the ``capacity`` tokens that score it highest.

    Scores S = softmax over experts of the logits [T, N]. Expert e takes the c = min(capacity, T)
    largest entries of column e (ties: the lower token index first) and weights each token by
    its score. Every expert gets exactly c tokens, so the load is balanced by construction; a
    token gets anywhere from 0 experts (the residual alone carries it) to N.

    Not causal: the choice ranks all T tokens of the batch, so a token's experts depend on later
    tokens of its own sequence and on the other sequences. Training and evaluation on whole
    micro-batches see exactly this; token-by-token generation cannot reproduce it.
    """
    probs = logits.softmax(dim=-1)
    num_tokens, num_experts = probs.shape
    chosen = min(capacity, num_tokens)
    # A stable descending sort keeps tied tokens in index order (topk promises no order). Sorting
    # the detached scores and gathering the weights saves [N, c] indices for backward, not [N, T].
    ranked = probs.detach().t().argsort(dim=-1, descending=True, stable=True)
    tokens = ranked[:, :chosen].contiguous()
    weights = probs.t().gather(-1, tokens)
    experts = torch.arange(num_experts, device=logits.device).unsqueeze(-1).expand_as(tokens)
    tokens_per_expert = torch.full((num_experts,), chosen, dtype=torch.int64, device=logits.device)
    return Routing(experts, weights, probs, logits, tokens_per_expert, tokens)


def switch_aux_loss(routing: Routing) -> torch.Tensor:
    """Switch / GShard load-balancing loss N · Σ_e mean_t(prob_e) · count_e / (number of assignments).

    It is 1 when load and probability are uniform; gradients flow through the probabilities
    only (the counts are a non-differentiable selection). Token choice makes T·k assignments.
    Under expert choice every count is the same, so the loss is Σ_e mean_t(prob_e) = 1 with zero
    gradient: there is nothing left to balance.
    """
    num_experts = routing.probs.shape[-1]
    load = routing.tokens_per_expert.to(routing.probs.dtype) / routing.experts.numel()
    return num_experts * (routing.probs.mean(dim=0) * load).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss mean_t(logsumexp(logits)²): keeps logits small and softmax stable."""
    return torch.logsumexp(logits, dim=-1).square().mean()
