"""Uneven pipeline splits: what the cost model predicts for Yuan 2.0-M32, and a measured step on CPU.

(a) M32 (+exp=m32_2000b: seq 4096, full recompute) at pp = 4, 6, 8, one and two virtual
    stages: the slowest stage's training FLOPs ÷ the mean stage's, for the even split and for
    stage_balance=auto, beside the best any split of whole layers can do (with one stage per
    rank: the last stage holds k ≥ 1 layers plus the head, the other S − 1 stages share the
    rest, so one of them holds ⌈(L − k)/(S − 1)⌉). Pure arithmetic: runs anywhere.
(b) With two processes: a model whose output head is worth several layers trains on pp = 2
    with the even split and with the balanced one, in alternating timing rounds in the same
    run; reports the step time of even ÷ balanced beside the cost model's prediction:

    torchrun --standalone --nproc_per_node=2 benchmarks/pipeline_balance.py

Without torchrun only (a) runs. Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch.distributed as dist
from omegaconf import DictConfig

from megamoe.config import compose
from megamoe.config.choices import StageBalance
from megamoe.estimators import balance
from megamoe.models import validate_config
from megamoe.parallel import stages
from megamoe.parallel.mesh import init_grid, read_launch_env, shutdown
from megamoe.train.step import train_step
from megamoe.train.trainer import build_trainer

M32 = ["+exp=m32_2000b"]


def split_overrides(pp: int, v: int) -> list[str]:
    interleaved = ["parallel.schedule=interleaved_1f1b", f"parallel.virtual_stages={v}"] if v > 1 else []
    return [f"parallel.pp={pp}", *interleaved]


def whole_layer_bound(cfg: DictConfig, stages: int) -> float:
    """The least slowest-stage cost of any split of whole layers over ``stages`` stages (head on the last)."""
    costs, num_layers = balance.part_costs(cfg), cfg.model.num_layers
    return min(max(k * costs.layer + costs.head, math.ceil((num_layers - k) / (stages - 1)) * costs.layer)
               for k in range(1, num_layers - stages + 2))


def m32_case(pp: int, v: int) -> dict:
    """Slowest ÷ mean stage (and pipeline rank) for the even split, if there is one, and for auto."""
    case: dict = {"pp": pp, "virtual_stages": v}
    for split in ("even", "auto"):
        cfg = compose([*M32, *split_overrides(pp, v), f"parallel.stage_balance={split}"])
        if split == StageBalance.EVEN and cfg.model.num_layers % stages.num_stages(cfg):
            case[split] = None  # no even split of 24 layers
            continue
        layers = balance.stage_layers(cfg)
        costs = balance.stage_costs(cfg, layers)
        case[split] = {"layers": layers, "stage_max_over_mean": balance.imbalance(costs),
                       "rank_max_over_mean": balance.imbalance(stages.rank_totals(cfg, costs))}
    mean = sum(balance.stage_costs(cfg, layers)) / len(layers)
    case["whole_layer_bound"] = whole_layer_bound(cfg, stages.num_stages(cfg)) / mean
    return case


def m32_cases() -> dict:
    parts = balance.part_costs(compose(M32))
    print(f"M32, seq 4096, recompute full: a layer {parts.layer / 1e9:.3f} GFLOPs / token (forward, recompute, "
          f"backward), the head and loss {parts.head / 1e9:.3f} (4 × forward) = {parts.head / parts.layer:.2f} layers")
    cases = [m32_case(pp, v) for v in (1, 2) for pp in (4, 6, 8)]
    for c in cases:
        even = c["even"]
        even_text = (f"even {even['stage_max_over_mean']:.3f} (rank {even['rank_max_over_mean']:.3f})" if even
                     else "even: none (24 layers)")
        auto = c["auto"]
        print(f"pp={c['pp']} v={c['virtual_stages']}: slowest stage / mean  {even_text}  auto "
              f"{auto['stage_max_over_mean']:.3f} (rank {auto['rank_max_over_mean']:.3f}) {auto['layers']}  "
              f"whole-layer bound {c['whole_layer_bound']:.3f}")
    return {"head_in_layers": parts.head / parts.layer, "cases": cases}


# ---- (b) measured on CPU ----------------------------------------------------------------------


def heavy_head(args: argparse.Namespace, split: str) -> DictConfig:
    h = args.hidden
    return compose([
        "+exp=tiny", "parallel.pp=2", f"parallel.stage_balance={split}", f"model.num_layers={args.layers}",
        f"model.hidden_size={h}", "model.num_heads=4", f"model.head_dim={h // 4}", f"moe.ffn_hidden_size={2 * h}",
        f"model.vocab_size={args.vocab}", f"model.max_position_embeddings={max(128, args.seq_len)}",
        f"train.seq_len={args.seq_len}", "train.micro_batch=1", f"train.global_batch={args.microbatches}",
        "train.warmup_steps=1", f"train.steps={10 ** 6}",
    ])


def measured(args: argparse.Namespace, world_size: int) -> dict:
    """Step time of the even and the balanced split, alternating rounds of ``args.steps`` steps."""
    cfgs = {split: heavy_head(args, split) for split in ("even", "auto")}
    for cfg in cfgs.values():
        validate_config(cfg, world_size)
    grid = init_grid(2, 1, timeout_s=600)
    trainers = {split: build_trainer(cfg, grid) for split, cfg in cfgs.items()}
    batches = {split: iter(trainer.loader) for split, trainer in trainers.items()}
    for split, trainer in trainers.items():  # warm-up: builds each schedule
        train_step(trainer, next(batches[split]), report_routing=False)
    times: dict[str, list[float]] = {split: [] for split in trainers}
    for round_ in range(args.rounds):
        for split in sorted(trainers, reverse=round_ % 2 == 1):  # alternate the order against drift
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                train_step(trainers[split], next(batches[split]), report_routing=False)
            dist.barrier()
            times[split].append((time.perf_counter() - start) / args.steps)
    step = {split: statistics.median(t) for split, t in times.items()}
    slowest = {split: max(balance.stage_costs(cfg, balance.stage_layers(cfg))) for split, cfg in cfgs.items()}
    parts = balance.part_costs(cfgs["even"])
    result = {
        "layers": {split: balance.stage_layers(cfg) for split, cfg in cfgs.items()},
        "head_in_layers": parts.head / parts.layer,
        "step_s": step, "rounds_s": times,
        "even_over_auto_measured": step["even"] / step["auto"],
        "even_over_auto_predicted": slowest["even"] / slowest["auto"],  # 1F1B: m + pp − 1 slots of the slowest stage
    }
    if grid.rank == 0:
        print(f"pp=2 CPU, vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers (head ≈ "
              f"{result['head_in_layers']:.2f} layers): even {result['layers']['even']} {step['even']:.3f} s/step, "
              f"auto {result['layers']['auto']} {step['auto']:.3f} s/step; even ÷ auto measured "
              f"{result['even_over_auto_measured']:.2f}, predicted {result['even_over_auto_predicted']:.2f}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=24576, help="(b) vocabulary: sets the head's weight")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--microbatches", type=int, default=8, help="(b) micro-batches per step (1F1B)")
    p.add_argument("--steps", type=int, default=2, help="(b) steps per timing round")
    p.add_argument("--rounds", type=int, default=4, help="(b) timing rounds per split")
    args = p.parse_args()
    env = read_launch_env()
    figures = {"m32": m32_cases() if env.rank == 0 else None}
    if env.world_size > 1:
        try:
            figures["cpu_pp2"] = measured(args, env.world_size)
        finally:
            shutdown()
    if env.rank == 0:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
