"""Plots and a summary of a training run: `python launch/report.py RUN_DIR`.

Reads what the trainer wrote into RUN_DIR — metrics.jsonl (one JSON object per step),
eval.jsonl (validation loss per data source, if the run had validation data), downstream.jsonl
(downstream task metrics, if eval.downstream_interval was set) and config.yaml (train.seq_len:
tokens = consumed_samples × seq_len) — and writes into RUN_DIR/report/:

  loss.png            training loss and each source's (language's) validation loss vs tokens
  lr.png              learning rate vs step
  grad_norm.png       gradient norm vs step (log scale; skipped updates marked)
  tokens_per_s.png    throughput vs step
  expert_load.png     per MoE layer, the fraction of tokens each expert got over time, and the
                      most / least loaded expert relative to a uniform share
  expert_load_last.png  layer × expert at the last snapshot (what wandb gets at every snapshot)
  downstream.png      each downstream task's metrics (accuracy, exact match) vs step
  summary.md          steps, tokens, first / last loss, best validation loss per source, mean
                      tokens/s, expert-load balance, downstream scores, and the figures

Works on a run still in progress: an unfinished last line of a .jsonl file is left out.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from megamoe.cli import exit_on_user_error
from megamoe.errors import UserError
from megamoe.train.metrics import expert_load_figure

Record = dict[str, Any]


def read_jsonl(path: Path) -> list[Record]:
    """The JSON objects of ``path``, one per line; an unterminated last line (a write in progress) is skipped."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    complete = lines if text.endswith("\n") else lines[:-1]
    records = []
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise UserError(f"{path}:{number}: not a JSON object ({exc}); the trainer writes one per line") from None
        if not isinstance(record, dict) or "step" not in record:
            raise UserError(f"{path}:{number}: a record needs a \"step\" key")
        records.append(record)
    return records


@dataclass
class Run:
    """One run's logged history, as the figures and the summary use it."""

    run_dir: Path
    seq_len: int
    steps: list[Record]  # metrics.jsonl
    evals: list[Record] = field(default_factory=list)  # eval.jsonl
    downstream: list[Record] = field(default_factory=list)  # downstream.jsonl

    def tokens_at(self, record: Record) -> int:
        return record["consumed_samples"] * self.seq_len

    def tokens_at_step(self, step: int) -> Optional[int]:
        """Tokens consumed when ``step`` ended (None if that step is not in metrics.jsonl)."""
        return next((self.tokens_at(r) for r in self.steps if r["step"] == step), None)

    @property
    def load_snapshots(self) -> list[Record]:
        """The steps that logged the expert load (every train.log_interval steps)."""
        return [r for r in self.steps if r.get("expert_fraction")]

    def validation(self) -> dict[str, list[tuple[int, float]]]:
        """(step, loss) per data source, in step order."""
        by_source: dict[str, list[tuple[int, float]]] = {}
        for record in self.evals:
            for source, loss in record["loss"].items():
                by_source.setdefault(source, []).append((record["step"], loss))
        return by_source

    def scores(self) -> dict[tuple[str, str], list[tuple[int, float]]]:
        """(step, value) per downstream (task, metric), in step order."""
        series: dict[tuple[str, str], list[tuple[int, float]]] = {}
        for record in self.downstream:
            for task, metrics in record["tasks"].items():
                for metric, value in metrics.items():
                    series.setdefault((task, metric), []).append((record["step"], value))
        return series


def load_run(run_dir: Path) -> Run:
    """Read RUN_DIR; every problem is one line naming the file."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory (pass the run.dir of a training run)")
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{metrics}: missing; is {run_dir} the run.dir of a training run that has done a step?")
    steps = read_jsonl(metrics)
    if not steps:
        raise UserError(f"{metrics}: empty, no step was logged yet")
    missing = {"loss", "consumed_samples"} - set(steps[0])
    if missing:
        raise UserError(f"{metrics}:1: no {', '.join(sorted(missing))} (not a megamoe metrics file?)")
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise UserError(f"{config}: missing; it gives train.seq_len, which turns consumed samples into tokens")
    seq_len = OmegaConf.load(config).train.seq_len
    evals, downstream = run_dir / "eval.jsonl", run_dir / "downstream.jsonl"
    return Run(run_dir, seq_len, steps, read_jsonl(evals) if evals.is_file() else [],
               read_jsonl(downstream) if downstream.is_file() else [])


# ---- figures ---------------------------------------------------------------------------------


def _figure(width: float = 7.0, height: float = 4.0) -> tuple[Any, Any]:
    """A pyplot-free matplotlib figure (rendered by Agg when saved) and its one axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, alpha=0.3)
    return fig, ax


