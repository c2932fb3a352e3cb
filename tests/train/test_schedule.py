"""Learning-rate schedule: values at hand-computed steps (Megatron's rule, step 1 = first update)."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from megamoe.config.schema import TrainConfig
from megamoe.train.schedule import lr_at, set_lr


def _cfg(**overrides: object) -> DictConfig:
    base = {"lr": 1.0, "min_lr": 0.1, "warmup_steps": 10, "steps": 110, "decay": "cosine"}
    return OmegaConf.structured(TrainConfig(**{**base, **overrides}))


@pytest.mark.parametrize(("step", "expected"), [(0, 0.0), (1, 0.1), (5, 0.5), (10, 1.0)])
def test_warmup_is_linear_from_zero(step: int, expected: float) -> None:
    for decay in ("cosine", "linear", "constant"):
        assert lr_at(step, _cfg(decay=decay)) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (35, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))),  # a quarter of the way: 0.8681980515
        (60, 0.55),  # halfway between peak and floor
        (85, 0.1 + 0.9 * 0.5 * (1 + math.cos(3 * math.pi / 4))),
        (110, 0.1),  # end of decay
        (111, 0.1),
        (10_000, 0.1),
    ],
)
def test_cosine(step: int, expected: float) -> None:
    assert lr_at(step, _cfg()) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("step", "expected"),
                         [(11, 0.1 + 0.9 * 0.99), (35, 0.775), (60, 0.55), (110, 0.1), (500, 0.1)])
def test_linear(step: int, expected: float) -> None:
    assert lr_at(step, _cfg(decay="linear")) == pytest.approx(expected, abs=1e-12)


def test_decay_steps_ends_decay_early_and_constant_stays_at_peak() -> None:
    cfg = _cfg(decay_steps=60)
    assert lr_at(35, cfg) == pytest.approx(0.55, abs=1e-12)
    assert lr_at(60, cfg) == lr_at(61, cfg) == lr_at(110, cfg) == 0.1
    constant = _cfg(decay="constant")
    assert [lr_at(s, constant) for s in (11, 60, 110, 5000)] == [1.0] * 4


def test_no_warmup_starts_at_peak() -> None:
    cfg = _cfg(warmup_steps=0, steps=100, decay="linear")
    assert lr_at(0, cfg) == 1.0
    assert lr_at(1, cfg) == pytest.approx(0.1 + 0.9 * 0.99, abs=1e-12)
    assert lr_at(100, cfg) == 0.1


def test_set_lr_sets_every_group() -> None:
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2, 2))
    opt = torch.optim.AdamW([{"params": [a], "weight_decay": 0.0}, {"params": [b]}], lr=1.0)
    set_lr(opt, lr_at(5, _cfg()))
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5]
