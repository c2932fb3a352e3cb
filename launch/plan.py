"""Find a layout before renting the cluster:
`python launch/plan.py +exp=m32_2000b --gpus 256 --gpu h100-80gb [--top N] [--expert-imbalance F]
[--verify N] [key=value ...]`.

Enumerates every valid (pp, dp, ep, virtual stages, schedule, micro-batch, recompute, stage
split) of the config on ``--gpus`` GPUs, estimates each one's memory per GPU (the fullest
pipeline rank) and predicts its step time (megamoe.estimators.planner states the model and what
it ignores). Prints the best layouts that fit — memory, step time, tokens/s, MFU, and days and
GPU-hours to the config's train.steps — then one line per parallel shape that never fits or is
not valid, and last one JSON object for scripts. No layout fits: exit 2, naming the smallest
memory found. Other hardware: --gpu-memory (GiB), --tflops (dense bf16 peak), --gpus-per-node,
--intra-node-gbps / --inter-node-gbps (per GPU, each way), --efficiency (share of peak the
matmuls sustain).

Memory assumes the routing of --expert-imbalance (the busiest expert's load ÷ the mean, default
1.0: balanced), and the best layout's line says the largest imbalance at which it still fits.
--verify N dry-runs the N best layouts (launch/dry_run.py: every pipeline rank's real step on
fake tensors, --jobs at once) and prints each one's measured memory next to the estimate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter, defaultdict
from typing import Optional, Sequence

from omegaconf import DictConfig

from megamoe.cli import exit_on_user_error
from megamoe.config import compose
from megamoe.config.choices import FfnType
from megamoe.errors import UserError
from megamoe.estimators.planner import GPUS, Hardware, Plan, PlanResult, Rejection, max_imbalance, plan
from megamoe.estimators.routing import ExpertLoads
from megamoe.models import validate_config


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, required=True, help="GPUs to plan for")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100-80gb", help="a known GPU (default h100-80gb)")
    parser.add_argument("--gpu-memory", type=float, help="GiB per GPU (overrides --gpu's)")
    parser.add_argument("--tflops", type=float, help="dense bf16 peak TFLOP/s per GPU")
    parser.add_argument("--gpus-per-node", type=int)
    parser.add_argument("--intra-node-gbps", type=float, help="per GPU, each way, in Gb/s (NVLink 4: 3600)")
    parser.add_argument("--inter-node-gbps", type=float, help="per GPU, each way, in Gb/s (NDR: 400)")
    parser.add_argument("--efficiency", type=float, help="share of peak the matmuls sustain (default 0.6)")
    parser.add_argument("--top", type=int, default=10, help="rows of the table (default 10)")
    parser.add_argument("--expert-imbalance", type=float, default=1.0,
                        help="the busiest expert's load ÷ the mean that memory assumes (default 1.0)")
    parser.add_argument("--verify", type=int, default=0, metavar="N", help="dry-run the N best layouts")
    parser.add_argument("--jobs", type=int, default=1, help="pipeline ranks a dry run steps at once (--verify)")
    args, overrides = parser.parse_known_args(argv)
    unknown = [arg for arg in overrides if arg.startswith("-")]
    if unknown:
        raise UserError(f"{unknown[0]}: unknown option (see --help)")
    if args.gpus < 1 or args.top < 1 or args.jobs < 1:
        raise UserError(f"--gpus, --top and --jobs must be at least 1 (got {args.gpus}, {args.top} and {args.jobs})")
    if args.verify < 0:
        raise UserError(f"--verify must be a number of layouts, 0 or more (got {args.verify})")
    return args, overrides


HARDWARE_FLAGS = {"--gpu-memory": "memory_gib", "--tflops": "peak_tflops", "--gpus-per-node": "gpus_per_node",
                  "--intra-node-gbps": "intra_node_gbps", "--inter-node-gbps": "inter_node_gbps",
                  "--efficiency": "efficiency"}


def hardware(args: argparse.Namespace) -> Hardware:
    """The named GPU with any figure the flags give replaced; a figure out of range names its flag."""
    given = {field: getattr(args, flag[2:].replace("-", "_")) for flag, field in HARDWARE_FLAGS.items()}
    for flag, field in HARDWARE_FLAGS.items():
        value = given[field]
        if value is not None and (value <= 0 or (flag == "--efficiency" and value > 1)):
            wanted = "a share of peak in (0, 1]" if flag == "--efficiency" else "positive"
            raise UserError(f"{flag} {value:g}: must be {wanted}")
    return dataclasses.replace(GPUS[args.gpu], **{k: v for k, v in given.items() if v is not None})


def why_none_is_valid(cfg: DictConfig, result: PlanResult, gpus: int) -> str:
    """When no candidate is even valid: too many GPUs for the global batch, or which rule they break."""
    batch = cfg.train.global_batch
    most_stages = max(pp for pp in range(1, cfg.model.num_layers + 1) if gpus % pp == 0)
    if gpus // most_stages > batch:  # dp = gpus / pp > the sequences a step has, even at the deepest pipeline
        return (f"{gpus} GPUs are too many for this config: with at most {most_stages} pipeline stages "
                f"(model.num_layers) every layout has more data-parallel ranks than the {batch} sequences of "
                f"train.global_batch; use fewer GPUs or raise train.global_batch")
    reasons = Counter(r.reason.removeprefix("not valid: ") for r in result.rejected)
    rule, _ = reasons.most_common(1)[0]
    return (f"{gpus} GPUs divide this config in no valid way: every layout breaks a divisibility rule, most often "
            f"{rule}; choose a GPU count whose layouts satisfy it")


def table(plans: list[Plan]) -> list[str]:
    head = (f"{'pp':>3} {'v':>2} {'schedule':<23} {'dp':>4} {'ep':>3} {'mb':>3} {'recompute':>9} "
            f"{'stage layers':<24} {'GiB':>6} {'step s':>8} {'tokens/s':>11} {'MFU':>6} {'days':>7} {'GPU-hours':>10}")
    rows = [head, "-" * len(head)]
    for p in plans:
        lay = p.layout
        rows.append(f"{lay.pp:>3} {lay.virtual_stages:>2} {lay.schedule:<23} {p.dp:>4} {lay.ep:>3} "
                    f"{lay.micro_batch:>3} {lay.recompute:>9} {','.join(map(str, p.stage_layers)):<24} "
                    f"{p.memory_gib:>6.1f} "
                    f"{p.step.total:>8.3f} {p.tokens_per_s:>11,.0f} {100 * p.mfu:>5.1f}% {p.days:>7.1f} "
                    f"{p.gpu_hours:>10,.0f}")
    return rows


def rejection_lines(result: PlanResult) -> list[str]:
    """One line per (pp, v, ep) shape none of whose micro-batch / recompute / split variants fits."""
    fitting = {(p.layout.pp, p.layout.virtual_stages, p.layout.ep) for p in result.plans}
    shapes: dict[tuple[int, int, int], list[Rejection]] = defaultdict(list)
    for r in result.rejected:
        shapes[r.layout.pp, r.layout.virtual_stages, r.layout.ep].append(r)
    lines = []
    for (pp, v, ep), rejections in sorted(shapes.items()):
        if (pp, v, ep) in fitting:
            continue
        sizes = [r.memory_gib for r in rejections if r.memory_gib is not None]
        shape = f"pp={pp}{f' v={v}' if v > 1 else ''} ep={ep}"
        if sizes:
            best = min((r for r in rejections if r.memory_gib is not None), key=lambda r: r.memory_gib)
            lines.append(f"  {shape}: out of memory in every variant (smallest {min(sizes):.1f} GiB: "
                         f"mb={best.layout.micro_batch} recompute={best.layout.recompute})")
        else:
            lines.append(f"  {shape}: {rejections[0].reason}")
    return lines


def report(cfg: DictConfig, result: PlanResult, hw: Hardware, gpus: int, top: int, imbalance: float) -> dict:
    """Print the table and the rejections; return the JSON summary."""
    t = cfg.train
    total_tokens = t.steps * t.global_batch * t.seq_len
    print(f"{gpus} × {hw.name} ({hw.memory_gib:.0f} GiB, {hw.usable_gib:.1f} usable; {hw.peak_tflops:g} TFLOP/s peak "
          f"× {hw.efficiency:g} sustained; {hw.gpus_per_node} per node, {hw.intra_node_gbps:g} / "
          f"{hw.inter_node_gbps:g} Gb/s intra / inter): {len(result.plans)} layouts fit, {len(result.rejected)} do not")
    print(f"run: {t.steps:,} steps × {t.global_batch} × {t.seq_len} tokens = {total_tokens / 1e9:,.1f}B tokens\n")
    print("\n".join(table(result.plans[:top])))
    lines = rejection_lines(result)
    if lines:
        print("\nnever fits or not valid:")
        print("\n".join(lines))
    best = result.plans[0]
    step = best.step
    print(f"\nbest: {best.layout.short()} — step {step.total:.3f} s = compute {step.compute:.3f} + bubble "
          f"{step.bubble:.3f} + all-to-all {step.all_to_all:.3f} + send/recv {step.send_recv:.3f} "
          f"+ gradient all-reduce {step.grad_reduce:.3f}"
          + (f" + Newton–Schulz {step.newton_schulz:.3f}" if step.newton_schulz else ""))
    most = max_imbalance(cfg, best.layout, gpus, hw)
    if most is not None:
        print(f"routing: memory assumes the busiest expert at {imbalance:g} × the mean load; the best layout fits up "
              f"to {most:g} × (--expert-imbalance)")
    return {**best.summary(), "gpus": gpus, "gpu": hw.name, "expert_imbalance": imbalance,
            "max_expert_imbalance": most, "top": [p.summary() for p in result.plans[:top]]}


def layout_overrides(plan_: Plan) -> list[str]:
    """The command-line overrides that select ``plan_``'s layout (its split set explicitly)."""
    def value(v: object) -> str:
        return "null" if v is None else json.dumps(v) if isinstance(v, (list, bool)) else str(v)

    return [f"{key}={value(v)}" for key, v in plan_.summary()["layout"].items()]


