"""Training-step throughput of a MoE model vs a dense model with the same active parameters.

Both run through the real trainer (``build_trainer`` + ``train_step``: forward, backward, grad
sync, clipping, AdamW) on mock data in this process, one after the other, with interleaved
timing rounds so machine noise hits both alike. The dense baseline swaps each MoE layer for one
SwiGLU FFN of ffn = top_k × expert ffn, i.e. the MoE's active expert parameters (the router is
the only difference). Prints tokens/s of each, the time ratio MoE ÷ dense (target ≤ 1.3), and
as its last line one JSON object.

    python benchmarks/train_step.py                       # issue-5 default: tiny-shaped, wider
    python benchmarks/train_step.py --steps 1 --rounds 1  # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from omegaconf import DictConfig

from megamoe.config import compose
from megamoe.models import validate_config
from megamoe.parallel.mesh import init_grid, shutdown
from megamoe.train.step import train_step
from megamoe.train.trainer import Trainer, build_trainer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    return p.parse_args()


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model, batch and timing flags this benchmark and benchmarks/compile.py share."""
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--ffn", type=int, default=512, help="expert ffn hidden size")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--router", choices=("attention", "linear"), default="attention")


def overrides(args: argparse.Namespace, dense: bool) -> list[str]:
    common = [
        "+exp=tiny", f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}", "model.num_heads=4",
        f"model.head_dim={args.hidden // 4}", f"model.max_position_embeddings={args.seq_len}",
        f"train.seq_len={args.seq_len}", f"train.global_batch={args.batch}", f"train.micro_batch={args.batch}",
        "train.warmup_steps=1", f"moe.num_experts={args.experts}", f"moe.ffn_hidden_size={args.ffn}",
        f"moe.router={args.router}", "data=mock",
    ]
    if dense:
        return [*common, "model.ffn_type=dense", f"model.dense_ffn_hidden_size={2 * args.ffn}"]
    return common


def time_steps(trainer: Trainer, batches, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        train_step(trainer, next(batches))
    return (time.perf_counter() - start) / steps


def median_step_times(cfgs: dict[str, DictConfig], args: argparse.Namespace
                      ) -> tuple[dict[str, float], dict[str, Trainer]]:
    """Median seconds per training step of each config's trainer, after one warm-up step each,
    over ``args.rounds`` interleaved rounds of ``args.steps`` steps (one process), and the
    trainers (for what they read)."""
    for cfg in cfgs.values():
        validate_config(cfg, world_size=1)
    grid = init_grid(pp=1, ep=1, timeout_s=600)
    try:
        trainers = {name: build_trainer(cfg, grid) for name, cfg in cfgs.items()}
        batches = {name: iter(t.loader) for name, t in trainers.items()}
        for name in trainers:  # warm-up: allocator, optimizer state
            time_steps(trainers[name], batches[name], 1)
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for _ in range(args.rounds):
            for name in trainers:
                times[name].append(time_steps(trainers[name], batches[name], args.steps))
    finally:
        shutdown()
    return {name: statistics.median(t) for name, t in times.items()}, trainers


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    median, _ = median_step_times({name: compose(overrides(args, name == "dense")) for name in ("moe", "dense")},
                                  args)
    tokens = args.batch * args.seq_len
    for name, seconds in median.items():
        print(f"{name:>6}: {seconds * 1e3:8.1f} ms/step  {tokens / seconds:10,.0f} tokens/s")
    ratio = median["moe"] / median["dense"]
    print(f"MoE ÷ dense (same active parameters) step time: {ratio:.3f}  (target ≤ 1.3)")
    print(json.dumps({"moe_vs_dense_step_time": round(ratio, 4), "moe_tokens_per_s": tokens / median["moe"],
                      "dense_tokens_per_s": tokens / median["dense"], "threads": args.threads}))


if __name__ == "__main__":
    main()
