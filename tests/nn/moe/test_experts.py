"""The expert bank's bf16 weight copies: one per optimizer step, shared by every micro-batch."""

import contextlib

import pytest
import torch

from megamoe.config import compose
from megamoe.nn.casts import shared_casts
from megamoe.nn.moe import ExpertBank
from megamoe.train.optim import build_optimizer

HIDDEN, FFN, COUNTS = 16, 16, [3, 0, 9, 4]  # an empty expert; groups the grouped GEMM must pad
MICROBATCHES = 3


def bf16() -> torch.autocast:
    """A fresh autocast context (one instance must not be entered twice at once)."""
    return torch.autocast("cpu", dtype=torch.bfloat16)


def bank(grouped_gemm: str = "off") -> ExpertBank:
    experts = ExpertBank(len(COUNTS), 0, HIDDEN, FFN, grouped_gemm)
    experts.reset_parameters(0.5, 1, 0)
    return experts


def microbatches(n: int = MICROBATCHES) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(sum(COUNTS), HIDDEN, generator=generator, requires_grad=True) for _ in range(n)]


def forward_all(experts: ExpertBank, inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], set[int]]:
    """Every micro-batch's forward kept alive (as 1F1B keeps them), and the storages of the bf16
    weight copies their graphs saved for backward (the weights' views: per-expert, transposed)."""
    shapes = {experts.w1.shape, experts.w2.shape}
    storages: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t if t._base is None else t._base
        if base.dtype == torch.bfloat16 and base.shape in shapes:
            storages.add(base.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), bf16():
        outputs = [experts(x, COUNTS) for x in inputs]
    return outputs, storages


def backward(outputs: list[torch.Tensor]) -> None:
    for y in outputs:
        y.float().square().sum().backward()


@pytest.mark.parametrize("grouped_gemm", ["off", "on"])  # the per-expert loop, torch._grouped_mm
def test_microbatches_in_flight_share_one_cast_with_unchanged_gradients(grouped_gemm: str) -> None:
    """Against the same bank outside shared_casts(), which casts in every forward."""
    results = []
    for shared in (True, False):
        experts, inputs = bank(grouped_gemm), microbatches()
        with shared_casts() if shared else contextlib.nullcontext():
            outputs, storages = forward_all(experts, inputs)
            backward(outputs)
        results.append((storages, [y.detach() for y in outputs], [x.grad for x in inputs],
                        experts.w1.grad, experts.w2.grad))
    (shared_storages, *shared), (per_forward_storages, *reference) = results
    assert len(shared_storages) == 2  # one copy of w1 and one of w2 for all the micro-batches
    assert len(per_forward_storages) == 2 * MICROBATCHES
    torch.testing.assert_close(shared, reference, rtol=0, atol=0)


def test_copies_are_dropped_with_the_step_and_made_from_the_updated_weights() -> None:
    """The trainer's fused AdamW writes the weights without bumping their version: the copy must
    not outlive the step's scope. An in-place change inside the scope is seen too."""
    experts = bank()
    optimizer = build_optimizer(experts, compose(["+exp=tiny"]).train)
    with shared_casts():
        backward(forward_all(experts, microbatches(1))[0])
    assert experts._w1_cast._copy is None  # dropped on exit, before the optimizer step
    optimizer.step()
    with shared_casts(), bf16():
        torch.testing.assert_close(experts._weights(torch.bfloat16)[0], experts.w1.bfloat16(), rtol=0, atol=0)
        with torch.no_grad():
            experts.w1.mul_(2)
        torch.testing.assert_close(experts._weights(torch.bfloat16)[0], experts.w1.bfloat16(), rtol=0, atol=0)


def test_a_no_grad_forward_does_not_leave_a_copy_without_gradient() -> None:
    experts = bank()
    with shared_casts():
        with torch.no_grad(), bf16():
            experts(microbatches(1)[0], COUNTS)  # evaluation
        backward(forward_all(experts, microbatches(1))[0])
    assert experts.w1.grad is not None and experts.w1.grad.abs().sum() > 0


def test_fp32_uses_the_parameters_themselves() -> None:
    experts = bank()
    with shared_casts():
        w1, w2 = experts._weights(torch.float32)
    assert w1 is experts.w1 and w2 is experts.w2
