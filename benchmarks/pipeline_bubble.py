"""Measured pipeline bubble per rank, for each schedule, vs its theory (megamoe.estimators.planner.bubble_slots).

Run with one process per pipeline rank:

    torchrun --standalone --nproc_per_node=2 benchmarks/pipeline_bubble.py --microbatches 4 8 16

Every schedule trains the same model (two layers per rank: one per stage where a schedule runs
two stages per rank). Each rank times its stages' compute (the forward, backward, input- and
weight-gradient chunks the schedule runs) during real training steps (``train_step``:
schedule, grad sync, AdamW) and reports idle = 1 − compute ÷ step time. The optimizer and the
grad sync count as idle here, so the measured figure is an upper bound of the schedule's
bubble. Theory: the idle share of a step of m + b slots, b = bubble_slots(schedule, pp, v, m).
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch
import torch.distributed as dist

from megamoe.config import compose
from megamoe.config.choices import Schedule
from megamoe.estimators.planner import bubble_slots
from megamoe.models import validate_config
from megamoe.parallel.mesh import init_grid, read_launch_env, shutdown
from megamoe.train.step import train_step
from megamoe.train.trainer import build_trainer

SCHEDULES = Schedule.values()
CHUNK_WORK = ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk")


class ComputeClock:
    """Sums the wall time a pipeline stage spends in its forward and backward chunks.

    It wraps torch's ``PipelineStage`` methods that the schedule runs once their inputs have
    arrived (:data:`CHUNK_WORK`: a zero-bubble schedule's weight passes run apart from the input
    passes), so waiting for neighbours counts as idle. Module backward hooks would not do: the
    first stage's inputs are token ids, which need no gradient, so its backward hooks fire
    before its backward work.
    """

    def __init__(self, stage: object) -> None:
        self.busy = 0.0
        for name in CHUNK_WORK:
            setattr(stage, name, self._timed(getattr(stage, name)))

    def _timed(self, fn: Callable) -> Callable:
        def wrapper(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.busy += time.perf_counter() - start
        return wrapper


def virtual_stages(schedule: str) -> int:
    """Two stages per rank for every schedule that can run them (the V ones must)."""
    return 1 if schedule == Schedule.ONE_F_ONE_B else 2


def measure(args: argparse.Namespace, schedule: str, microbatches: int, world_size: int) -> list[float]:
    """Each rank's idle share of ``args.steps`` timed steps (after one warm-up step)."""
    cfg = compose([
        "+exp=tiny", f"parallel.pp={world_size}", f"parallel.schedule={schedule}",
        f"parallel.virtual_stages={virtual_stages(schedule)}", "model.hidden_size=128", "model.num_heads=4",
        "model.head_dim=32", f"model.num_layers={2 * world_size}", f"train.seq_len={args.seq_len}",
        "train.micro_batch=1", f"train.global_batch={microbatches}", "train.warmup_steps=1", "data=mock",
    ])
    validate_config(cfg, world_size)
    grid = init_grid(cfg.parallel.pp, 1, timeout_s=600)
    trainer = build_trainer(cfg, grid)
    batches = iter(trainer.loader)
    train_step(trainer, next(batches))  # warm-up; builds the schedule and its stages
    train = trainer.runner.schedules.train
    clocks = [ComputeClock(stage) for stage in getattr(train, "_stages", None) or [train._stage]]
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(trainer, next(batches))
    elapsed = time.perf_counter() - start
    idle = torch.tensor([1.0 - sum(c.busy for c in clocks) / elapsed])
    gathered = [torch.zeros(1) for _ in range(world_size)]
    dist.all_gather(gathered, idle)
    return [float(g) for g in gathered]


def theory(schedule: str, pp: int, microbatches: int) -> float:
    """The idle share of a step that runs m slots of work and bubble_slots idle ones."""
    bubble = bubble_slots(schedule, pp, virtual_stages(schedule), microbatches)
    return bubble / (microbatches + bubble)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES))
    p.add_argument("--microbatches", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    world_size = read_launch_env().world_size
    results: dict[str, dict[int, dict]] = {}
    try:
        for schedule in args.schedules:
            for m in args.microbatches:
                idle, expected = measure(args, schedule, m, world_size), theory(schedule, world_size, m)
                results.setdefault(schedule, {})[m] = {"measured_idle_per_rank": idle, "theory": expected}
                if dist.get_rank() == 0:
                    per_rank = ", ".join(f"{x:.2f}" for x in idle)
                    print(f"{schedule:>23} p={world_size} m={m:>3}: measured idle per rank [{per_rank}]  "
                          f"theory {expected:.2f}", flush=True)
    finally:
        shutdown()
    if read_launch_env().rank == 0:
        print(json.dumps({"pp": world_size, "results": results}))


if __name__ == "__main__":
    main()
