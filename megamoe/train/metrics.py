"""What a run reports: metrics.jsonl (exact floats), a console line, wandb, TensorBoard, MFU and
expert load.

``metrics.jsonl`` holds one JSON object per step. Python's json writes every float as its
shortest round-trip repr, so reading a line back gives the same bits: two runs compare exactly
(non-finite values are written as NaN / Infinity, which Python's json reads back). wandb and
TensorBoard mirror its numbers (and eval.jsonl's, downstream.jsonl's) under the same names.
"""

from __future__ import annotations

import datetime
import importlib.util
import io
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from megamoe.config.choices import WandbMode
from megamoe.errors import UserError, naming, write_error
from megamoe.train.router_stats import LayerRouting

# Dense (no sparsity) bf16 tensor-core peak per GPU in TFLOP/s, from NVIDIA's datasheets (SXM
# parts unless the name says otherwise). Matched as a substring of torch.cuda.get_device_name,
# longest key first, so "H100 PCIe" wins over "H100" and "GH200" over "H200".
PEAK_TFLOPS_BF16: dict[str, float] = {
    "A100": 312.0,
    "A800": 312.0,
    "H100": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H800": 989.0,
    "H200": 989.0,
    "GH200": 989.0,
    "L40S": 362.0,
}

STEP_TIME_EMA = 0.9  # weight of the past in the step-time average behind the ETA
TENSORBOARD_DIR = "tensorboard"  # under run.dir
LOGGED_FILES = ("metrics.jsonl", "eval.jsonl", "downstream.jsonl")


def peak_flops(device_name: str) -> Optional[float]:
    """Peak bf16 FLOP/s of the GPU called ``device_name``; None when it is not in the table."""
    matches = [key for key in PEAK_TFLOPS_BF16 if key.lower() in device_name.lower()]
    return PEAK_TFLOPS_BF16[max(matches, key=len)] * 1e12 if matches else None


