"""The optimizer: AdamW with Megatron's weight-decay rule, or Muon for the hidden matrices with AdamW
for the rest; optimizer state in fp32 or bf16, on the fastest kernel the machine has.

Decoupled weight decay pulls weights towards zero; on gains (norm weights) and biases that only
shifts the function, so — as in Megatron and GPT-style training — every parameter with fewer
than two dimensions is left undecayed. Embeddings are matrices but their rows are only trained
by the tokens that occur, so decaying them is a choice (``train.decay_embeddings``; Megatron
decays them).

``train.optimizer=muon`` (megamoe.train.muon) updates every other matrix — attention projections,
LFA convolutions, router, shared / dense FFN, each expert's matrices — with Muon, and the
embeddings, output head, norms and biases with AdamW, in the same step (Moonlight's split).
``train.optimizer_state_dtype=bf16`` keeps AdamW's moments and Muon's momentum in bf16 while the
weights stay fp32 (Megatron-Core's precision-aware optimizer): each update reads the state into
the weights' dtype, computes there, and rounds the new state back.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Collection, Iterator, Optional, overload

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from megamoe.config.choices import Optimizer
from megamoe.nn.ffn import SwiGLU
from megamoe.nn.moe.experts import ExpertBank, expert_parameters
from megamoe.train.muon import Matrices, muon_, shape_batches

STATE_DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # None: the weights' own dtype
# Elements AdamW updates at a time: its fp32 temporaries (the moments read from bf16, the
# denominator) stay at 64 MiB each, not the size of the largest parameter (M32's embedding: 1 GiB).
ELEMENTWISE_CHUNK = 1 << 24


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool,
                 embeddings: Collection[nn.Parameter] = (), exclude: Collection[nn.Parameter] = ()) -> list[dict]:
    """Two AdamW groups, always in this order: ``decay`` and ``no_decay`` (either may be empty).

    ``embeddings`` are the vocabulary matrices (what a stage model's ``embedding_parameters()``
    declares; known by identity, not by name); ``exclude``d parameters are another optimizer's
    (Muon's). A fixed group layout keeps optimizer state dicts comparable across pipeline stages.
    """
    embedding_ids, excluded = {id(p) for p in embeddings}, {id(p) for p in exclude}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if not p.requires_grad or id(p) in excluded:
            continue
        skip = p.ndim < 2 or (id(p) in embedding_ids and not decay_embeddings)
        (no_decay if skip else decay).append(p)
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


def muon_matrices(model: nn.Module, embeddings: Collection[nn.Parameter] = ()) -> dict[nn.Parameter, Matrices]:
    """Muon's parameters and the matrices each holds: every trainable parameter of two or more
    dimensions but the vocabulary matrices. Expert banks (found by module type, as for the
    gradient sync) hold one matrix per expert; a SwiGLU ``w1`` stacks gate and up, two matrices."""
    embedding_ids = {id(p) for p in embeddings}
    banks = {id(p) for p in expert_parameters(model)}
    gate_up = {id(m.w1.weight if isinstance(m, SwiGLU) else m.w1) for m in model.modules()
               if isinstance(m, (SwiGLU, ExpertBank))}
    return {p: Matrices.of(p, bank=id(p) in banks, stacked=2 if id(p) in gate_up else 1)
            for p in model.parameters() if p.requires_grad and p.ndim >= 2 and id(p) not in embedding_ids}


def adamw_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, *, lr: float,
           betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """One AdamW step of ``param`` in its dtype: Loshchilov & Hutter's decoupled decay, then the
    bias-corrected Adam update, in torch's arithmetic."""
    beta1, beta2 = betas
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = exp_avg_sq.sqrt().div_(math.sqrt(1 - beta2**step)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))


@contextlib.contextmanager
def _in_dtype(state: list[Tensor], dtype: torch.dtype) -> Iterator[list[Tensor]]:
    """``state`` as tensors of ``dtype`` to update in place; stored in another dtype, the results are
    rounded back into it on exit."""
    work = [t if t.dtype == dtype else t.to(dtype) for t in state]
    yield work
    for stored, result in zip(state, work):
        if result is not stored:
            stored.copy_(result)


