"""The memory watch: a step's peak and what it holds, by kind, on allocations whose sizes are known."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from megamoe.config import compose
from megamoe.dryrun.watch import MemoryWatch
from megamoe.train.optim import build_optimizer


class _BackwardMakes(torch.autograd.Function):
    """Identity whose backward allocates ``size`` floats (a temporary of the backward pass)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, size: int) -> torch.Tensor:
        ctx.size = size
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        scratch = torch.ones(ctx.size)
        return grad + scratch.sum(), None


def test_the_peak_is_replayed_by_kind() -> None:
    watch = MemoryWatch()
    with watch:
        model = nn.Linear(64, 32, bias=False)  # 8 KiB of weights
        optimizer = build_optimizer(model, compose(["+exp=tiny"]).train)
    with watch, watch.measure([model], optimizer) as measured:
        kept = torch.ones(100)  # 400 B that outlive the step: kept for the next one
        a = torch.ones(1000)  # 4000 B
        copy = model.weight.to(torch.bfloat16)  # 4 KiB: a weight copy
        like = torch.zeros_like(model.weight)  # 8 KiB made from a weight's shape alone: no copy
        x = torch.ones(2, 64, requires_grad=True)
        y = _BackwardMakes.apply(x, 3000)  # its backward makes 12000 B
        del a, like
        y.sum().backward()  # x.grad: 512 B
        del copy, x, y
    step = measured[0]
    by_kind = {kind: n for kind, n in step.by_kind.items() if n}
    # activations: x and the scalar y.sum(); temporaries: the backward's scratch, its sum and x.grad
    assert by_kind == {"weights": 8192, "weight_copies": 4096, "persistent_buffers": 400,
                       "activations": 512 + 4 + 4, "temporaries": 12000 + 4 + 512}
    assert step.peak_bytes == sum(by_kind.values())
    assert step.largest.nbytes == 12000 and step.largest.op == "aten.ones.default"
    assert [kind for kind, _ in step.at_peak][:2] == ["temporaries", "weight_copies"]
    assert kept.numel() == 100


def test_gradients_and_optimizer_state_get_their_kinds() -> None:
    watch = MemoryWatch()
    with watch:
        model = nn.Linear(16, 16, bias=False)  # 1 KiB
        optimizer = build_optimizer(model, compose(["+exp=tiny"]).train)
        model.weight.grad = torch.zeros_like(model.weight)
        optimizer.step()  # AdamW's m and v, 1 KiB each, and its step count
    with watch, watch.measure([model], optimizer) as measured:
        torch.ones(256)  # 1 KiB, freed at once: the peak
    by_kind = measured[0].by_kind
    assert (by_kind["weights"], by_kind["gradients"], by_kind["activations"]) == (1024, 1024, 1024)
    assert by_kind["optimizer"] >= 2048
