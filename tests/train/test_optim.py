"""AdamW groups and optimizer: the decay rule, determinism, and the update against its definition."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from megamoe.config.schema import TrainConfig
from megamoe.train.optim import build_optimizer, param_groups


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(4)
        self.proj = nn.Linear(4, 4, bias=True)
        self.experts = nn.Parameter(torch.randn(2, 4, 4))  # an expert bank is 3-D: decayed


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.norm = nn.RMSNorm(4)
        self.lm_head = nn.Linear(4, 10, bias=False)
        self.frozen = nn.Parameter(torch.ones(3, 3), requires_grad=False)


def _names(model: nn.Module, groups: list[dict]) -> list[set[str]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [{name_of[id(p)] for p in g["params"]} for g in groups]


def _cfg(**overrides: object) -> DictConfig:
    return OmegaConf.structured(TrainConfig(**{"lr": 1e-2, "weight_decay": 0.1, **overrides}))


@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_param_groups_follow_the_decay_rule(decay_embeddings: bool) -> None:
    model = nn.Sequential()
    model.add_module("stage", _Toy())  # names gain a prefix, as inside a pipeline-stage wrapper
    toy = model.stage
    groups = param_groups(model, 0.1, decay_embeddings, {toy.embed.weight, toy.lm_head.weight})
    assert [(g["name"], g["weight_decay"]) for g in groups] == [("decay", 0.1), ("no_decay", 0.0)]
    decay, no_decay = _names(model, groups)
    matrices = {f"stage.layers.{i}.{n}" for i in (0, 1) for n in ("proj.weight", "experts")}
    gains = {f"stage.layers.{i}.{n}" for i in (0, 1) for n in ("norm.weight", "proj.bias")} | {"stage.norm.weight"}
    embeddings = {"stage.embed.weight", "stage.lm_head.weight"}
    assert decay == (matrices | embeddings if decay_embeddings else matrices)
    assert no_decay == (gains if decay_embeddings else gains | embeddings)


def test_build_optimizer_on_cpu_uses_cfg() -> None:
    opt = build_optimizer(_Toy(), _cfg(beta1=0.8, beta2=0.9, eps=1e-6))
    assert type(opt) is torch.optim.AdamW
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all(g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 and g["fused"] is True for g in opt.param_groups)


def _train(steps: int) -> tuple[nn.Module, list[torch.Tensor]]:
    """A few AdamW steps on fixed random gradients; returns the model and the gradients used."""
    torch.manual_seed(0)
    model = _Toy()
    opt = build_optimizer(model, _cfg())
    grads = []
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn_like(p) if p.requires_grad else None
        grads.append([None if p.grad is None else p.grad.clone() for p in model.parameters()])
        opt.step()
    return model, grads


def test_optimizer_is_deterministic_on_cpu() -> None:
    a, _ = _train(3)
    b, _ = _train(3)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


def test_update_matches_adamw_definition() -> None:
    """Loshchilov & Hutter's AdamW, in float64: decoupled decay, then the bias-corrected Adam step."""
    steps, lr, b1, b2, eps = 3, 1e-2, 0.9, 0.95, 1e-8
    trained, grads = _train(steps)
    torch.manual_seed(0)
    model = _Toy()
    decay_ids = {id(p) for p in param_groups(model, 0.1, True)[0]["params"]}
    for i, (name, p) in enumerate(model.named_parameters()):
        if not p.requires_grad:
            continue
        w, m, v = p.detach().double(), torch.zeros_like(p, dtype=torch.float64), torch.zeros_like(p, dtype=torch.float64)
        wd = 0.1 if id(p) in decay_ids else 0.0
        for t in range(1, steps + 1):
            g = grads[t - 1][i].double()
            w = w * (1 - lr * wd)
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            w = w - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        got = dict(trained.named_parameters())[name]
        torch.testing.assert_close(got.double(), w, rtol=1e-6, atol=1e-7, msg=name)
    assert math.isclose(trained.frozen.sum().item(), 9.0)
