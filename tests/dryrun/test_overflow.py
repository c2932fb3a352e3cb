"""Tensors beyond a 32-bit index, found op by op; M32's experts at a micro-batch that reaches one."""

from __future__ import annotations

import pytest
import torch

from megamoe.dryrun.fake import FakeStepMode
from megamoe.dryrun.overflow import INT32_LIMIT, IndexWidths
from megamoe.dryrun.watch import MemoryWatch
from megamoe.nn.casts import shared_casts
from megamoe.nn.moe import ExpertBank
from megamoe.nn.moe import experts as experts_module


def test_an_op_that_makes_2_31_elements_is_named() -> None:
    widths = IndexWidths()
    with FakeStepMode(), MemoryWatch([widths.see]):
        torch.empty(INT32_LIMIT - 1, dtype=torch.bfloat16).neg()  # just below
        torch.empty(2, INT32_LIMIT // 2, dtype=torch.bfloat16).neg()
    assert [(w.op, w.shape) for w in widths.found()] == [("aten.empty.memory_format", (2, 2**30)),
                                                         ("aten.neg.default", (2, 2**30))]
    assert widths.found()[0].describe().endswith("(1.00 × 2^31 elements)")


def m32_experts_at_16_sequences(widths: IndexWidths) -> None:
    """M32's 32 experts on one rank (ep 1) over a micro-batch of 16 × 4096 tokens, top-2: 131,072
    rows, so w1's output [rows, 2 × 8192] reaches 2^31 elements. Forward and backward, bf16."""
    rows = 16 * 4096 * 2
    with FakeStepMode(), MemoryWatch([widths.see]), shared_casts():
        experts = ExpertBank(32, 0, 2048, 8192, grouped_gemm="on")
        tokens = torch.empty(rows, 2048, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = experts(tokens, [rows // 32] * 32)
        out.float().sum().backward()


def test_m32_experts_stay_below_2_31_elements_in_row_chunks() -> None:
    widths = IndexWidths()
    m32_experts_at_16_sequences(widths)
    assert widths.found() == []


def test_without_chunks_the_dry_run_finds_the_grouped_gemm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(experts_module, "GROUPED_GEMM_MAX_ELEMENTS", 2**62)
    widths = IndexWidths()
    m32_experts_at_16_sequences(widths)
    assert ("aten._grouped_mm.default", (131_072, 16_384)) in [(w.op, w.shape) for w in widths.found()]
