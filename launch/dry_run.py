"""Run the real training step of every pipeline rank at full scale, on fake tensors, before renting the GPUs:
`python launch/dry_run.py +exp=m32_2000b --world-size 256 [--gpu h100-80gb | --gpu-memory GIB]
[--expert-imbalance F] [--jobs N] [key=value ...]`.

Builds the model of each distinct pipeline rank (data-parallel rank 0 of each: one process per
stage, not one per GPU) on fake tensors — shapes, dtypes and devices, no memory — and runs one
training step with the trainer's own code: the configured pipeline schedule with every
micro-batch in flight, the MoE dispatch through the expert-parallel all-to-all, the gradient
sync with its buckets and overlap, clipping, AdamW, and the host snapshot of a background
checkpoint (checkpoint.async). It models a CUDA GPU's step: bf16 compute, fp32 master weights
and router, grouped-GEMM experts. Routing is data fake tensors do not have: --expert-imbalance
(the busiest expert's load ÷ the mean, default 1.0) sets the routing the step assumes.

Prints, per pipeline rank, the measured peak by kind, the estimator's figure for the same rank
and their ratio, and the step's largest tensor; then any tensor of 2^31 elements or more (a
32-bit index would overflow on it) and whether the fullest rank fits the GPU with the reserve
the planner keeps for the CUDA context and NCCL; last, one JSON object. A layout that cannot be
built is one `error:` line, exit 2. What this proves and what it does not: docs/dry_run.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional, Sequence

from megamoe.cli import exit_on_user_error
from megamoe.config import compose, validate
from megamoe.errors import UserError
from megamoe.estimators.memory import grid_shape
from megamoe.estimators.planner import GPUS, Hardware

KIND_COLUMNS = {"weights": "weights", "gradients": "grads", "optimizer": "optim", "weight_copies": "copies",
                "persistent_buffers": "kept", "activations": "activ", "temporaries": "temps"}


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, help="GPUs of the job (default: the fewest the config allows)")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100-80gb", help="a known GPU (default h100-80gb)")
    parser.add_argument("--gpu-memory", type=float, help="GiB per GPU (overrides --gpu's)")
    parser.add_argument("--expert-imbalance", type=float, default=1.0,
                        help="the busiest expert's load ÷ the mean that the fake routing assumes (default 1.0)")
    parser.add_argument("--jobs", type=int, default=1, help="pipeline ranks stepped at once, one process each")
    args, overrides = parser.parse_known_args(argv)
    unknown = [arg for arg in overrides if arg.startswith("-")]
    if unknown:
        raise UserError(f"{unknown[0]}: unknown option (see --help)")
    if (args.world_size is not None and args.world_size < 1) or args.jobs < 1:
        raise UserError(f"--world-size and --jobs must be at least 1 (got {args.world_size} and {args.jobs})")
    return args, overrides


def hardware(name: str, memory_gib: Optional[float]) -> Hardware:
    """The planner's GPU ``name``, with ``memory_gib`` instead of its memory when given."""
    if memory_gib is not None and memory_gib <= 0:
        raise UserError(f"--gpu-memory must be positive (got {memory_gib:g})")
    return GPUS[name] if memory_gib is None else dataclasses.replace(GPUS[name], memory_gib=memory_gib)


def report(summary: dict) -> list[str]:
    """The human-readable lines of a dry run's JSON summary (MiB for a job that needs less than 1 GiB)."""
    lay, ranks = summary["layout"], summary["ranks"]
    unit, scale = ("GiB", 1) if summary["max_measured_gib"] >= 1 else ("MiB", 1024)
    chunks = f" × {lay['virtual_stages']} virtual stages" if lay["virtual_stages"] > 1 else ""
    lines = [
        f"dry run on {summary['world_size']} GPUs: pp {lay['pp']}{chunks} ({lay['schedule']}) × dp {lay['dp']}, "
        f"ep {lay['ep']}; micro-batch {lay['micro_batch']}, recompute {lay['activation_checkpointing']}, "
        f"layers per stage {','.join(map(str, lay['layers_per_stage']))}",
        f"modelled: a {summary['models'].upper()} GPU's step ({summary['precision']} compute, fp32 master weights and "
        f"router{', grouped-GEMM experts' if summary['grouped_gemm'] else ''}) on CPU fake tensors; routing assumes "
        f"the busiest expert at {summary['expert_imbalance']:g} × the mean load (--expert-imbalance)",
        "",
        f"{'pp rank':>7} {'measured':>9} {'estimate':>9} {'est/meas':>8}  "
        + " ".join(f"{label:>7}" for label in KIND_COLUMNS.values()) + f"   ({unit})",
    ]
    for rank in ranks:
        kinds = " ".join(f"{scale * rank['by_kind'][kind]:>7.2f}" for kind in KIND_COLUMNS)
        lines.append(f"{rank['pp_rank']:>7} {scale * rank['measured_gib']:>9.2f} {scale * rank['estimated_gib']:>9.2f} "
                     f"{rank['estimated_over_measured']:>8.3f}  {kinds}")
    lines += ["", "the largest tensor of each rank's step:"]
    lines += [f"  pp rank {rank['pp_rank']}: {_tensor(rank['largest_tensor'], unit, scale)}" for rank in ranks]
    fullest = max(ranks, key=lambda rank: rank["measured_gib"])
    lines.append(f"held at the peak of the fullest rank (pp rank {fullest['pp_rank']}) besides weights, gradients "
                 "and optimizer state:")
    lines += [f"  {held['kind']:<18} {_tensor(held, unit, scale)}" for held in fullest["at_peak"]]
    snapshots = [rank["host_snapshot_gib"] for rank in ranks if rank["host_snapshot_gib"] is not None]
    if snapshots:
        lines.append(f"background checkpoint: its snapshot takes up to {scale * max(snapshots):.2f} {unit} of host "
                     "memory per GPU")
    wide = sorted({line for rank in ranks for line in rank["tensors_beyond_int32"]})
    lines.append(f"tensors of 2^31 elements or more: {len(wide) or 'none'}")
    lines += [f"  {line}" for line in wide]
    verdict = "fits" if summary["fits"] else "does NOT fit"
    lines.append(f"{verdict}: the fullest rank needs {summary['max_measured_gib']:.2f} GiB of the "
                 f"{summary['usable_gib']:.2f} GiB a layout may use on {summary['gpu']} ({summary['gpu_memory_gib']:g} "
                 "GiB; the rest is kept for the CUDA context, NCCL and fragmentation); "
                 f"took {summary['seconds']:.0f} s")
    return lines


def _tensor(tensor: dict, unit: str, scale: int) -> str:
    return f"{tensor['op']} → {tensor['shape']} {tensor['dtype']} ({scale * tensor['gib']:.2f} {unit})"


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> dict:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    hw = hardware(args.gpu, args.gpu_memory)
    cfg = compose(overrides)
    world_size = grid_shape(cfg, args.world_size).world_size if args.world_size is None else args.world_size
    validate(cfg, world_size=world_size)
    from megamoe.dryrun.job import dry_run  # torch and the trainer, once the config is known to be good

    summary = dry_run(cfg, world_size, hw, args.expert_imbalance, min(args.jobs, os.cpu_count() or 1)).summary()
    print("\n".join(report(summary)))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
