"""Parameter counts and FLOPs of a Yuan MoE: `python launch/model_stats.py +exp=NAME [key=value ...]`.

The model is built on the meta device (no memory, so the 40B M32 is instant) and its parameter
count is checked against the analytic breakdown of megamoe.model.flops, whose conventions are
stated there. Prints a table, then, as the last line, one JSON object with the figures.
"""

from __future__ import annotations

import json
import sys

import torch
from omegaconf import DictConfig

from megamoe.cli import exit_on_user_error
from megamoe.config import compose, validate
from megamoe.model import flops
from megamoe.model.yuan import YuanModel

LABELS = {
    "embedding": "embedding", "attention": "attention q/k/v/o", "lfa": "LFA convs + norm", "router": "router",
    "experts": "routed experts", "shared_experts": "shared experts", "dense_ffn": "dense FFN",
    "norms": "RMSNorms", "head": "output head",
}
USAGE = "usage: python launch/model_stats.py +exp=NAME [key=value ...]   (e.g. +exp=m32_2000b moe.top_k=4)"


def scaled(n: float, billion: str) -> tuple[float, str]:
    """(7.4e9, "G") → (7.4, "G"): the largest SI-style prefix that keeps the value ≥ 1."""
    for prefix, scale in (("T", 1e12), (billion, 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return n / scale, prefix
    return n, ""


def human(n: float) -> str:
    """Parameters: 39942842368 → '39.94B'."""
    value, prefix = scaled(n, "B")
    return f"{value:.2f}{prefix}" if prefix else str(int(n))


def human_flops(n: float) -> str:
    """FLOPs: 7407665152 → '7.41 GFLOPs'."""
    value, prefix = scaled(n, "G")
    return f"{value:.2f} {prefix}FLOPs"


def built_params(cfg: DictConfig) -> int:
    with torch.device("meta"):
        model = YuanModel(cfg)
    return sum(p.numel() for p in model.parameters())


def stats(cfg: DictConfig) -> dict:
    """Everything the table and the JSON line show."""
    breakdown = flops.parameter_breakdown(cfg)
    total, built = flops.total_params(cfg), built_params(cfg)
    if built != total:
        raise RuntimeError(f"the model built on meta has {built:,} parameters, the analytic count {total:,}")
    fwd = flops.fwd_flops_per_token(cfg)
    return {
        "total_params": total,
        "active_params": flops.active_params(cfg),
        "fwd_flops_per_token": fwd,
        "train_flops_per_token": 3 * fwd,
        "attention_fwd_flops_per_token": flops.attention_flops_per_token(cfg, cfg.train.seq_len),
        "seq_len": cfg.train.seq_len,
        "compute_ratio_vs_dense": flops.compute_ratio_vs_dense(cfg),
        "params": {row: {"total": part.total, "active": part.active} for row, part in breakdown.items()},
    }


def table(cfg: DictConfig, s: dict) -> str:
    m, moe = cfg.model, cfg.moe
    ffn = (f"{moe.num_experts} experts top-{moe.top_k}, expert ffn {moe.ffn_hidden_size}, {moe.router} router"
           if m.ffn_type == "moe" else f"dense SwiGLU ffn {m.dense_ffn_hidden_size}")
    lines = [
        f"Yuan decoder: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads × {m.head_dim}, "
        f"{ffn}, vocab {m.vocab_size}{', tied embeddings' if m.tie_embeddings else ''}",
        "",
        f"{'':<20}{'total':>27}{'active':>27}",
    ]

    def row(label: str, total: int, active: int) -> str:
        return f"{label:<20}{total:>18,}{human(total):>9}{active:>18,}{human(active):>9}"

    for name, counts in s["params"].items():
        if name == "head" and m.tie_embeddings:
            lines.append(f"{LABELS[name]:<20}{'tied: the embedding':>54}")
        elif counts["total"]:
            lines.append(row(LABELS[name], counts["total"], counts["active"]))
    lines += [
        "-" * 74,
        row("total", s["total_params"], s["active_params"]),
        "",
        f"forward / token         {human_flops(s['fwd_flops_per_token'])}  (2 × active matmul weights)",
        f"training / token        {human_flops(s['train_flops_per_token'])}  (3 × forward)",
        f"attention scores        {human_flops(s['attention_fwd_flops_per_token'])}  forward / token at seq_len "
        f"{s['seq_len']}, causal (not in the two lines above)",
        f"compute vs dense        {100 * s['compute_ratio_vs_dense']:.2f}%  of a dense model with "
        f"{human(s['total_params'])} parameters (6 FLOPs / parameter / token)",
    ]
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    overrides = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in overrides):
        print(__doc__.strip() + "\n\n" + USAGE)
        return
    cfg = compose(overrides)
    validate(cfg)
    s = stats(cfg)
    print(table(cfg, s))
    print(json.dumps(s))


if __name__ == "__main__":
    main()