def si_label(value: float, _position: object = None) -> str:
    """Axis labels for token counts: 1.5M, 2B."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def loss_figure(run: Run) -> Any:
    from matplotlib.ticker import FuncFormatter

    fig, ax = _figure()
    ax.plot([run.tokens_at(r) for r in run.steps], [r["loss"] for r in run.steps], lw=1, label="train")
    for source, points in run.validation().items():
        at = [(run.tokens_at_step(step), loss) for step, loss in points]
        at = [(tokens, loss) for tokens, loss in at if tokens is not None]
        ax.plot([t for t, _ in at], [loss for _, loss in at], marker="o", ms=4, label=f"validation: {source}")
    ax.xaxis.set_major_formatter(FuncFormatter(si_label))
    ax.set(xlabel="tokens", ylabel="loss (nats / token)", title="loss")
    ax.legend()
    return fig


def series_figure(run: Run, key: str, label: str, log: bool = False) -> Any:
    """``key`` of every step vs step; skipped updates are marked."""
    fig, ax = _figure()
    ax.plot([r["step"] for r in run.steps], [r[key] for r in run.steps], lw=1)
    skipped = [r for r in run.steps if r.get("skipped")]
    if skipped:
        ax.scatter([r["step"] for r in skipped], [0 if not math.isfinite(r[key]) else r[key] for r in skipped],
                   marker="x", color="red", zorder=3, label="skipped update")
        ax.legend()
    if log:
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel=label, title=label)
    return fig


def _edges(steps: list[int]) -> list[float]:
    """Cell boundaries around each snapshot step, halfway to its neighbours."""
    if len(steps) == 1:
        return [steps[0] - 0.5, steps[0] + 0.5]
    mids = [(a + b) / 2 for a, b in zip(steps, steps[1:])]
    return [2 * steps[0] - mids[0], *mids, 2 * steps[-1] - mids[-1]]


def expert_load_over_time_figure(run: Run) -> Any:
    """One heatmap per MoE layer (expert × step, colour = fraction of the layer's tokens) and,
    below them, the largest and smallest expert load relative to a uniform share."""
    from matplotlib.figure import Figure

    snapshots = run.load_snapshots
    layers = sorted(snapshots[0]["expert_fraction"], key=int)
    steps = [r["step"] for r in snapshots]
    peak = max(max(f) for r in snapshots for f in r["expert_fraction"].values())
    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig = Figure(figsize=(4 * cols, 2.6 * (rows + 1)), layout="constrained")
    grid = fig.add_gridspec(rows + 1, cols)
    image = None
    for i, layer in enumerate(layers):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        table = [list(col) for col in zip(*(r["expert_fraction"][layer] for r in snapshots))]  # expert × step
        experts = [e - 0.5 for e in range(len(table) + 1)]  # integer ticks at the cells' centres
        image = ax.pcolormesh(_edges(steps), experts, table, cmap="magma", vmin=0.0, vmax=peak)
        ax.set(title=f"layer {layer}", xlabel="step", ylabel="expert")
    fig.colorbar(image, ax=fig.axes, label="fraction of the layer's tokens", shrink=0.8)
    ax = fig.add_subplot(grid[rows, :])
    ax.plot(steps, [r["expert_load_max"] for r in snapshots], marker=".", label="most loaded expert")
    ax.plot(steps, [r["expert_load_min"] for r in snapshots], marker=".", label="least loaded expert")
    ax.axhline(1.0, color="gray", ls="--", lw=1, label="uniform")
    ax.set(xlabel="step", ylabel="load / uniform share", title="expert load balance (all layers)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


def downstream_figure(run: Run) -> Any:
    """Each task's metrics vs step: one colour per task, acc_norm dashed."""
    fig, ax = _figure()
    colours: dict[str, str] = {}
    for (task, metric), points in run.scores().items():
        colour = colours.setdefault(task, f"C{len(colours) % 10}")
        ax.plot([step for step, _ in points], [value for _, value in points], marker="o", ms=3, color=colour,
                ls="--" if metric == "acc_norm" else "-", label=f"{task}: {metric}")
    ax.set(xlabel="step", ylabel="score", title="downstream tasks", ylim=(0, 1))
    ax.legend(fontsize="small")
    return fig


def figures(run: Run) -> dict[str, Any]:
    """File name → figure, for what this run logged."""
    out = {
        "loss.png": loss_figure(run),
        "lr.png": series_figure(run, "lr", "learning rate"),
        "grad_norm.png": series_figure(run, "grad_norm", "gradient norm", log=True),
        "tokens_per_s.png": series_figure(run, "tokens_per_s", "tokens / s"),
    }
    if run.load_snapshots:
        last = run.load_snapshots[-1]
        out["expert_load.png"] = expert_load_over_time_figure(run)
        out["expert_load_last.png"] = expert_load_figure(last["expert_fraction"], last["step"])
    if run.downstream:
        out["downstream.png"] = downstream_figure(run)
    return out


# ---- summary ---------------------------------------------------------------------------------


def summary(run: Run, images: list[str]) -> str:
    """The markdown summary: what a reader checks first, then the figures."""
    first, last = run.steps[0], run.steps[-1]
    finite = [r["loss"] for r in run.steps if math.isfinite(r["loss"])]
    seconds = sum(r["step_time_s"] for r in run.steps)
    tokens_timed = sum(r["tokens_per_s"] * r["step_time_s"] for r in run.steps)  # each step's tokens
    lines = [
        f"# Run report: {run.run_dir}",
        "",
        "| | |",
        "|---|---|",
        f"| steps | {len(run.steps)} logged, last step {last['step']} |",
        f"| tokens | {run.tokens_at(last):,} ({last['consumed_samples']:,} samples × seq_len {run.seq_len}) |",
        f"| train loss | first {first['loss']:.4f} (step {first['step']}), last {last['loss']:.4f}, "
        f"lowest {min(finite):.4f} |" if finite else "| train loss | no finite value |",
        f"| mean tokens/s | {tokens_timed / seconds:,.0f} (tokens / total step time) |",
        f"| skipped updates | {sum(1 for r in run.steps if r.get('skipped'))} |",
    ]
    validation = run.validation()
    if validation:
        lines += ["", "## Validation loss", "", "| source | best | at step | last |", "|---|---|---|---|"]
        for source, points in validation.items():
            best_step, best = min(points, key=lambda p: p[1])
            lines.append(f"| {source} | {best:.4f} | {best_step} | {points[-1][1]:.4f} |")
    scores = run.scores()
    if scores:
        lines += ["", "## Downstream tasks", "", "| task | metric | best | at step | last |", "|---|---|---|---|---|"]
        for (task, metric), points in scores.items():
            best_step, best = max(points, key=lambda p: p[1])
            lines.append(f"| {task} | {metric} | {best:.4f} | {best_step} | {points[-1][1]:.4f} |")
    lines += ["", *expert_balance(run)]
    lines += ["", "## Figures", ""] + [f"![{Path(name).stem}]({name})" for name in images]
    return "\n".join(lines) + "\n"


def expert_balance(run: Run) -> list[str]:
    """Per-layer min / max expert load at the last snapshot, relative to a uniform share."""
    if not run.load_snapshots:
        return ["## Expert load", "", "not logged (a dense model, or logging.expert_load=false)"]
    last = run.load_snapshots[-1]
    fractions = last["expert_fraction"]
    num_experts = len(next(iter(fractions.values())))
    lines = [
        f"## Expert load at step {last['step']}",
        "",
        f"Load = an expert's share of its layer's tokens ÷ the uniform share 1/{num_experts}. "
        f"Most loaded expert {last['expert_load_max']:.2f}, least loaded {last['expert_load_min']:.2f}.",
        "",
        "| layer | least loaded | most loaded |",
        "|---|---|---|",
    ]
    for layer in sorted(fractions, key=int):
        loads = [f * num_experts for f in fractions[layer]]
        lines.append(f"| {layer} | {min(loads):.2f} | {max(loads):.2f} |")
    return lines


def write_report(run_dir: Path) -> list[Path]:
    """Write the figures and summary.md into RUN_DIR/report/; returns the files written."""
    run = load_run(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    written = []
    for name, fig in figures(run).items():
        fig.savefig(out / name, dpi=100)
        written.append(out / name)
    (out / "summary.md").write_text(summary(run, [p.name for p in written]), encoding="utf-8")
    return [*written, out / "summary.md"]


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a training run's run.dir")
    args = parser.parse_args(argv)
    written = write_report(args.run_dir)
    print(f"wrote {len(written) - 1} figures and summary.md to {args.run_dir / 'report'}")


if __name__ == "__main__":
    main()
