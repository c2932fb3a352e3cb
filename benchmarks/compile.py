"""Training-step time with train.compile=block ÷ eager, on this machine, in one process.

Both trainers run the same model and mock data through the real loop (``build_trainer`` +
``train_step``); the compiled one is warmed up first (its compile time is reported on its own,
not mixed into the step time), then timing rounds alternate so machine noise hits both alike.
Prints ms/step of each, the ratio compiled ÷ eager (below 1 = faster), and as its last line
one JSON object.

    python -m benchmarks.compile --threads 2
    python -m benchmarks.compile --steps 1 --rounds 1 --hidden 64 --seq-len 32  # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.train_step import add_model_arguments, overrides, time_steps
from megamoe.config import compose, validate
from megamoe.parallel.mesh import init_grid, shutdown
from megamoe.train.trainer import build_trainer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--dense", action="store_true", help="a dense FFN instead of the MoE layer (all of it compiles)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    base = overrides(args, dense=args.dense)
    cfgs = {mode: compose([*base, f"train.compile={mode}"]) for mode in ("none", "block")}
    for cfg in cfgs.values():
        validate(cfg, world_size=1)
    grid = init_grid(pp=1, ep=1, timeout_s=600)
    try:
        trainers = {mode: build_trainer(cfg, grid) for mode, cfg in cfgs.items()}
        batches = {mode: iter(t.loader) for mode, t in trainers.items()}
        warmup = {}
        for mode in trainers:  # the first steps compile (forward, backward) and warm the allocator
            started = time.perf_counter()
            time_steps(trainers[mode], batches[mode], 2)
            warmup[mode] = time.perf_counter() - started
        times: dict[str, list[float]] = {mode: [] for mode in trainers}
        for _ in range(args.rounds):
            for mode in trainers:
                times[mode].append(time_steps(trainers[mode], batches[mode], args.steps))
    finally:
        shutdown()
    median = {mode: statistics.median(t) for mode, t in times.items()}
    for mode, seconds in median.items():
        print(f"compile={mode:>5}: {seconds * 1e3:8.1f} ms/step  (first 2 steps {warmup[mode]:.1f} s)")
    ratio = median["block"] / median["none"]
    print(f"compiled ÷ eager step time: {ratio:.3f}  ({'MoE' if not args.dense else 'dense'} model, "
          f"{args.threads} threads)")
    print(json.dumps({"compiled_vs_eager_step_time": round(ratio, 4), "eager_ms": median["none"] * 1e3,
                      "compiled_ms": median["block"] * 1e3, "compile_warmup_s": round(warmup["block"], 1),
                      "model": "dense" if args.dense else "moe", "threads": args.threads}))


if __name__ == "__main__":
    main()
