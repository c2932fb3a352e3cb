"""What a checkpoint costs training: background (``checkpoint.async``) vs in-place saves, and
in-place save time with one writer vs two data-parallel replicas sharing the writes.

1. **Stall.** One process trains a model with a few hundred MB of state (weights + AdamW) for
   ``--steps`` steps three ways, in the same run: without checkpoints, saving in place every
   ``--interval`` steps, and saving in the background as often (``--repeats`` rounds of the
   three, alternating; the median run of each). The stall per checkpoint is the
   extra wall time over the run without checkpoints, divided by the saves. Target: background ÷
   in place ≤ 0.1.
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
from pathlib import Path

import torch

from megamoe.checkpoint.saver import CheckpointSaver
from megamoe.config import compose
from megamoe.parallel.mesh import init_grid, read_launch_env, shutdown
from megamoe.train.loop import build_trainer, train_step

MODEL = ["+exp=tiny", "model.hidden_size=256", "model.num_heads=4", "model.head_dim=64", "model.num_layers=4",
         "moe.num_experts=8", "moe.ffn_hidden_size=1024", "model.vocab_size=8192", "train.seq_len=64",
         "train.global_batch=4", "train.micro_batch=2", "train.warmup_steps=1", "data=mock"]


def state_mb(trainer: object) -> float:
    params = sum(p.numel() for p in trainer.parameters())  # type: ignore[attr-defined]
    return 16 * params / 1e6  # fp32 weights, gradients, AdamW m and v


def saves_in(steps: int, interval: int) -> list[int]:
    """The steps that save: every ``interval``-th, except where fewer than ``interval`` steps follow
    (a background write must have the time to overlap training, as it has in a real run)."""
    return list(range(interval, steps - interval + 1, interval))


def timed_run(run_dir: Path, steps: int, interval: int, mode: str) -> float:
    """Seconds for ``steps`` steps, saving at :func:`saves_in` ("none", "in_place", "background")."""
    cfg = compose([*MODEL, f"train.steps={steps}", f"run.dir={run_dir}", f"checkpoint.async={mode == 'background'}",
                   "checkpoint.keep=2"])
    grid = init_grid(1, 1, timeout_s=600)
    try:
        trainer = build_trainer(cfg, grid)
        saver, batches, saving = CheckpointSaver(trainer.state), iter(trainer.loader), saves_in(steps, interval)
        train_step(trainer, next(batches), report_expert_load=False)  # warm-up: AdamW state exists
        start = time.perf_counter()
        for _ in range(steps - 1):
            train_step(trainer, next(batches), report_expert_load=False)
            if mode != "none" and trainer.step in saving:
                saver.save()
        saver.wait()
        return time.perf_counter() - start
    finally:
        shutdown()


def stall(args: argparse.Namespace, root: Path) -> dict:
    saves, modes = len(saves_in(args.steps, args.interval)), ("none", "in_place", "background")
    runs: dict[str, list[float]] = {mode: [] for mode in modes}
    for repeat in range(args.repeats):  # alternating, so machine noise hits every mode alike
        for mode in modes:
            runs[mode].append(timed_run(root / f"{mode}_{repeat}", args.steps, args.interval, mode))
    times = {mode: statistics.median(seconds) for mode, seconds in runs.items()}
    per_save = {mode: (times[mode] - times["none"]) / saves for mode in ("in_place", "background")}
    ratio = per_save["background"] / per_save["in_place"]
    print(f"{args.steps} steps, {saves} saves {args.interval} steps apart, median of {args.repeats} runs: no saves "
          f"{times['none']:.2f} s, in place {times['in_place']:.2f} s, background {times['background']:.2f} s; stall per save in place "
          f"{per_save['in_place']:.3f} s, background {per_save['background']:.3f} s → {ratio:.3f} (target ≤ 0.1)")
    return {"seconds": times, "stall_per_save_s": per_save, "background_vs_in_place": ratio}


def save_times(run_dir: Path, repeats: int) -> list[float]:
    """Worker (under torchrun): train one step, then time ``repeats`` in-place saves."""
    env = read_launch_env()
    cfg = compose([*MODEL, "train.steps=2", f"run.dir={run_dir}", "checkpoint.keep=1"])
    grid = init_grid(1, 1, timeout_s=600)
    try:
        trainer = build_trainer(cfg, grid)
        train_step(trainer, next(iter(trainer.loader)), report_expert_load=False)
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
    parser.add_argument("--steps", type=int, default=41)
    parser.add_argument("--interval", type=int, default=10)  # long enough for a write to end before the next save
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
