"""The paper's central claim at small scale: Attention Router vs the classical linear router.

Trains the demo config (tiny Yuan MoE, byte-level demo corpus, zh + en) in one process for each
router and seed, on the same tokens in the same order, and reports the final validation loss
per language (mean ± std over seeds) and the expert-load balance (max / min fraction relative
to uniform, and the coefficient of variation of per-expert token counts, averaged over layers
and the last 20 steps). The demo corpus is built and preprocessed first if missing.

    python -m benchmarks.router_ablation                       # 3 seeds × {attention, linear}
    python -m benchmarks.router_ablation --routers attention linear noisy --seeds 0 1 2 3 4
    python -m benchmarks.router_ablation --routers attention linear attention_ec linear_ec
    python -m benchmarks.router_ablation --steps 5 --seeds 0   # smoke run

``*_ec``: the same router with expert-choice routing (``moe.router_mode=expert_choice``, capacity
T · k / N: the compute of top-k). Its load is even by construction (load CV 0), and its validation
loss is not a causal model's: each expert ranks the whole micro-batch, so a token's routing
depends on the tokens after it.

It is a benchmark, not a test: the result is whatever it shows; record it as it is.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from launch.demo import prepare_data
from megamoe.config import compose, validate
from megamoe.parallel.mesh import init_grid, shutdown
from megamoe.train.step import train_step, validation_loss
from megamoe.train.trainer import build_trainer

ROUTERS = {
    "attention": ["moe.router=attention"],
    "linear": ["moe.router=linear"],
    "noisy": ["moe.router=linear", "moe.noisy_gating=true"],
    "attention_ec": ["moe.router=attention", "moe.router_mode=expert_choice"],
    "linear_ec": ["moe.router=linear", "moe.router_mode=expert_choice"],
}
BALANCE_WINDOW = 20  # last steps whose expert counts define the balance figures


def load_balance(counts: list[dict[int, torch.Tensor]]) -> dict[str, float]:
    """max/min expert fraction relative to uniform and the coefficient of variation, averaged."""
    rows = [c.double() / c.sum() for step in counts for c in step.values()]
    num_experts = rows[0].numel()
    return {
        "max_load": statistics.mean(float(r.max() * num_experts) for r in rows),
        "min_load": statistics.mean(float(r.min() * num_experts) for r in rows),
        "cv": statistics.mean(float(r.std() / r.mean()) for r in rows),
    }


def train_one(router: str, seed: int, steps: int, threads: int) -> dict:
    overrides = ["+exp=demo", "parallel.pp=1", "parallel.ep=1", f"seed={seed}", f"train.steps={steps}",
                 "train.decay_steps=" + str(steps), "train.eval_iters=4", *ROUTERS[router]]
    cfg = compose(overrides)
    if cfg.train.warmup_steps > steps:  # a smoke run ends before the demo's warmup would
        cfg = compose([*overrides, f"train.warmup_steps={steps}"])
    validate(cfg, world_size=1)
    torch.set_num_threads(threads)
    grid = init_grid(pp=1, ep=1, timeout_s=600)
    try:
        trainer = build_trainer(cfg, grid)
        batches = iter(trainer.loader)
        counts, start = [], time.perf_counter()
        for step in range(steps):
            result = train_step(trainer, next(batches))
            if step >= steps - BALANCE_WINDOW:
                counts.append({i: layer.tokens_per_expert for i, layer in result.routing.items()})
        elapsed = time.perf_counter() - start
        return {"router": router, "seed": seed, "train_loss": result.loss, "valid": validation_loss(trainer),
                "balance": load_balance(counts), "seconds": elapsed}
    finally:
        shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--routers", nargs="+", choices=tuple(ROUTERS), default=["attention", "linear"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    prepare_data()
    runs = []
    for router in args.routers:
        for seed in args.seeds:
            run = train_one(router, seed, args.steps, args.threads)
            runs.append(run)
            print(f"{router:>12} seed {seed}: train {run['train_loss']:.4f}  "
                  + "  ".join(f"val[{k}] {v:.4f}" for k, v in run["valid"].items())
                  + f"  max/min load {run['balance']['max_load']:.2f}/{run['balance']['min_load']:.2f}"
                  + f"  ({run['seconds']:.0f} s)", flush=True)
    summary = {}
    for router in args.routers:
        mine = [r for r in runs if r["router"] == router]
        valid = {lang: (statistics.mean(r["valid"][lang] for r in mine),
                        statistics.stdev(r["valid"][lang] for r in mine) if len(mine) > 1 else 0.0)
                 for lang in mine[0]["valid"]}
        cv = statistics.mean(r["balance"]["cv"] for r in mine)
        summary[router] = {"valid": valid, "load_cv": cv}
        cells = "  ".join(f"val[{lang}] {m:.4f} ± {s:.4f}" for lang, (m, s) in valid.items())
        print(f"{router:>12}: {cells}  load CV {cv:.3f}  (n={len(mine)})")
    print(json.dumps({"steps": args.steps, "seeds": args.seeds, "summary": summary, "runs": runs}))


if __name__ == "__main__":
    main()