class HybridOptimizer(torch.optim.Optimizer):
    """Muon's group (``rule`` "muon") and AdamW's groups (``rule`` "adamw") stepped together, with
    the state in ``state_dtype`` (None: each weight's own). Without a Muon group it is AdamW with
    low-precision state.

    The state keys are torch's — AdamW's ``step``, ``exp_avg``, ``exp_avg_sq``, Muon's
    ``momentum_buffer`` — each tensor shaped like its parameter, so checkpoints store and reshard
    it by parameter name like any AdamW state (megamoe.checkpoint.state).
    """

    def __init__(self, groups: list[dict[str, Any]], matrices: dict[nn.Parameter, Matrices],
                 state_dtype: Optional[torch.dtype]) -> None:
        super().__init__(groups, defaults={})
        self.matrices = matrices
        self.state_dtype = state_dtype

    def _zeros(self, param: Tensor) -> Tensor:
        return torch.zeros_like(param, dtype=self.state_dtype or param.dtype, memory_format=torch.preserve_format)

    @overload
    def step(self, closure: None = None) -> None: ...
    @overload
    def step(self, closure: Callable[[], float]) -> float: ...
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        assert closure is None, "the trainer computes the loss itself"
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["rule"] == "muon":
                self._muon(group, params)
            else:
                self._adamw(group, params)
        return None

    def _adamw(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """AdamW over pieces of each parameter (it is elementwise), so that its temporaries stay small."""
        settings = {key: group[key] for key in ("lr", "betas", "eps", "weight_decay")}
        for p in params:
            assert p.grad is not None  # step() passes the parameters that have gradients
            state = self.state[p]
            if not state:
                state.update(step=torch.tensor(0.0), exp_avg=self._zeros(p), exp_avg_sq=self._zeros(p))
            state["step"] += 1
            updated = (t.view(-1).split(ELEMENTWISE_CHUNK) for t in (p, state["exp_avg"], state["exp_avg_sq"]))
            for param, *moments, grad in zip(*updated, p.grad.reshape(-1).split(ELEMENTWISE_CHUNK)):
                with _in_dtype(moments, p.dtype) as (exp_avg, exp_avg_sq):
                    adamw_(param, grad, exp_avg, exp_avg_sq, int(state["step"]), **settings)

    def _muon(self, group: dict[str, Any], params: list[nn.Parameter]) -> None:
        settings = {key: group[key] for key in ("lr", "weight_decay", "momentum", "nesterov", "ns_steps", "adjust_lr")}
        for batch in shape_batches(params, self.matrices):
            buffers = [self.state[p].setdefault("momentum_buffer", self._zeros(p)) for p in batch]
            with _in_dtype(buffers, batch[0].dtype) as work:
                muon_(batch, work, [self.matrices[p] for p in batch], **settings)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch casts loaded state to each parameter's dtype; low-precision state goes back to its own."""
        super().load_state_dict(state_dict)
        if self.state_dtype is not None:
            for state in self.state.values():
                state.update({key: value.to(self.state_dtype) for key, value in state.items() if key != "step"})


def _apex_fused_adam() -> type | None:
    """NVIDIA apex's FusedAdam when apex is installed (NGC images); never a dependency."""
    try:
        from apex.optimizers import FusedAdam
    except ImportError:  # no apex, PyPI's unrelated "apex" package, or apex without its CUDA extensions
        return None
    return FusedAdam


def build_optimizer(model: nn.Module, train_cfg: DictConfig,
                    embeddings: Collection[nn.Parameter] = ()) -> torch.optim.Optimizer:
    """The optimizer ``train_cfg`` asks for over ``model``; the loop sets the lr of every step.

    AdamW with fp32 state: AdamW(β1, β2, eps) over :func:`param_groups` — on CUDA apex FusedAdam
    (AdamW mode) if importable, else torch's fused AdamW; on CPU torch's fused AdamW too
    (elementwise, so bit-identical run to run and across layouts, and ~6× faster than the for-loop
    version on the MoE's many expert parameters). Muon, or bf16 state: :class:`HybridOptimizer`.
    """
    adamw = {"lr": train_cfg.lr, "betas": (train_cfg.beta1, train_cfg.beta2), "eps": train_cfg.eps}
    matrices = muon_matrices(model, embeddings) if train_cfg.optimizer == Optimizer.MUON else {}
    groups = param_groups(model, train_cfg.weight_decay, train_cfg.decay_embeddings, embeddings, exclude=matrices)
    state_dtype = STATE_DTYPES[train_cfg.optimizer_state_dtype]
    if train_cfg.optimizer == Optimizer.ADAMW and state_dtype is None:
        on_cuda = all(p.is_cuda for g in groups for p in g["params"])
        fused_adam = _apex_fused_adam() if on_cuda else None
        if fused_adam is not None:
            return fused_adam(groups, adam_w_mode=True, **adamw)
        return torch.optim.AdamW(groups, fused=True, **adamw)
    muon = train_cfg.muon
    muon_group = {"name": "muon", "rule": "muon", "params": list(matrices), "lr": train_cfg.lr,
                  "weight_decay": train_cfg.weight_decay, "momentum": muon.momentum, "nesterov": muon.nesterov,
                  "ns_steps": muon.ns_steps, "adjust_lr": muon.adjust_lr}
    adamw_groups = [{**group, "rule": "adamw", **adamw} for group in groups]
    muon_groups = [muon_group] if train_cfg.optimizer == Optimizer.MUON else []  # also when empty: one group layout
    return HybridOptimizer(muon_groups + adamw_groups, matrices, state_dtype)
