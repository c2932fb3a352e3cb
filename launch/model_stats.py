"""Parameters, FLOPs and memory per GPU of an MoE run (any model family), before launching it:
`python launch/model_stats.py +exp=NAME [--world-size N] [--expert-imbalance F] [key=value ...]`.

The model is built on the meta device (no memory, so the 40B M32 is instant) and its parameter
count is checked against the analytic breakdown of megamoe.estimators.flops, whose conventions are
stated there. Memory per GPU (megamoe.estimators.memory) is for the config's layout on N GPUs
(default: the fewest it allows, pp × ep) and the pipeline rank that needs the most, under the
config's stage split, whose layers per stage and compute balance the table also shows, with
routing at --expert-imbalance (the busiest expert's load ÷ the mean, default 1.0: balanced).
Prints a table, then, as the last line, one JSON object with the figures.
"""

from __future__ import annotations

import json
import sys
from typing import Callable, Iterable, Optional, TypeVar

import torch
from omegaconf import DictConfig

from megamoe.cli import exit_on_user_error
from megamoe.config import compose
from megamoe.config.choices import FfnType, Optimizer
from megamoe.config.layers import moe_layer_flags
from megamoe.errors import UserError
from megamoe.estimators import balance, flops, memory
from megamoe.estimators.routing import ExpertLoads
from megamoe.models import build_stage, validate_config
from megamoe.parallel import stages

LABELS = {
    "embedding": "embedding", "attention": "attention q/k/v/o", "lfa": "LFA convs + norm", "router": "router",
    "experts": "routed experts", "shared_experts": "shared experts", "dense_ffn": "dense FFN",
    "norms": "RMSNorms", "head": "output head",
}
USAGE = ("usage: python launch/model_stats.py +exp=NAME [--world-size N] [--expert-imbalance F] [key=value ...]   "
         "(e.g. +exp=m32_2000b --world-size 64 moe.top_k=4)")
MEMORY_LABELS = {
    "weights": "weights (fp32)", "gradients": "gradients (fp32)", "optimizer": "optimizer state",
    "weight_copies": "bf16 weight copies", "activations": "activations",
}
OPTIMIZER_LABELS = {Optimizer.ADAMW: "AdamW m, v", Optimizer.MUON: "Muon + AdamW"}  # the optimizer row
GPU_GIB = 80  # the memory of the GPUs the table compares against (A100 / H100 80 GB)
T = TypeVar("T")


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
        model = build_stage(cfg)
    return sum(p.numel() for p in model.parameters())


def pipeline_stats(cfg: DictConfig) -> dict:
    """The layers of each pipeline stage and how evenly they spread the training compute
    (megamoe.estimators.balance's cost model: the last stage also runs the head and the loss)."""
    layers = balance.stage_layers(cfg)
    costs = balance.stage_costs(cfg, layers)
    layer_costs = balance.layer_costs(cfg)
    p = cfg.parallel
    return {
        "layers_per_stage": layers,
        "split": "explicit" if p.layers_per_stage is not None else p.stage_balance,
        "slowest_stage_vs_mean": balance.imbalance(costs),
        "slowest_rank_vs_mean": balance.imbalance(stages.rank_totals(cfg, costs)),
        "head_in_layers": balance.part_costs(cfg).head * len(layer_costs) / sum(layer_costs),  # the mean layer's
    }


def memory_stats(cfg: DictConfig, world_size: int | None, imbalance: float = 1.0) -> dict:
    """The memory estimate of the fullest GPU, in GiB by part, and the layout it assumes."""
    lay, rank = balance.memory_per_gpu(cfg, world_size, imbalance)
    return {
        "memory_per_gpu_gib": rank.gib(),
        "memory_layout": {
            "world_size": lay.world_size, "pp": lay.pp, "dp": lay.dp, "ep": lay.ep, "pp_rank": rank.pp_rank,
            "microbatches_in_flight": rank.in_flight, "micro_batch": cfg.train.micro_batch,
            "precision": "bf16" if memory.is_bf16(cfg) else "fp32",
            "activation_checkpointing": cfg.train.activation_checkpointing, "expert_imbalance": imbalance,
            "optimizer": cfg.train.optimizer, "optimizer_state_dtype": cfg.train.optimizer_state_dtype,
        },
    }


