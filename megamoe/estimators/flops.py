"""Parameter counts (total / active) and FLOPs per token, analytically from the config.

Conventions, chosen so that Yuan 2.0-M32 (configs/exp/m32_2000b.yaml) reproduces the paper's
headline numbers — 40B total, 3.7B active, 7.4 GFLOPs forward per token, 9.25% of a dense
model's training compute:

* **total** counts every stored parameter once; a tied embedding / head is one matrix.
* **active** counts what one token passes through: everything except the routed experts,
  plus top_k of the num_experts routed experts (shared experts are always active).
* **forward FLOPs per token** = 2 × the active parameters used as matmul weights (one multiply
  and one add each): attention q/k/v/o, the LFA convolution kernels, the router, the active
  experts (or, in a dense layer, the dense FFN), and the output head — a tied head counts the
  embedding matrix, whose lookup is free. Norm weights, biases and element-wise work are left
  out (<0.01%). The attention-score FLOPs (QKᵀ and PV) grow with the sequence length and are
  not in the paper's 7.4; :func:`attention_flops_per_token` gives them separately, for MFU.
* **training FLOPs** = 3 × forward (the backward pass costs two forwards), and a dense model
  with the same total parameters spends 6 FLOPs per parameter per token, so
  ``compute_ratio_vs_dense`` = matmul-active / total (M32: 3.70B / 39.94B = 9.27%; the paper's
  9.25% is 3.7 / 40, the same ratio of the rounded figures).

The counts are checked against models actually built on the meta device (tests/models).
"""

from __future__ import annotations

from collections import Counter

from megamoe.config.choices import Router
from megamoe.config.layers import moe_layer_flags
from megamoe.config.schema import Config
from megamoe.models import family_of
from megamoe.models.family import Part


def _swiglu_params(hidden: int, ffn: int) -> int:
    return 3 * hidden * ffn  # w1 [2·ffn, H] (gate | up) and w2 [H, ffn]


def _router_params(cfg: Config) -> int:
    moe, hidden = cfg.moe, cfg.model.hidden_size
    if moe.router == Router.ATTENTION:
        return 3 * moe.num_experts * hidden  # query, key, value maps, each H → N
    return (2 if moe.noisy_gating else 1) * moe.num_experts * hidden  # gate (+ noise) map


def layer_breakdown(cfg: Config, moe_layer: bool) -> dict[str, Part]:
    """One decoder layer's rows — the family's attention rows, router, experts, shared experts,
    dense FFN, norms — for an MoE layer or a dense one (``moe_layer``); rows that do not apply are zero."""
    m, moe, hidden = cfg.model, cfg.moe, cfg.model.hidden_size

    def full(params: int) -> Part:
        return Part(params, params, params)

    zero = Part(0, 0, 0)
    router = experts = shared = dense = zero
    if moe_layer:
        router = full(_router_params(cfg))
        expert = _swiglu_params(hidden, moe.ffn_hidden_size)
        experts = Part(moe.num_experts * expert, moe.top_k * expert, moe.top_k * expert)
        shared_ffn = moe.shared_expert_ffn_hidden_size or moe.ffn_hidden_size
        gate = hidden if moe.shared_expert_gate and moe.num_shared_experts else 0  # sigmoid gate H → 1
        shared = full(moe.num_shared_experts * _swiglu_params(hidden, shared_ffn) + gate)
    else:
        dense = full(_swiglu_params(hidden, m.dense_ffn_hidden_size))
    norms = 2 * hidden  # input and post-attention norms
    return {**family_of(cfg).attention_parts(m), "router": router, "experts": experts, "shared_experts": shared,
            "dense_ffn": dense, "norms": Part(norms, norms, 0)}


def parameter_breakdown(cfg: Config) -> dict[str, Part]:
    """Rows in reading order: embedding, the family's attention rows (Yuan: attention, LFA;
    Qwen-MoE: attention), router, experts, shared experts, dense FFN, norms, head — summed over
    all layers, each counted as the MoE or dense layer ``moe.layer_freq`` makes it; rows that do
    not apply are zero."""
    m = cfg.model
    vocab_matrix = m.vocab_size * m.hidden_size
    kinds = Counter(moe_layer_flags(m, cfg.moe))
    layers: dict[str, Part] = {}
    for moe_layer, count in kinds.items():
        for row, part in layer_breakdown(cfg, moe_layer).items():
            before = layers.get(row, Part(0, 0, 0))
            layers[row] = Part(before.total + count * part.total, before.active + count * part.active,
                               before.matmul + count * part.matmul)
    norms = layers.pop("norms").total + m.hidden_size  # + the final norm
    head_params = 0 if m.tie_embeddings else vocab_matrix
    return {
        "embedding": Part(vocab_matrix, vocab_matrix, 0),
        **layers,
        "norms": Part(norms, norms, 0),
        "head": Part(head_params, head_params, vocab_matrix),
    }


def total_params(cfg: Config) -> int:
    return sum(part.total for part in parameter_breakdown(cfg).values())


def active_params(cfg: Config) -> int:
    return sum(part.active for part in parameter_breakdown(cfg).values())


def fwd_flops_per_token(cfg: Config) -> int:
    """2 × active matmul weights (the paper's convention; no attention scores)."""
    return 2 * sum(part.matmul for part in parameter_breakdown(cfg).values())


def attention_flops_per_token(cfg: Config, seq_len: int) -> int:
    """Forward QKᵀ and PV FLOPs per token under a causal mask, averaged over the sequence.

    Query i attends to i + 1 keys, (s + 1)/2 on average; each key costs 2·head_dim FLOPs for
    the score and 2·head_dim for the weighted value, in every head of every layer.
    """
    m = cfg.model
    return m.num_layers * 2 * m.num_heads * m.head_dim * (seq_len + 1)  # 4·d·heads·(s+1)/2


def compute_ratio_vs_dense(cfg: Config) -> float:
    """Training FLOPs per token ÷ those of a dense model with the same total parameters (6N)."""
    return 3 * fwd_flops_per_token(cfg) / (6 * total_params(cfg))
