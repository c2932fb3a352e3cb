"""Measured pipeline bubble per stage vs the 1F1B theory (p − 1) / (m + p − 1).

Run with one process per pipeline stage:

    torchrun --standalone --nproc_per_node=2 benchmarks/pipeline_bubble.py --microbatches 2 4 8

Each rank times its stage's compute (the forward and backward chunks the schedule runs)
during real training steps (``train_step``: schedule, grad sync, AdamW) and reports
idle = 1 − compute ÷ step time. The optimizer and grad sync count as idle here, so the
measured figure is an upper bound of the schedule's bubble. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch
import torch.distributed as dist

from megamoe.config import compose, validate
from megamoe.parallel.mesh import init_grid, read_launch_env, shutdown
from megamoe.train.loop import build_trainer, train_step


class ComputeClock:
    """Sums the wall time a pipeline stage spends in its forward and backward chunks.

    It wraps torch's ``PipelineStage.forward_one_chunk`` / ``backward_one_chunk`` (the units the
    schedule runs once their inputs have arrived), so waiting for neighbours counts as idle.
    Module backward hooks would not do: the first stage's inputs are token ids, which need no
    gradient, so its backward hooks fire before its backward work.
    """

    def __init__(self, stage: object) -> None:
        self.busy = 0.0
        for name in ("forward_one_chunk", "backward_one_chunk"):
            setattr(stage, name, self._timed(getattr(stage, name)))

    def _timed(self, fn: Callable) -> Callable:
        def wrapper(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.busy += time.perf_counter() - start
        return wrapper


def measure(args: argparse.Namespace, microbatches: int, world_size: int) -> list[float]:
    cfg = compose([
        "+exp=tiny", f"parallel.pp={world_size}", "model.hidden_size=128", "model.num_heads=4", "model.head_dim=32",
        f"model.num_layers={2 * world_size}", f"train.seq_len={args.seq_len}", "train.micro_batch=1",
        f"train.global_batch={microbatches}", "train.warmup_steps=1", "data=mock",
    ])
    validate(cfg, world_size)
    grid = init_grid(cfg.parallel.pp, 1, timeout_s=600)
    trainer = build_trainer(cfg, grid)
    batches = iter(trainer.loader)
    train_step(trainer, next(batches))  # warm-up; builds the schedule and its stages
    stages = getattr(trainer.schedule, "_stages", None) or [trainer.schedule._stage]
    clocks = [ComputeClock(stage) for stage in stages]
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(trainer, next(batches))
    elapsed = time.perf_counter() - start
    idle = torch.tensor([1.0 - sum(c.busy for c in clocks) / elapsed])
    gathered = [torch.zeros(1) for _ in range(world_size)]
    dist.all_gather(gathered, idle)
    return [float(g) for g in gathered]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    world_size = read_launch_env().world_size
    results = {}
    try:
        for m in args.microbatches:
            idle = measure(args, m, world_size)
            theory = (world_size - 1) / (m + world_size - 1)
            results[m] = {"measured_idle_per_stage": idle, "theory": theory}
            if dist.get_rank() == 0:
                per_stage = ", ".join(f"{x:.2f}" for x in idle)
                print(f"p={world_size} m={m:>3}: measured idle per stage [{per_stage}]  theory {theory:.2f}")
    finally:
        shutdown()
    if read_launch_env().rank == 0:
        print(json.dumps({"pp": world_size, "results": results}))


if __name__ == "__main__":
    main()
