"""RMSNorm against its definition, in float64 and through a bf16 round trip."""

import pytest
import torch

from megamoe.nn.norms import RMSNorm


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y_i = x_i / sqrt(mean_j x_j² + eps) · w_i, one row at a time in float64."""
    rows = x.double().reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    for r, row in enumerate(rows):
        out[r] = row / torch.sqrt((row * row).sum() / row.numel() + eps) * weight.double()
    return out.reshape(x.shape)


@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_matches_definition(eps: float) -> None:
    torch.manual_seed(0)
    norm = RMSNorm(16, eps)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 16) * 0.1  # small values so eps matters at 1e-2
    torch.testing.assert_close(norm(x).double(), reference_rms_norm(x, norm.weight, eps), rtol=1e-5, atol=1e-6)


def test_bf16_input_keeps_dtype_and_fp32_accuracy() -> None:
    torch.manual_seed(0)
    norm = RMSNorm(64)
    norm.reset_parameters()
    x = (torch.randn(4, 64) * 30).bfloat16()
    y = norm(x)
    assert y.dtype == torch.bfloat16
    expected = reference_rms_norm(x.float(), norm.weight, 1e-6)
    torch.testing.assert_close(y.double(), expected, rtol=1e-2, atol=1e-2)  # one bf16 rounding only


def test_reset_parameters_gives_unit_weight() -> None:
    norm = RMSNorm(8)
    norm.reset_parameters()
    assert torch.equal(norm.weight, torch.ones(8))