def stats(cfg: DictConfig, world_size: int | None = None, imbalance: float = 1.0) -> dict:
    """Everything the table and the JSON line show."""
    breakdown = flops.parameter_breakdown(cfg)
    total, built = flops.total_params(cfg), built_params(cfg)
    if built != total:
        raise RuntimeError(f"the model built on meta has {built:,} parameters, the analytic count {total:,}")
    fwd = flops.fwd_flops_per_token(cfg)
    moe_layers = sum(moe_layer_flags(cfg.model, cfg.moe))
    return {
        "layers": {"moe": moe_layers, "dense": cfg.model.num_layers - moe_layers},
        "total_params": total,
        "active_params": flops.active_params(cfg),
        "fwd_flops_per_token": fwd,
        "train_flops_per_token": 3 * fwd,
        "attention_fwd_flops_per_token": flops.attention_flops_per_token(cfg, cfg.train.seq_len),
        "seq_len": cfg.train.seq_len,
        "compute_ratio_vs_dense": flops.compute_ratio_vs_dense(cfg),
        "params": {row: {"total": part.total, "active": part.active} for row, part in breakdown.items()},
        "pipeline": pipeline_stats(cfg),
        **memory_stats(cfg, world_size, imbalance),
    }


def ffn_text(cfg: DictConfig) -> str:
    """The FFNs in words: the MoE one, the dense one, or both and which layers are dense."""
    m, moe = cfg.model, cfg.moe
    sparse = f"{moe.num_experts} experts top-{moe.top_k}, expert ffn {moe.ffn_hidden_size}, {moe.router} router"
    dense = f"dense SwiGLU ffn {m.dense_ffn_hidden_size}"
    flags = moe_layer_flags(m, moe)
    if all(flags) or not any(flags):
        return sparse if all(flags) else dense
    dense_layers = [i for i, moe_layer in enumerate(flags) if not moe_layer]
    which = f"layer{'s' if len(dense_layers) > 1 else ''} {index_ranges(dense_layers)}"
    return f"{sparse} ({sum(flags)} MoE layers), {dense} in {which}"


def index_ranges(indices: Iterable[int]) -> str:
    """[0, 1, 2, 5, 7, 8] → '0-2, 5, 7-8'."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


def table(cfg: DictConfig, s: dict) -> str:
    m = cfg.model
    ffn = ffn_text(cfg)
    lines = [
        f"{m.family} decoder: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads × {m.head_dim}"
        f"{f' ({m.num_kv_heads} kv heads)' if m.num_kv_heads not in (None, m.num_heads) else ''}, "
        f"{ffn}, vocab {m.vocab_size}{', tied embeddings' if m.tie_embeddings else ''}",
        "",
        f"{'':<20}{'total':>27}{'active':>27}",
    ]

    def row(label: str, total: int, active: int) -> str:
        return f"{label:<20}{total:>18,}{human(total):>9}{active:>18,}{human(active):>9}"

    for name, counts in s["params"].items():
        if name == "head" and m.tie_embeddings:
            lines.append(f"{LABELS.get(name, name):<20}{'tied: the embedding':>54}")
        elif counts["total"]:
            lines.append(row(LABELS.get(name, name), counts["total"], counts["active"]))
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
        "",
        *pipeline_table(cfg, s["pipeline"]),
        *memory_table(s),
    ]
    return "\n".join(lines)


def pipeline_table(cfg: DictConfig, pipe: dict) -> list[str]:
    """The stage split's lines (none without a pipeline)."""
    p, layers = cfg.parallel, pipe["layers_per_stage"]
    if len(layers) == 1:
        return []
    ranks = (f", slowest pipeline rank {pipe['slowest_rank_vs_mean']:.2f} ×" if p.virtual_stages > 1 else "")
    return [
        f"pipeline stages         {len(layers)} (pp {p.pp} × {p.virtual_stages} virtual), layers per stage "
        f"{', '.join(map(str, layers))} ({pipe['split']} split)",
        f"                        slowest stage {pipe['slowest_stage_vs_mean']:.2f} × the mean training FLOPs{ranks} "
        f"(head and loss ≈ {pipe['head_in_layers']:.2f} layers)",
        "",
    ]


