"""Tokens to the same loss: Muon against AdamW on the demo corpus, and bf16 optimizer state
against fp32, per language.

Each run is the real trainer (``megamoe.train.loop.run``, one process) on the demo corpus (zh +
en, byte-level tokens; built and preprocessed first if missing) with a model a few times the
demo's (default: 4 layers, hidden 128, 4 heads of 64, 8 experts top-2 of FFN 256, Attention
Router; 16 × 128 tokens per step), validating every ``--eval-interval`` steps on each
language's held-out split. Each run keeps its run directory under ``--out``, so an
interrupted sweep resumes from its checkpoints when started again.

1. A learning-rate sweep per optimizer at seed 0 (the same lrs for both: Muon's update is
   scaled to AdamW's RMS, so AdamW's lr should carry over); the best lr is the one with the
   lowest final validation loss (mean of the languages).
2. More seeds at each optimizer's best lr.
3. Per language: AdamW's final validation loss (mean over seeds) is the target; Muon's mean
   curve reaches it after S steps (linear between validations); the figure is S ÷ AdamW's
   steps (issue 24's target: ≤ 0.75).
4. The same seeds at the best lr with ``train.optimizer_state_dtype=bf16``: the final
   validation loss against fp32 state's, with the seeds' spread as the run-to-run noise.

Writes ``--out``/optimizer_tokens.png (validation loss vs tokens, per language: both optimizers'
mean curves and each seed's) and, as its last line, one JSON object. It is a measurement, not a
test: record what it shows. Run it niced, one thread per run (it measures tokens, not time):

    nice -n 19 python -m benchmarks.optimizer_tokens --threads 1
    python -m benchmarks.optimizer_tokens --steps 4 --eval-interval 2 --lrs 3e-3 --seeds 0 \\
        --hidden 64 --out runs/optimizer_tokens_smoke                                # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Optional

import torch

from launch.demo import prepare_data
from launch.report import Run, load_run, si_label
from megamoe.config import compose
from megamoe.models import validate_config
from megamoe.train.loop import run

OPTIMIZERS = ("adamw", "muon")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the first also runs the lr sweep")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-interval", type=int, default=25)
    p.add_argument("--eval-iters", type=int, default=4, help="validation batches per language (16 × 128 tokens each)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--no-bf16-state", action="store_true", help="skip step 4")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/optimizer_tokens"))
    return p.parse_args()


def train(args: argparse.Namespace, optimizer: str, lr: float, seed: int, state_dtype: str = "fp32") -> Run:
    """One run (resumed or reused if its directory already holds it); its logged history."""
    run_dir = args.out / f"{optimizer}_{state_dtype}_lr{lr:g}_seed{seed}"
    cfg = compose([
        "+exp=demo", "parallel.pp=1", "parallel.ep=1", f"model.hidden_size={args.hidden}",
        f"model.num_layers={args.layers}", "model.num_heads=4", f"model.head_dim={args.hidden // 2}",
        f"moe.num_experts={args.experts}", f"moe.ffn_hidden_size={2 * args.hidden}", f"seed={seed}",
        f"train.optimizer={optimizer}", f"train.optimizer_state_dtype={state_dtype}", f"train.lr={lr}",
        f"train.min_lr={lr / 10}", f"train.steps={args.steps}", f"train.decay_steps={args.steps}",
        f"train.warmup_steps={min(20, args.steps)}", "train.micro_batch=16", f"train.eval_iters={args.eval_iters}",
        f"train.eval_interval={args.eval_interval}", f"train.log_interval={args.eval_interval}",
        "eval.downstream_interval=0", f"checkpoint.interval={max(args.steps // 4, 1)}", "checkpoint.keep=1",
        f"run.dir={run_dir}",
    ])
    validate_config(cfg, world_size=1)
    done = run_dir / "eval.jsonl"
    if not (done.is_file() and load_run(run_dir).evals[-1]["step"] == args.steps):
        print(f"== {run_dir.name}", flush=True)
        run(cfg)
    return load_run(run_dir)


def final_loss(history: Run) -> dict[str, float]:
    return history.evals[-1]["loss"]


def mean_curve(histories: list[Run]) -> dict[str, list[tuple[int, float]]]:
    """Per language, (step, validation loss averaged over the runs)."""
    curves = [h.validation() for h in histories]
    return {lang: [(step, statistics.mean(c[lang][i][1] for c in curves)) for i, (step, _) in enumerate(points)]
            for lang, points in curves[0].items()}


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> Optional[float]:
    """The first step at which ``curve`` is at or below ``target``, linear between its points."""
    previous: Optional[tuple[int, float]] = None
    for step, loss in curve:
        if loss <= target:
            if previous is None:
                return float(step)
            (s0, l0) = previous
            return s0 + (step - s0) * (l0 - target) / (l0 - loss)
        previous = (step, loss)
    return None


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def loss_figure(runs: dict[str, list[Run]], tokens_per_step: int) -> Any:
    """Validation loss vs tokens per language: each optimizer's seeds (thin) and their mean (markers)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    langs = sorted(runs["adamw"][0].validation())
    fig = Figure(figsize=(7.0 * len(langs), 4.0), layout="constrained")
    for i, lang in enumerate(langs):
        ax = fig.add_subplot(1, len(langs), i + 1)
        ax.grid(True, alpha=0.3)
        for color, (name, histories) in zip(("tab:blue", "tab:orange"), runs.items()):
            for h in histories:
                points = h.validation()[lang]
                ax.plot([s * tokens_per_step for s, _ in points], [v for _, v in points], color=color, lw=0.6,
                        alpha=0.4)
            mean = mean_curve(histories)[lang]
            ax.plot([s * tokens_per_step for s, _ in mean], [v for _, v in mean], color=color, marker="o", ms=3,
                    label=f"{name} (mean of {len(histories)} seeds)")
        ax.xaxis.set_major_formatter(FuncFormatter(si_label))
        ax.set(xlabel="tokens", ylabel="validation loss (nats / token)", title=f"validation: {lang}")
        ax.legend()
    return fig


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    prepare_data()
    args.out.mkdir(parents=True, exist_ok=True)
    first, *more = args.seeds
    sweep = {name: {lr: train(args, name, lr, first) for lr in args.lrs} for name in OPTIMIZERS}
    best = {name: min(args.lrs, key=lambda lr: statistics.mean(final_loss(sweep[name][lr]).values()))
            for name in OPTIMIZERS}
    runs = {name: [sweep[name][best[name]], *(train(args, name, best[name], s) for s in more)] for name in OPTIMIZERS}
    for name in OPTIMIZERS:
        cells = "  ".join(f"lr {lr:g}: " + " ".join(f"{lang} {v:.4f}" for lang, v in final_loss(h).items())
                          for lr, h in sweep[name].items())
        print(f"{name:>6} sweep (seed {first}, final validation loss): {cells}   best lr {best[name]:g}")
    targets = {lang: spread([final_loss(h)[lang] for h in runs["adamw"]]) for lang in final_loss(runs["adamw"][0])}
    muon_curve = mean_curve(runs["muon"])
    ratios = {}
    for lang, (target, noise) in targets.items():
        reached = steps_to_reach(muon_curve[lang], target)
        ratios[lang] = None if reached is None else reached / args.steps
        muon_final = spread([final_loss(h)[lang] for h in runs["muon"]])
        print(f"{lang}: AdamW final {target:.4f} ± {noise:.4f}, Muon final {muon_final[0]:.4f} ± {muon_final[1]:.4f}; "
              f"Muon reaches AdamW's final loss at step {reached if reached is None else round(reached, 1)}: "
              f"{'not within the run' if reached is None else f'{ratios[lang]:.3f}'} of AdamW's steps (target ≤ 0.75)")
    state = {}
    if not args.no_bf16_state:
        for name in OPTIMIZERS:
            bf16 = [train(args, name, best[name], s, "bf16") for s in args.seeds]
            state[name] = {lang: {"fp32": spread([final_loss(h)[lang] for h in runs[name]]),
                                  "bf16": spread([final_loss(h)[lang] for h in bf16])} for lang in targets}
            for lang, cell in state[name].items():
                (f32, f32_std), (b16, b16_std) = cell["fp32"], cell["bf16"]
                print(f"{name} {lang}: fp32 state {f32:.4f} ± {f32_std:.4f}, bf16 state {b16:.4f} ± {b16_std:.4f} "
                      f"(difference {b16 - f32:+.4f}; seed-to-seed std of fp32 state {f32_std:.4f})")
    tokens_per_step = runs["adamw"][0].tokens_at(runs["adamw"][0].steps[0]) // runs["adamw"][0].steps[0]["step"]
    figure = args.out / "optimizer_tokens.png"
    loss_figure(runs, tokens_per_step).savefig(figure, dpi=110)
    print(f"loss curves: {figure}")
    print(json.dumps({"steps": args.steps, "lrs": args.lrs, "seeds": args.seeds, "best_lr": best,
                      "sweep": {n: {f"{lr:g}": final_loss(h) for lr, h in sweep[n].items()} for n in OPTIMIZERS},
                      "adamw_final": targets, "muon_steps_ratio": ratios, "state_dtype": state,
                      "figure": str(figure)}))


if __name__ == "__main__":
    main()
