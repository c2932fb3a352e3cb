"""What the Yuan attention block costs: its parameters per layer (megamoe.estimators.flops's rows
``attention`` and ``lfa``) and the bytes it saves for backward per token (megamoe.estimators.memory)."""

from __future__ import annotations

from megamoe.config.schema import ModelConfig
from megamoe.estimators.memory import matmul_input_bytes, rms_norm_bytes, sdpa_bytes
from megamoe.models.family import Part


def _conv_kernels(m: ModelConfig) -> int:
    """LFA's conv1 H → H/2 and conv2 H/2 → H, kernel 2."""
    return 2 * (m.hidden_size // 2) * m.hidden_size * 2 if m.use_lfa else 0


def attention_parts(m: ModelConfig) -> dict[str, Part]:
    """Per layer: q/k/v/o (no biases), and LFA's kernels, conv biases and the filter's RMSNorm."""
    projections = 4 * m.hidden_size * m.num_heads * m.head_dim
    lfa = _conv_kernels(m) + ((m.hidden_size // 2 + m.hidden_size) + m.hidden_size if m.use_lfa else 0)
    return {"attention": Part(projections, projections, projections),
            "lfa": Part(lfa, lfa, _conv_kernels(m))}


def cast_per_forward(m: ModelConfig) -> int:
    """The LFA kernels are used through views (``weight[:, :, 0]``), which autocast does not cache."""
    return _conv_kernels(m)


def attention_bytes(m: ModelConfig, act: int) -> int:
    """Saved per token by the attention block (input norm, LFA, q/k/v/o, SDPA), act = activation bytes."""
    h = m.hidden_size
    sdpa = sdpa_bytes(m.num_heads, m.num_heads, m.head_dim, act)
    if not m.use_lfa:
        return rms_norm_bytes(h) + matmul_input_bytes(h, 3, act) + sdpa
    lfa = (
        matmul_input_bytes(h, 2, act)  # the normed input feeds conv1 and v_proj
        + act * h  # conv1's shifted copy of its input
        + 2 * act * (h // 2)  # conv2's input and its shifted copy
        + rms_norm_bytes(h)  # the filter's norm of conv2(conv1(x)) + x
        + matmul_input_bytes(h, 2, act)  # the filtered input feeds q_proj and k_proj
    )
    return rms_norm_bytes(h) + lfa + sdpa