def verify(overrides: list[str], plans: list[Plan], hw: Hardware, gpus: int, imbalance: float, jobs: int) -> list[dict]:
    """Dry-run each of ``plans`` (megamoe.dryrun) and print its measured memory next to the estimate."""
    from megamoe.dryrun.job import dry_run  # torch and the trainer: only when asked

    rows = []
    for p in plans:
        cfg = compose([*overrides, *layout_overrides(p)])
        validate_config(cfg, world_size=gpus)
        run = dry_run(cfg, gpus, hw, imbalance, jobs)
        rows.append({"layout": p.summary()["layout"], "estimated_gib": round(p.memory_gib, 4),
                     "measured_gib": round(run.max_measured_gib, 4),
                     "estimated_over_measured": round(p.memory_gib / run.max_measured_gib, 4), "fits": run.fits})
    print(f"\nverified by dry runs (every pipeline rank's step on fake tensors, expert imbalance {imbalance:g}):")
    print(f"{'layout':<60} {'estimate GiB':>12} {'measured GiB':>12} {'est/meas':>8}  fits")
    for p, row in zip(plans, rows):
        print(f"{p.layout.short():<60} {row['estimated_gib']:>12.2f} {row['measured_gib']:>12.2f} "
              f"{row['estimated_over_measured']:>8.3f}  {'yes' if row['fits'] else 'NO'}")
    return rows


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> dict:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = compose(overrides)
    validate_config(cfg)
    hw = hardware(args)
    if cfg.model.ffn_type == FfnType.MOE:
        ExpertLoads.of(cfg.moe, args.expert_imbalance)  # a UserError naming the flag when impossible
    result = plan(cfg, args.gpus, hw, args.expert_imbalance)
    if not result.plans:
        sizes = [r.memory_gib for r in result.rejected if r.memory_gib is not None]
        if not sizes:
            raise UserError(f"no valid layout: {why_none_is_valid(cfg, result, args.gpus)}")
        raise UserError(f"no layout of {args.gpus} × {hw.name} fits ({hw.usable_gib:.1f} GiB usable): the smallest "
                        f"needs {min(sizes):.1f} GiB per GPU; add GPUs or choose larger ones")
    summary = report(cfg, result, hw, args.gpus, args.top, args.expert_imbalance)
    if args.verify:
        summary["verified"] = verify(overrides, result.plans[:args.verify], hw, args.gpus, args.expert_imbalance,
                                     args.jobs)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
