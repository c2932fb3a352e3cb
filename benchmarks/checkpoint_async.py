"""What a checkpoint costs training: background (``checkpoint.async``) vs in-place saves, and
in-place save time with one writer vs two data-parallel replicas sharing the writes.

1. **Stall.** One process trains a model with a few hundred MB of state (weights + AdamW) for
   ``--steps`` steps, saving every ``--interval`` steps, in place and in the background
   (``--repeats`` runs of each, alternating). A save's stall is the time its call holds training
   up (the snapshot; in place, the whole save). Its interference is what the steps that ran while
   it was written, and the step after, took over the median of the 5 steps before it — measured
   inside one run, because on a shared VM whole runs differ by more than a save costs. A run's
   first background save also allocates the host buffers every later save reuses: it is
   reported on its own, not in the medians. Target: stall background ÷ in place ≤ 0.1; the
   ratio with interference added is printed next to it.
2. **Shared writes.** The same state saved in place by 1 process and by 2 (dp 2: each replica
   writes half), each under torchrun, median of ``--repeats`` saves.

    python benchmarks/checkpoint_async.py            # ~4 minutes on 2 cores
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megamoe.checkpoint.saver import CheckpointSaver
from megamoe.config import compose
from megamoe.parallel.mesh import init_grid, read_launch_env, shutdown
from megamoe.train.step import train_step
from megamoe.train.trainer import build_trainer

MODEL = ["+exp=tiny", "model.hidden_size=256", "model.num_heads=4", "model.head_dim=64", "model.num_layers=4",
         "moe.num_experts=8", "moe.ffn_hidden_size=1024", "model.vocab_size=8192", "train.seq_len=64",
         "train.global_batch=4", "train.micro_batch=2", "train.warmup_steps=1", "data=mock"]
BASELINE_STEPS = 5  # the undisturbed steps before a save that say what a step takes


def state_mb(trainer: object) -> float:
    params = sum(p.numel() for p in trainer.parameters())  # type: ignore[attr-defined]
    return 16 * params / 1e6  # fp32 weights, gradients, AdamW m and v


@dataclass
class Save:
    """One save as the run saw it."""

    before: int  # steps done when it began
    call_s: float  # seconds its call held training up
    disturbed: Optional[int] = None  # steps that ran alongside its write, and the step after; None while writing


def stalls(run_dir: Path, steps: int, interval: int, background: bool) -> list[tuple[float, float]]:
    """Each save's (stall, interference) — module docstring — in a run of ``steps`` steps saving
    every ``interval``."""
    cfg = compose([*MODEL, f"train.steps={steps}", f"run.dir={run_dir}", f"checkpoint.async={background}",
                   "checkpoint.keep=2"])
    grid = init_grid(1, 1, timeout_s=600)
    try:
        trainer = build_trainer(cfg, grid)
        saver, batches = CheckpointSaver(trainer.state), iter(trainer.loader)
        step_s: list[float] = []
        saves: list[Save] = []
        for _ in range(steps):
            if saves and saves[-1].disturbed is None and not saver.writing:  # its write ended: the steps
                saves[-1].disturbed = len(step_s) - saves[-1].before + 1  # since ran alongside it; this one is after
            start = time.perf_counter()
            train_step(trainer, next(batches), report_routing=False)
            step_s.append(time.perf_counter() - start)
            if trainer.step % interval == 0 and trainer.step + BASELINE_STEPS < steps:
                start = time.perf_counter()
                saver.save()
                saves.append(Save(len(step_s), time.perf_counter() - start))
        start = time.perf_counter()
        saver.wait()
        if saves[-1].disturbed is None:  # its write outlasted the run: every step after it, and the wait
            saves[-1].call_s += time.perf_counter() - start
            saves[-1].disturbed = len(step_s) - saves[-1].before
        result = []
        for save in saves:
            usual = statistics.median(step_s[save.before - BASELINE_STEPS:save.before])
            result.append((save.call_s, sum(t - usual for t in step_s[save.before:save.before + save.disturbed])))
        return result
    finally:
        shutdown()


def stall(args: argparse.Namespace, root: Path) -> dict:
    runs: dict[str, list[list[tuple[float, float]]]] = {"in_place": [], "background": []}
    for repeat in range(args.repeats):  # alternating, so machine noise hits both alike
        for mode in runs:
            runs[mode].append(stalls(root / f"{mode}_{repeat}", args.steps, args.interval, mode == "background"))
    # each run's first left out
    later = {mode: [save for run in saves for save in run[1:]] for mode, saves in runs.items()}
    held = {mode: statistics.median(s for s, _ in saves) for mode, saves in later.items()}
    with_interference = {mode: statistics.median(s + i for s, i in saves) for mode, saves in later.items()}
    first = statistics.median(sum(run[0]) for run in runs["background"])
    ratio = held["background"] / held["in_place"]
    ratio_with = with_interference["background"] / with_interference["in_place"]
    print(f"per save, median of {len(later['background'])} (each run's first left out): stall in place "
          f"{held['in_place']:.3f} s, background {held['background']:.3f} s → {ratio:.3f} (target ≤ 0.1); with "
          f"interference {with_interference['in_place']:.3f} s and {with_interference['background']:.3f} s → "
          f"{ratio_with:.3f}; a run's first background save (fresh host buffers) {first:.3f} s with interference")
    return {"stall_s": held, "background_vs_in_place": ratio, "with_interference_s": with_interference,
            "with_interference_background_vs_in_place": ratio_with, "first_background_save_s": first,
            "saves_s": runs}


def save_times(run_dir: Path, repeats: int) -> list[float]:
    """Worker (under torchrun): train one step, then time ``repeats`` in-place saves."""
    env = read_launch_env()
    cfg = compose([*MODEL, "train.steps=2", f"run.dir={run_dir}", "checkpoint.keep=1"])
    grid = init_grid(1, 1, timeout_s=600)
    try:
        trainer = build_trainer(cfg, grid)
        train_step(trainer, next(iter(trainer.loader)), report_routing=False)
        saver, times = CheckpointSaver(trainer.state), []
        for _ in range(repeats):
            if env.world_size > 1:
                torch.distributed.barrier()  # both replicas start together
            start = time.perf_counter()
            saver.save()
            times.append(time.perf_counter() - start)
        if env.rank == 0:
            print(json.dumps({"state_mb": state_mb(trainer), "save_s": times}))
        return times
    finally:
        shutdown()


def shared_writes(args: argparse.Namespace, root: Path) -> dict:
    medians = {}
    for nproc in (1, 2):
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={nproc}",
               __file__, "--save-times", str(root / f"dp{nproc}"), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
        result = json.loads(out.strip().splitlines()[-1])
        medians[f"dp{nproc}"] = statistics.median(result["save_s"])
    ratio = medians["dp2"] / medians["dp1"]
    print(f"in-place save of {result['state_mb']:.0f} MB: dp 1 {medians['dp1']:.2f} s, dp 2 {medians['dp2']:.2f} s "
          f"(each replica writes half) → {ratio:.2f}")
    return {"state_mb": result["state_mb"], "save_s": medians, "dp2_vs_dp1": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=73)
    parser.add_argument("--interval", type=int, default=12)  # long enough for a write to end before the next save
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--save-times", type=Path, help=argparse.SUPPRESS)  # the torchrun worker's mode
    args = parser.parse_args()
    if args.save_times is not None:
        save_times(args.save_times, args.repeats)
        return
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        root = Path(tmp)
        result = {"stall": stall(args, root), "shared_writes": shared_writes(args, root)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
