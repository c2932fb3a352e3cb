"""Precision: what train.precision means on each device, resolved in one place."""

from __future__ import annotations

import pytest
import torch

from megamoe.config import compose
from megamoe.estimators.memory import is_bf16
from megamoe.nn.casts import autocast_dtype


@pytest.mark.parametrize(("precision", "device", "expected"), [
    ("auto", "cpu", None), ("auto", "cuda", torch.bfloat16),
    ("bf16", "cpu", torch.bfloat16), ("fp32", "cuda", None),
])
def test_autocast_dtype(precision: str, device: str, expected: torch.dtype | None) -> None:
    assert autocast_dtype(precision, device) == expected


@pytest.mark.parametrize(("precision", "bf16"), [("auto", True), ("bf16", True), ("fp32", False)])
def test_the_estimators_model_a_gpu_run_with_the_same_rule(precision: str, bf16: bool) -> None:
    assert is_bf16(compose(["+exp=tiny", f"train.precision={precision}"])) is bf16