def memory_table(s: dict) -> list[str]:
    """The memory estimate's lines: the layout it assumes, then GiB by part and the total."""
    gib, lay = s["memory_per_gpu_gib"], s["memory_layout"]
    last = lay["pp_rank"] == lay["pp"] - 1
    stage = f"pipeline rank {lay['pp_rank']}{' (last stage: head and loss)' if last and lay['pp'] > 1 else ''}"
    gpus = f"{lay['world_size']} GPU{'s' if lay['world_size'] > 1 else ''}"
    lines = [
        f"memory per GPU on {gpus} (pp {lay['pp']} × dp {lay['dp']}, ep {lay['ep']}), {stage}: "
        f"micro-batch {lay['micro_batch']} × {s['seq_len']} tokens, {lay['microbatches_in_flight']:g} in flight, "
        f"{lay['precision']}, recompute {lay['activation_checkpointing']}, busiest expert at "
        f"{lay['expert_imbalance']:g} × the mean load",
    ]
    labels = {**MEMORY_LABELS,
              "optimizer": f"{OPTIMIZER_LABELS[lay['optimizer']]} ({lay['optimizer_state_dtype']})"}
    lines += [f"  {label:<22}{gib[part]:>9.2f} GiB" for part, label in labels.items()]
    spare = GPU_GIB - gib["total"]
    verdict = (f"leaves {spare:.1f} GiB of {GPU_GIB} for the CUDA context, NCCL buffers and fragmentation"
               if spare > 0 else f"does not fit {GPU_GIB} GiB")
    lines.append(f"  {'total':<22}{gib['total']:>9.2f} GiB  ({verdict})")
    return lines


def take_option(args: list[str], flag: str, parse: Callable[[str], T]) -> tuple[Optional[T], list[str]]:
    """Take `FLAG VALUE` / `FLAG=VALUE` out of the arguments, its value read by ``parse`` (which
    raises a UserError); the rest are Hydra overrides."""
    rest, found, it = [], None, iter(args)
    for arg in it:
        if arg == flag or arg.startswith(f"{flag}="):
            found = parse(arg.partition("=")[2] if "=" in arg else next(it, ""))
        else:
            rest.append(arg)
    return found, rest


def gpus(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"--world-size: '{value}' is not a positive number of GPUs (e.g. --world-size 8)")
    return int(value)


def imbalance(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise UserError(f"--expert-imbalance: '{value}' is not a number (the busiest expert's load ÷ the mean, "
                        "e.g. --expert-imbalance 1.5)") from None


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    overrides = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in overrides):
        print(__doc__.strip() + "\n\n" + USAGE)
        return
    world_size, overrides = take_option(overrides, "--world-size", gpus)
    expert_imbalance, overrides = take_option(overrides, "--expert-imbalance", imbalance)
    cfg = compose(overrides)
    validate_config(cfg)
    if expert_imbalance is not None and cfg.model.ffn_type == FfnType.MOE:
        ExpertLoads.of(cfg.moe, expert_imbalance)  # a UserError naming the flag when impossible
    s = stats(cfg, world_size, 1.0 if expert_imbalance is None else expert_imbalance)
    print(table(cfg, s))
    print(json.dumps(s))


if __name__ == "__main__":
    main()
