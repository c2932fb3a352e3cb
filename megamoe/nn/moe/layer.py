"""The MoE feed-forward layer: router → permute → exchange → experts → combine → unpermute."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union, cast

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from megamoe.config.choices import RouterMode
from megamoe.config.schema import MoEConfig
from megamoe.nn.ffn import SwiGLU
from megamoe.nn.init import seeded_normal_
from megamoe.nn.moe.dispatcher import LocalExchange, Permutation, TokenExchange, expert_capacity, permute, unpermute
from megamoe.nn.moe.experts import ExpertBank
from megamoe.nn.moe.router import Routing, build_router, router_z_loss, select_experts, select_tokens, switch_aux_loss


class MoEAuxLossBackward(torch.autograd.Function):
    """Identity on the layer output whose backward also starts the gradient of an aux loss.

    ``apply(output, loss)`` returns ``output`` unchanged; in the backward pass ``loss`` receives
    gradient ``loss_scale`` (as if ``loss_scale · loss`` had been added to the training loss).
    Balancing losses thus reach the router without being returned, summed or sent to the last
    pipeline stage. Pipeline / gradient-accumulation code sets the scale (e.g.
    1 / num_microbatches) to match how the main loss is scaled.
    """

    loss_scale: float = 1.0

    @classmethod
    def set_loss_scale(cls, scale: float) -> None:
        cls.loss_scale = scale

    @classmethod
    @contextlib.contextmanager
    def scaled(cls, scale: float) -> Iterator[None]:
        """The scale for the backward passes run inside; the previous one comes back on exit."""
        previous, cls.loss_scale = cls.loss_scale, scale
        try:
            yield
        finally:
            cls.loss_scale = previous

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(loss)
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(loss, MoEAuxLossBackward.loss_scale)


@dataclass
class MoEStats:
    """What one forward routed, detached, for logging and the aux-free bias update."""

    tokens_per_expert: torch.Tensor  # int64 [num_experts], global expert ids, before drops
    aux_loss: torch.Tensor  # Switch loss (unscaled by its coefficient)
    z_loss: torch.Tensor  # router z-loss (unscaled)
    dropped: torch.Tensor  # int64: assignments dropped by the capacity limit (0 when dropless)
    unrouted: torch.Tensor  # int64: tokens left with no expert (all dropped, or taken by none under expert choice)


class MoELayer(nn.Module):
    """Yuan 2.0-M32's MoE FFN: out = Σ_e w_e · Expert_e(x) over the experts x is routed to (+ shared experts).

    ``moe.router_mode`` picks who chooses (:meth:`route`): each token its top-k experts (the
    paper's token choice) or each expert its top-c tokens (expert choice).

    ``exchange`` decides which experts this process holds (default: all of them). Balancing
    losses with a positive coefficient are attached to the output's backward through
    :class:`MoEAuxLossBackward`; ``last_stats`` holds the routing summary of the last forward.
    """

    expert_bias: Optional[torch.Tensor]  # a buffer: DeepSeek-V3's aux-loss-free routing bias, or None

    def __init__(self, hidden_size: int, moe: Union[DictConfig, MoEConfig], layer_index: int,
                 exchange: Optional[TokenExchange] = None) -> None:
        super().__init__()
        # a plain dataclass: cheap attribute reads in forward, and nothing torch.compile trips on
        if not isinstance(moe, MoEConfig):
            moe = MoEConfig(**cast(dict[str, Any], OmegaConf.to_container(moe, resolve=True)))
        self.moe = moe
        self.layer_index = layer_index
        self.exchange = exchange if exchange is not None else LocalExchange(moe.num_experts)
        self.router = build_router(moe, hidden_size)
        self.experts = ExpertBank(self.exchange.num_local_experts, self.exchange.first_expert, hidden_size,
                                  moe.ffn_hidden_size, moe.grouped_gemm)
        shared_ffn = moe.num_shared_experts * (moe.shared_expert_ffn_hidden_size or moe.ffn_hidden_size)
        self.shared_experts = SwiGLU(hidden_size, shared_ffn) if moe.num_shared_experts > 0 else None
        # Qwen1.5-MoE scales the shared experts per token by sigmoid(w · x)
        gated = moe.shared_expert_gate and self.shared_experts is not None
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if gated else None
        # persistent: the bias is training state and goes into checkpoints
        self.register_buffer("expert_bias", torch.zeros(moe.num_experts) if moe.aux_free_bias else None)
        self.last_stats: Optional[MoEStats] = None

    def reset_parameters(self, std: float, seed: int) -> None:
        for name, param in self.router.named_parameters():
            seeded_normal_(param, std, seed, self.layer_index, f"router.{name}")
        self.experts.reset_parameters(std, seed, self.layer_index)
        if self.shared_experts is not None:
            self.shared_experts.reset_parameters(std, seed, self.layer_index, "shared_experts")
        if self.shared_expert_gate is not None:
            seeded_normal_(self.shared_expert_gate.weight, std, seed, self.layer_index, "shared_expert_gate.weight")
        if self.expert_bias is not None:
            self.expert_bias.zero_()

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert: torch.Tensor) -> None:
        """DeepSeek-V3's aux-loss-free step: b_e += rate · sign(mean load − load_e).

        Call once per optimizer step with the GLOBAL counts (summed over micro-batches and
        data-parallel ranks) so every replica moves its bias identically.
        """
        assert self.expert_bias is not None, "moe.aux_free_bias is off"
        load = tokens_per_expert.to(self.expert_bias.device, torch.float32)
        self.expert_bias += self.moe.aux_free_bias_update_rate * torch.sign(load.mean() - load)

    def route(self, tokens: torch.Tensor) -> tuple[Routing, Optional[int]]:
        """The routing of ``tokens`` [T, H] (this rank's micro-batch) and the capacity permute must enforce.

        Both modes size an expert by ``expert_capacity``: factor · T · k / N. Token choice drops
        assignments above it only when ``moe.capacity_factor`` is set. Expert choice takes exactly
        that many tokens per expert (a null factor counts as 1: on average k experts per token,
        token choice's compute; Zhou et al.'s capacity factor is k · factor), so permute has
        nothing left to drop.
        """
        moe, num_tokens = self.moe, tokens.shape[0]
        logits = self.router(tokens)
        if moe.router_mode == RouterMode.EXPERT_CHOICE:
            factor = 1.0 if moe.capacity_factor is None else moe.capacity_factor
            return select_tokens(logits, expert_capacity(num_tokens, moe.top_k, moe.num_experts, factor)), None
        routing = select_experts(logits, moe.top_k, moe.router_order, moe.norm_topk_prob, self.expert_bias)
        if moe.capacity_factor is None:
            return routing, None
        return routing, expert_capacity(num_tokens, moe.top_k, moe.num_experts, moe.capacity_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        routing, capacity = self.route(tokens)
        sorted_tokens, permutation = permute(tokens, routing, capacity)
        local_tokens, local_counts = self.exchange.dispatch(sorted_tokens, permutation.tokens_per_expert)
        expert_output = self.exchange.combine(self.experts(local_tokens, local_counts))
        out = unpermute(expert_output, permutation, tokens.shape[0])
        if self.shared_experts is not None:
            shared = self.shared_experts(tokens)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(tokens)) * shared
            out = out + shared

        aux_loss, z_loss = switch_aux_loss(routing), router_z_loss(routing.logits)
        if torch.is_grad_enabled():
            for coeff, loss in ((self.moe.aux_loss_coeff, aux_loss), (self.moe.z_loss_coeff, z_loss)):
                if coeff > 0:
                    out = MoEAuxLossBackward.apply(out, coeff * loss)
        self.last_stats = MoEStats(routing.tokens_per_expert.detach(), aux_loss.detach(), z_loss.detach(),
                                   permutation.dropped.detach(), self._unrouted(permutation, tokens.shape[0]))
        return out.view(x.shape)

    def _unrouted(self, permutation: Permutation, num_tokens: int) -> torch.Tensor:
        """Tokens that reach no expert: none under dropless token choice; else those no kept
        assignment names (marked without a host sync, unlike a bincount or unique)."""
        if self.moe.capacity_factor is None and self.moe.router_mode == RouterMode.TOKEN_CHOICE:
            return permutation.dropped.new_zeros(())
        reached = torch.zeros(num_tokens, dtype=torch.bool, device=permutation.source_token.device)
        return (~reached.index_fill_(0, permutation.source_token, True)).sum()
