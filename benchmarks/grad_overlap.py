"""Exposed gradient communication with and without parallel.overlap_grad_reduce, at dp = 2.

    torchrun --standalone --nproc_per_node=2 benchmarks/grad_overlap.py
    torchrun --standalone --nproc_per_node=2 benchmarks/grad_overlap.py --steps 1 --rounds 1 --hidden 64  # smoke

Two trainers on the same data-parallel grid, one overlapping the gradient all-reduce with the
last micro-batch's backward and one reducing after it, alternate timing rounds. "Exposed" is the
time a step waits in GradSync.finish — the reduction the backward did not hide; the step time
is the whole optimizer step. Rank 0 prints both, the ratios overlapped ÷ plain, and as its last
line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Iterator

import torch

from megamoe.config import compose, validate
from megamoe.parallel.mesh import init_grid, shutdown
from megamoe.train.step import train_step
from megamoe.train.trainer import Trainer, build_trainer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batches", type=int, default=2, help="per rank and step")
    p.add_argument("--bucket-mb", type=float, default=4.0)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    return p.parse_args()


def config(args: argparse.Namespace, overlap: bool) -> list[str]:
    return ["+exp=tiny", f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}", "model.num_heads=8",
            f"model.head_dim={args.hidden // 8}", f"model.max_position_embeddings={args.seq_len}",
            f"train.seq_len={args.seq_len}", f"train.global_batch={2 * args.micro_batches}", "train.micro_batch=1",
            "train.warmup_steps=1", f"moe.num_experts={args.experts}", f"moe.ffn_hidden_size={2 * args.hidden}",
            "data=mock", f"parallel.grad_bucket_mb={args.bucket_mb}", f"parallel.overlap_grad_reduce={overlap}"]


class Timed:
    """Wraps a trainer's GradSync.finish to add up the seconds a step waits in it."""

    def __init__(self, trainer: Trainer) -> None:
        self.waited, finish = 0.0, trainer.grad_sync.finish

        def timed_finish() -> None:
            started = time.perf_counter()
            finish()
            self.waited += time.perf_counter() - started

        trainer.grad_sync.finish = timed_finish  # type: ignore[method-assign]


def run(trainer: Trainer, timer: Timed, batches: Iterator, steps: int) -> tuple[float, float]:
    """(seconds per step, seconds exposed per step) over ``steps`` steps."""
    timer.waited = 0.0
    started = time.perf_counter()
    for _ in range(steps):
        train_step(trainer, next(batches), report_routing=False)
    return (time.perf_counter() - started) / steps, timer.waited / steps


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    cfgs = {name: compose(config(args, name == "overlap")) for name in ("overlap", "plain")}
    for cfg in cfgs.values():
        validate(cfg, world_size=int(os.environ.get("WORLD_SIZE", 1)))
    grid = init_grid(pp=1, ep=1, timeout_s=600)
    try:
        trainers = {name: build_trainer(cfg, grid) for name, cfg in cfgs.items()}
        timers = {name: Timed(t) for name, t in trainers.items()}
        batches = {name: iter(t.loader) for name, t in trainers.items()}
        for name in trainers:
            run(trainers[name], timers[name], batches[name], 1)  # warm-up
        step: dict[str, list[float]] = {name: [] for name in trainers}
        exposed: dict[str, list[float]] = {name: [] for name in trainers}
        for _ in range(args.rounds):
            for name in trainers:
                seconds, waited = run(trainers[name], timers[name], batches[name], args.steps)
                step[name].append(seconds)
                exposed[name].append(waited)
        grad_mb = sum(p.numel() for p in trainers["plain"].parameters()) * 4 / 2**20
    finally:
        shutdown()
    if grid.rank != 0:
        return
    med = {name: (statistics.median(step[name]), statistics.median(exposed[name])) for name in trainers}
    for name, (seconds, waited) in med.items():
        print(f"{name:>8}: {seconds * 1e3:8.1f} ms/step, {waited * 1e3:7.1f} ms exposed gradient communication")
    exposed_ratio = med["overlap"][1] / med["plain"][1]
    step_ratio = med["overlap"][0] / med["plain"][0]
    print(f"{grad_mb:.1f} MiB of gradients in {args.bucket_mb} MiB buckets, dp = 2: exposed communication "
          f"overlapped ÷ plain {exposed_ratio:.3f}, step time {step_ratio:.3f}")
    print(json.dumps({"exposed_comm_overlap_vs_plain": round(exposed_ratio, 4), "step_time_overlap_vs_plain":
                      round(step_ratio, 4), "exposed_ms": {n: round(m[1] * 1e3, 2) for n, m in med.items()},
                      "step_ms": {n: round(m[0] * 1e3, 1) for n, m in med.items()}, "grad_mib": round(grad_mb, 1)}))


if __name__ == "__main__":
    main()
