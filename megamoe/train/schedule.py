"""Learning-rate schedule: linear warmup, then cosine or linear decay to ``min_lr``, then flat.

Megatron's rule (``OptimizerParamScheduler.get_lr``) with ``step`` = the 1-based number of the
update about to be taken: step ``s <= warmup`` gets ``lr · s / warmup`` (so the first update
is not wasted at lr 0 and step ``warmup`` reaches the peak); decay runs from the end of warmup
to step ``decay_steps`` (``None`` = ``train.steps``), counted from the start of training like
Megatron's ``--lr-decay-iters``; later steps keep ``min_lr``. ``constant`` keeps ``lr`` after
warmup.

The schedule is a pure function of the step, so it has no state of its own: the loop calls
``set_lr(optimizer, lr_at(step, cfg.train))`` before each update, and the step saved in the
checkpoint restores it exactly. A skipped (non-finite) step uses the same rule; whether it
advances the step count is the loop's decision.
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig

from megamoe.config.choices import Decay


def lr_at(step: int, train_cfg: DictConfig) -> float:
    """The learning rate of update number ``step`` (1-based; 0 gives the warmup's start, 0)."""
    peak, floor, warmup = train_cfg.lr, train_cfg.min_lr, train_cfg.warmup_steps
    if warmup > 0 and step <= warmup:
        return peak * step / warmup
    if train_cfg.decay == Decay.CONSTANT:
        return peak
    decay_steps = train_cfg.steps if train_cfg.decay_steps is None else train_cfg.decay_steps
    if step >= decay_steps:
        return floor
    progress = (step - warmup) / (decay_steps - warmup)  # in [0, 1): here warmup <= step < decay_steps
    if train_cfg.decay == Decay.COSINE:
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif train_cfg.decay == Decay.LINEAR:
        coeff = 1.0 - progress
    else:
        raise ValueError(f"train.decay: '{train_cfg.decay}' is not one of cosine, linear, constant")
    return floor + coeff * (peak - floor)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group the same learning rate (weight decay is per group, lr is not)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
