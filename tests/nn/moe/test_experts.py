"""The expert bank: its bf16 weight copies (one per optimizer step, shared by every micro-batch, each
pass's weight gradient handed on at once) and its grouped GEMMs in chunks below the int32 limit."""

import contextlib

import pytest
import torch

from megamoe.config import compose
from megamoe.nn.casts import shared_casts
from megamoe.nn.moe import ExpertBank
from megamoe.nn.moe import experts as experts_module
from megamoe.nn.moe.experts import row_chunks
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


def test_row_chunks_cut_inside_a_group_only_when_it_alone_is_too_long() -> None:
    ends = [16, 16, 56, 64]  # groups of 16, 0, 40 and 8 padded rows
    assert row_chunks(ends, 32) == [(0, 16), (16, 48), (48, 64)]  # the 40-row group is cut once
    assert row_chunks(ends, 64) == [(0, 64)]
    assert row_chunks([8, 16, 24], 16) == [(0, 16), (16, 24)]


@pytest.mark.parametrize(("counts", "exact_weight_gradients"), [([3, 0, 9, 4], True), ([3, 0, 40, 4], False)])
def test_grouped_gemm_beyond_the_int32_limit_runs_in_row_chunks(counts: list[int], exact_weight_gradients: bool,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The same outputs and input gradients with 16 rows per chunk as in one GEMM; so are the weight
    gradients, unless an expert's rows are cut (then its gradient sums two bf16 products)."""
    results = []
    for limit in (experts_module.GROUPED_GEMM_MAX_ELEMENTS, 16 * 2 * FFN):
        monkeypatch.setattr(experts_module, "GROUPED_GEMM_MAX_ELEMENTS", limit)
        experts = bank("on")
        x = torch.randn(sum(counts), HIDDEN, generator=torch.Generator().manual_seed(0), requires_grad=True)
        with bf16():
            y = experts(x, counts)
        y.float().square().sum().backward()
        results.append((y, x.grad, experts.w1.grad, experts.w2.grad))
    (y, x_grad, *weight_grads), (y_chunked, x_grad_chunked, *weight_grads_chunked) = results
    torch.testing.assert_close((y_chunked, x_grad_chunked), (y, x_grad), rtol=0, atol=0)
    for chunked, whole in zip(weight_grads_chunked, weight_grads):  # bf16 rounding of the largest entry at most
        atol = 0 if exact_weight_gradients else 2**-7 * whole.abs().max().item()
        torch.testing.assert_close(chunked, whole, rtol=0, atol=atol)


def test_each_pass_hands_its_weight_gradient_on_as_its_backward_reaches_it() -> None:
    """Two banks in a row, two micro-batches sharing the casts: in the second micro-batch's backward
    the second bank's w1 gradient reaches .grad before the gradient reaches the first bank (a copy
    shared through one autograd node would deliver it only at the end of each backward)."""
    first, second = bank(), bank()
    events: list[str] = []
    second.w1.register_post_accumulate_grad_hook(lambda _: events.append("second bank's w1.grad"))
    with shared_casts():
        outputs = []
        for x in microbatches(2):
            with bf16():
                hidden = first(x, COUNTS)
                hidden.register_hook(lambda grad: events.append("first bank's output gradient"))
                outputs.append(second(hidden, COUNTS))
        events.clear()
        outputs[1].float().sum().backward()
    assert events == ["second bank's w1.grad", "first bank's output gradient"]