def detect_peak_flops(device: torch.device) -> Optional[float]:
    """Peak bf16 FLOP/s of ``device``; None on CPU or an unknown GPU (MFU is then not shown)."""
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device))


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over peak, both for the same device(s).

    ``flops_per_token`` counts forward and backward (≈ 6 × active parameters + attention).
    """
    return tokens_per_s * flops_per_token / peak


def expert_load_summary(tokens_per_expert_by_layer: dict[int, torch.Tensor]) -> dict[str, Any]:
    """Per-layer token fractions per expert, and the extreme loads relative to uniform (1.0).

    ``expert_load_max`` 2.0 means some expert of some layer got twice its fair share of tokens;
    ``expert_load_min`` 0.0 means an expert got none. Layer keys become strings (JSON keys).
    A model without MoE layers (``model.ffn_type=dense``) has no expert load: an empty summary.
    """
    if not tokens_per_expert_by_layer:
        return {}
    fractions: dict[str, list[float]] = {}
    relative: list[float] = []
    for layer, counts in sorted(tokens_per_expert_by_layer.items()):
        counts = counts.detach().to("cpu", torch.float64)
        frac = counts / counts.sum().clamp(min=1.0)
        fractions[str(layer)] = frac.tolist()
        relative += (frac * counts.numel()).tolist()
    return {"expert_fraction": fractions, "expert_load_max": max(relative), "expert_load_min": min(relative)}


def routing_summary(layers: dict[int, LayerRouting]) -> dict[str, Any]:
    """metrics.jsonl's routing fields from every MoE layer's step summary (none for a dense model):
    the expert load (:func:`expert_load_summary`), the aux loss and z-loss averaged over layers
    and forward passes (unscaled by their coefficients, as Megatron logs them), the share of
    assignments dropped by the capacity limit, and the share of tokens that reached no expert."""
    if not layers:
        return {}
    forwards = sum(layer.forwards for layer in layers.values())
    assignments = sum(float(layer.tokens_per_expert.sum()) for layer in layers.values())
    tokens = sum(layer.tokens for layer in layers.values())
    return {
        **expert_load_summary({index: layer.tokens_per_expert for index, layer in layers.items()}),
        "router_aux_loss": sum(layer.aux_loss for layer in layers.values()) / forwards,
        "router_z_loss": sum(layer.z_loss for layer in layers.values()) / forwards,
        "dropped_fraction": sum(layer.dropped for layer in layers.values()) / max(assignments, 1.0),
        "unrouted_fraction": sum(layer.unrouted for layer in layers.values()) / max(tokens, 1.0),
    }


def expert_load_figure(fractions: dict[str, list[float]], step: int) -> Any:
    """Layer × expert heatmap of the share of tokens each expert got (``expert_fraction``).

    The run report draws it for the last snapshot and wandb receives it at every logged step
    (its step slider then plays the load over time). A matplotlib ``Figure`` built without
    pyplot, so no display backend is involved; needs the ``report`` extra.
    """
    from matplotlib.figure import Figure

    layers = sorted(fractions, key=int)
    num_experts = len(fractions[layers[0]])
    fig = Figure(figsize=(max(6.0, 2.0 + 0.25 * num_experts), max(3.0, 1.5 + 0.25 * len(layers))), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow([fractions[layer] for layer in layers], aspect="auto", cmap="magma", vmin=0.0,
                      interpolation="nearest")
    ax.set(xlabel="expert", ylabel="layer", title=f"tokens per expert at step {step} (uniform: {1 / num_experts:.3g})")
    ax.set_yticks(range(len(layers)), layers)
    fig.colorbar(image, ax=ax, label="fraction of the layer's tokens")
    return fig


def _wandb_image(fig: Any) -> Any:
    """wandb.Image of a pyplot-free figure (wandb's own conversion expects pyplot): via PNG bytes."""
    import wandb
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    buffer.seek(0)
    return wandb.Image(Image.open(buffer))


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a record, as the mirrors log them (``step`` is their x axis, a flag 0 / 1)."""
    return {key: float(value) if isinstance(value, bool) else value for key, value in record.items()
            if isinstance(value, (int, float)) and key != "step"}


def _last_logged_step(run_dir: Path) -> int:
    """The last step the run's jsonl files hold (0 when none): a resumed run has already dropped
    what it logged past its checkpoint (train.loop), and TensorBoard must drop it too."""
    last = 0
    for name in LOGGED_FILES:
        path = run_dir / name
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                last = max(last, json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):  # a line torn by a kill in mid-write
                continue
    return last


class TensorBoardSink:
    """Scalars (and the expert-load heatmap) as TensorBoard events in ``run.dir/tensorboard``.

    Values are written in double precision, so they read back as the bits of metrics.jsonl. A
    resumed run purges the events an interrupted one wrote past the last step the jsonl files
    kept (TensorBoard's ``purge_step``), so the curves match the files. Each call ends with a
    flush: a crash loses nothing logged.
    """

    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise UserError(f"logging.tensorboard.enabled=true but tensorboard cannot be imported ({exc}); "
                            "pip install -e '.[tensorboard]', or set logging.tensorboard.enabled=false") from None
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=_last_logged_step(run_dir) + 1)
        self.figures = importlib.util.find_spec("matplotlib") is not None

    def log(self, scalars: dict[str, float], step: int, figure: Any = None) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step, new_style=True, double_precision=True)
        if figure is not None:
            self.writer.add_figure("expert_load", figure, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _append_json(path: Path, obj: dict[str, Any]) -> None:
    try:
        with naming(path), open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(obj, default=_jsonable) + "\n")
    except OSError as exc:
        raise UserError(write_error(exc, "free space or choose another run.dir")) from None


def _format_step_line(step: int, total_steps: int, record: dict[str, Any], eta_s: Optional[float]) -> str:
    fields = [f"step {step:>{len(str(total_steps))}}/{total_steps}"]
    if "loss" in record:
        fields.append(f"loss {record['loss']:.4f}")
    if "lr" in record:
        fields.append(f"lr {record['lr']:.3e}")
    if "grad_norm" in record:
        fields.append(f"grad norm {record['grad_norm']:.3f}")
    if "tokens_per_s" in record:
        fields.append(f"{record['tokens_per_s']:,.0f} tok/s")
    if "slowest_rank" in record:
        fields.append(f"slowest rank {record['slowest_rank']} ({record['slowest_rank_s']:.2f} s)")
    if record.get("mfu") is not None:
        fields.append(f"MFU {100 * record['mfu']:.1f}%")
    if "expert_load_max" in record:
        fields.append(f"expert load max {record['expert_load_max']:.2f} min {record['expert_load_min']:.2f}")
    if record.get("dropped_fraction") or record.get("unrouted_fraction"):
        fields.append(f"dropped {100 * record['dropped_fraction']:.1f}% (unrouted tokens "
                      f"{100 * record['unrouted_fraction']:.1f}%)")
    if record.get("skipped"):
        fields.append("SKIPPED: non-finite loss or grad norm, no update")
    if eta_s is not None:
        fields.append(f"ETA {datetime.timedelta(seconds=round(eta_s))}")
    return " | ".join(fields)


class MetricsLogger:
    """Writes a run's metrics. Every rank may call it; only the writer (``is_writer``) acts.

    Records are flat dicts of the loop's choosing; the console line reads ``loss``, ``lr``,
    ``grad_norm``, ``tokens_per_s``, ``mfu`` and ``expert_load_max``/``expert_load_min`` when
    present. Step time for the ETA is measured here, between successive :meth:`log_step` calls.
    ``config_dict`` is the run config as a dict: wandb records it, and its
    ``logging.tensorboard.enabled`` turns the TensorBoard mirror on.
    """

    def __init__(self, run_dir: Path, is_writer: bool, wandb_cfg: DictConfig, total_steps: int,
                 config_dict: dict) -> None:
        self.run_dir = Path(run_dir)
        self.is_writer = is_writer
        self.total_steps = total_steps
        self._step_s: Optional[float] = None  # moving average of seconds per step
        self._last: Optional[tuple[float, int]] = None  # (monotonic time, step) of the last log_step
        self._wandb: Any = None
        self._wandb_figures = False  # expert-load heatmaps to wandb (needs matplotlib)
        self._tensorboard: Optional[TensorBoardSink] = None
        if not is_writer:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if wandb_cfg.enabled and wandb_cfg.mode != WandbMode.DISABLED:
            self._wandb = _start_wandb(self.run_dir, wandb_cfg, config_dict)
            self._wandb_figures = importlib.util.find_spec("matplotlib") is not None
            if not self._wandb_figures:
                tqdm.write("wandb: no expert-load figures without matplotlib (pip install -e '.[report]')")
        if config_dict.get("logging", {}).get("tensorboard", {}).get("enabled"):  # the run config's logging section
            self._tensorboard = TensorBoardSink(self.run_dir)

    def log_step(self, step: int, record: dict[str, Any]) -> None:
        """Append ``{"step": step, **record}`` to metrics.jsonl (and wandb's scalars)."""
        if not self.is_writer:
            return
        now = time.monotonic()
        if self._last is not None and step > self._last[1]:
            per_step = (now - self._last[0]) / (step - self._last[1])
            self._step_s = (per_step if self._step_s is None
                            else STEP_TIME_EMA * self._step_s + (1 - STEP_TIME_EMA) * per_step)
        self._last = (now, step)
        _append_json(self.run_dir / "metrics.jsonl", {"step": step, **record})
        fractions = record.get("expert_fraction")
        if self._wandb is not None:
            logged: dict[str, Any] = _scalars(record)
            if self._wandb_figures and fractions:
                logged["expert_load"] = _wandb_image(expert_load_figure(fractions, step))
            self._wandb.log(logged, step=step)
        if self._tensorboard is not None:
            figure = expert_load_figure(fractions, step) if self._tensorboard.figures and fractions else None
            self._tensorboard.log(_scalars(record), step, figure)

    def console(self, step: int, record: dict[str, Any]) -> None:
        """Print one line: step, loss, lr, grad norm, tokens/s, MFU, expert load, ETA."""
        if not self.is_writer:
            return
        eta = None if self._step_s is None else self._step_s * max(0, self.total_steps - step)
        tqdm.write(_format_step_line(step, self.total_steps, record, eta))

    def log_eval(self, step: int, losses_by_source: dict[str, float]) -> None:
        """Validation loss per data source: eval.jsonl, a console line, and wandb / TensorBoard ``eval/<source>``."""
        if not self.is_writer:
            return
        _append_json(self.run_dir / "eval.jsonl", {"step": step, "loss": losses_by_source})
        tqdm.write(" | ".join([f"eval step {step}"] + [f"{src} {loss:.4f}" for src, loss in losses_by_source.items()]))
        self._mirror({f"eval/{src}": loss for src, loss in losses_by_source.items()}, step)

    def log_downstream(self, step: int, scores: dict[str, dict[str, float]]) -> None:
        """Downstream task metrics: downstream.jsonl, a console line, and wandb / TensorBoard
        ``downstream/<task>/<metric>``."""
        if not self.is_writer:
            return
        _append_json(self.run_dir / "downstream.jsonl", {"step": step, "tasks": scores})
        tqdm.write(" | ".join([f"downstream step {step}"] + [
            f"{task} " + " ".join(f"{metric} {value:.3f}" for metric, value in metrics.items())
            for task, metrics in scores.items()]))
        self._mirror({f"downstream/{task}/{metric}": value for task, metrics in scores.items()
                      for metric, value in metrics.items()}, step)

    def _mirror(self, scalars: dict[str, float], step: int) -> None:
        """Scalars a jsonl file just got, to wandb and TensorBoard."""
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._tensorboard is not None:
            self._tensorboard.log(scalars, step)

    def log_event(self, kind: str, record: dict[str, Any], line: str) -> None:
        """Something the run did by itself (a rollback): one line of ``{kind}.jsonl``, and the console."""
        if not self.is_writer:
            return
        _append_json(self.run_dir / f"{kind}.jsonl", record)
        tqdm.write(line)

    def finish(self) -> None:
        """Close the wandb run (its offline files are then complete) and the TensorBoard writer."""
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def _start_wandb(run_dir: Path, wandb_cfg: DictConfig, config_dict: dict) -> Any:
    """Start a wandb run; WANDB_MODE and WANDB_DIR from the environment win over the config."""
    try:
        import wandb
    except ImportError as exc:
        raise UserError(f"logging.wandb.enabled=true but wandb cannot be imported ({exc}); "
                        "pip install wandb, or set logging.wandb.enabled=false") from None
    os.environ.setdefault("WANDB_MODE", wandb_cfg.mode)
    os.environ.setdefault("WANDB_DIR", str(run_dir))
    return wandb.init(project=wandb_cfg.project, name=config_dict.get("run", {}).get("name"), config=config_dict)


def forget_steps_after(run_dir: Path, step: int) -> None:
    """Drop the metrics an interrupted run logged past the step this run starts from (all of them
    on a fresh start), so that metrics.jsonl / eval.jsonl read as one run whose steps continue."""
    def logged_until(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except ValueError:  # a line torn by a kill in mid-write
            return False

    for path in (run_dir / "metrics.jsonl", run_dir / "eval.jsonl", run_dir / "downstream.jsonl"):
        if path.is_file():
            kept = [line for line in path.read_text().splitlines(keepends=True) if logged_until(line)]
            path.with_suffix(".tmp").write_text("".join(kept))
            os.replace(path.with_suffix(".tmp"), path)
