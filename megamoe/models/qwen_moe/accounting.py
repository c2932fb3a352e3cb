"""What the Qwen-MoE attention block costs: its parameters per layer (megamoe.estimators.flops's row
``attention``) and the bytes it saves for backward per token (megamoe.estimators.memory)."""

from __future__ import annotations

from megamoe.config.schema import ModelConfig
from megamoe.estimators.memory import matmul_input_bytes, rms_norm_bytes, sdpa_bytes
from megamoe.models.family import Part
from megamoe.nn.attention import kv_heads


def attention_parts(m: ModelConfig) -> dict[str, Part]:
    """Per layer: q and o (heads·head_dim × H), k and v (kv_heads·head_dim × H), and the q/k/v
    biases, which are parameters but no matmul weights."""
    queries, keys = m.num_heads * m.head_dim, kv_heads(m) * m.head_dim
    weights = m.hidden_size * 2 * (queries + keys)
    params = weights + (queries + 2 * keys if m.qkv_bias else 0)
    return {"attention": Part(params, params, weights)}


def attention_bytes(m: ModelConfig, act: int) -> int:
    """Saved per token by the attention block: the input norm, the normed input of the q/k/v
    projections, and SDPA with K/V at their grouped size (act = activation bytes)."""
    h = m.hidden_size
    return rms_norm_bytes(h) + matmul_input_bytes(h, 3, act) + sdpa_bytes(m.num_heads, kv_heads(m), m.head_dim, act)


def cast_per_forward(m: ModelConfig) -> int:
    """Every weight is used whole, so autocast's cache holds its copy for the step: none is cast again."""
    return 0
