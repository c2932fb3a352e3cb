"""Metrics: exact float round-trip in metrics.jsonl, the console line, MFU, expert load, wandb offline,
TensorBoard read back."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from megamoe.config.schema import WandbConfig
from megamoe.errors import UserError
from megamoe.train.metrics import (
    TENSORBOARD_DIR,
    MetricsLogger,
    detect_peak_flops,
    expert_load_summary,
    mfu,
    peak_flops,
    routing_summary,
)
from megamoe.train.router_stats import LayerRouting

TENSORBOARD_ON = {"logging": {"tensorboard": {"enabled": True}}}


def _wandb(**overrides: object) -> DictConfig:
    return OmegaConf.structured(WandbConfig(**overrides))


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H200", 989),
        ("NVIDIA GH200 480GB", 989),
        ("Tesla T4", None),
    ],
)
def test_peak_table_matches_device_names(name: str, tflops: float | None) -> None:
    assert peak_flops(name) == (None if tflops is None else tflops * 1e12)


def test_mfu_and_cpu_peak() -> None:
    assert detect_peak_flops(torch.device("cpu")) is None
    # 20k tokens/s × 6 × 3.7e9 active params = 4.44e14 FLOP/s of an H100's 9.89e14
    assert mfu(20_000, 6 * 3.7e9, peak_flops("H100")) == pytest.approx(4.44e14 / 9.89e14, rel=1e-12)


def test_routing_summary_averages_over_layers_and_forwards() -> None:
    """Two layers, two forwards each: mean losses per forward; shares over all assignments / tokens."""
    layers = {
        0: LayerRouting(torch.tensor([6.0, 2.0]), aux_loss=2.0, z_loss=4.0, dropped=2.0, unrouted=1.0, tokens=4.0,
                        forwards=2.0),
        1: LayerRouting(torch.tensor([4.0, 4.0]), aux_loss=2.4, z_loss=0.0, dropped=0.0, unrouted=0.0, tokens=4.0,
                        forwards=2.0),
    }
    summary = routing_summary(layers)
    assert summary["router_aux_loss"] == pytest.approx(4.4 / 4)
    assert summary["router_z_loss"] == pytest.approx(4.0 / 4)
    assert summary["dropped_fraction"] == pytest.approx(2 / 16)
    assert summary["unrouted_fraction"] == pytest.approx(1 / 8)
    assert summary["expert_fraction"] == {"0": [0.75, 0.25], "1": [0.5, 0.5]}
    assert routing_summary({}) == {}  # a dense model routes nothing


def test_expert_load_summary() -> None:
    summary = expert_load_summary({3: torch.tensor([6, 2, 0, 0]), 0: torch.tensor([2, 2, 2, 2])})
    assert summary["expert_fraction"] == {"0": [0.25] * 4, "3": [0.75, 0.25, 0.0, 0.0]}
    assert (summary["expert_load_max"], summary["expert_load_min"]) == (3.0, 0.0)
    assert expert_load_summary({}) == {}  # a dense model (model.ffn_type=dense) routes nothing


AWKWARD = [0.1 + 0.2, 1 / 3, 5e-324, 1e-300, math.pi * 1e10, -2.0**-1074, 1.7976931348623157e308, math.nan, -math.inf]


def test_metrics_lines_round_trip_floats_bit_exactly(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path / "run", True, _wandb(), total_steps=10, config_dict={})
    for step, value in enumerate(AWKWARD, start=1):
        logger.log_step(step, {"loss": value, "lr": value / 7, "fp32": torch.tensor(value / 3, dtype=torch.float32)})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(AWKWARD)
    for step, (line, value) in enumerate(zip(lines, AWKWARD), start=1):
        record = json.loads(line)
        assert record["step"] == step
        assert float.hex(record["loss"]) == float.hex(value)
        assert float.hex(record["lr"]) == float.hex(value / 7)
        assert float.hex(record["fp32"]) == float.hex(torch.tensor(value / 3, dtype=torch.float32).item())


def test_console_line_has_the_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logger = MetricsLogger(tmp_path, True, _wandb(), total_steps=100, config_dict={})
    record = {"loss": 2.5, "lr": 3e-3, "grad_norm": 0.75, "tokens_per_s": 12345.6, "mfu": 0.4123,
              **expert_load_summary({0: torch.tensor([3, 1])})}
    logger.log_step(9, record)
    logger.console(9, record)
    assert "ETA" not in capsys.readouterr().out  # one step is no rate yet
    logger.log_step(10, record)
    logger.console(10, record)
    line = capsys.readouterr().out.strip()
    for field in ("step  10/100", "loss 2.5000", "lr 3.000e-03", "grad norm 0.750", "12,346 tok/s", "MFU 41.2%",
                  "expert load max 1.50 min 0.50", "ETA 0:00:00"):
        assert field in line, (field, line)
    logger.console(10, {"loss": 2.5})  # CPU: no MFU, no expert load
    assert "MFU" not in capsys.readouterr().out


def test_eval_and_non_writer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logger = MetricsLogger(tmp_path / "w", True, _wandb(), total_steps=10, config_dict={})
    logger.log_eval(5, {"zh": 3.25, "en": 1 / 3})
    assert json.loads((tmp_path / "w" / "eval.jsonl").read_text()) == {"step": 5, "loss": {"zh": 3.25, "en": 1 / 3}}
    assert "eval step 5 | zh 3.2500 | en 0.3333" in capsys.readouterr().out
    quiet = MetricsLogger(tmp_path / "q", False, _wandb(enabled=True), total_steps=10, config_dict={})
    quiet.log_step(1, {"loss": 1.0})
    quiet.console(1, {"loss": 1.0})
    quiet.log_eval(1, {"zh": 1.0})
    quiet.finish()
    assert not (tmp_path / "q").exists() and capsys.readouterr().out == ""


def test_wandb_offline_writes_into_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    for var in ("WANDB_MODE", "WANDB_DIR"):  # set-then-delete so monkeypatch restores the absence
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    logger = MetricsLogger(tmp_path, True, _wandb(enabled=True), total_steps=2, config_dict={"run": {"name": "t"}})
    logger.log_step(1, {"loss": 2.0, "expert_fraction": {"0": [0.5, 0.5]}})
    logger.log_eval(1, {"zh": 2.5})
    logger.finish()
    assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_DIR"] == str(tmp_path)
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    (data,) = run.glob("run-*.wandb")
    assert data.stat().st_size > 0


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of run_dir/tensorboard as TensorBoard shows it: tag → [(step, value)], after
    its purge of the steps a resumed run rewrote."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    events = EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={"tensors": 0})
    events.Reload()
    scalars = {tag: [(event.step, make_ndarray(event.tensor_proto)) for event in events.Tensors(tag)]
               for tag in events.Tags()["tensors"]}
    return {tag: [(step, float(value)) for step, value in values] for tag, values in scalars.items()
            if all(value.ndim == 0 for _, value in values)}  # not the expert-load image


def jsonl_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The same from metrics.jsonl, eval.jsonl and downstream.jsonl, under the mirrors' names."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    files = {"metrics.jsonl": lambda r: r,
             "eval.jsonl": lambda r: {f"eval/{k}": v for k, v in r["loss"].items()},
             "downstream.jsonl": lambda r: {f"downstream/{t}/{m}": v for t, ms in r["tasks"].items()
                                            for m, v in ms.items()}}
    for name, flatten in files.items():
        path = run_dir / name
        for line in path.read_text().splitlines() if path.exists() else []:
            record = json.loads(line)
            for key, value in flatten(record).items():
                if isinstance(value, (int, float)) and key != "step":
                    scalars.setdefault(key, []).append((record["step"], float(value)))
    return scalars


def test_tensorboard_holds_the_jsonl_scalars_bit_for_bit(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, True, _wandb(), total_steps=4, config_dict=TENSORBOARD_ON)
    for step in (1, 2, 3):
        logger.log_step(step, {"step": step, "loss": AWKWARD[step], "lr": 1 / 3 * step, "grad_norm": 0.1 + 0.2,
                               "tokens_per_s": 1e5 / 7, "mfu": 0.4, "skipped": step == 2,
                               **expert_load_summary({0: torch.tensor([3, step]), 1: torch.tensor([1, 1])})})
    logger.log_eval(3, {"zh": 1 / 7, "en": 2 / 7})
    logger.log_downstream(3, {"demo-en": {"acc": 0.25, "acc_norm": 1 / 3}})
    logger.finish()
    assert len(list((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 1
    scalars = tensorboard_scalars(tmp_path)
    assert scalars == jsonl_scalars(tmp_path)
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "expert_load_max", "expert_load_min", "eval/zh",
            "downstream/demo-en/acc_norm"} <= set(scalars)
    assert scalars["skipped"] == [(1, 0.0), (2, 1.0), (3, 0.0)]


def test_tensorboard_of_a_resumed_run_drops_what_the_files_dropped(tmp_path: Path) -> None:
    first = MetricsLogger(tmp_path, True, _wandb(), total_steps=4, config_dict=TENSORBOARD_ON)
    for step in (1, 2, 3, 4):
        first.log_step(step, {"loss": float(step)})
    first.log_eval(4, {"zh": 4.0})
    first.finish()
    kept = (tmp_path / "metrics.jsonl").read_text().splitlines()[:2]  # what train.loop keeps resuming from step 2
    (tmp_path / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    (tmp_path / "eval.jsonl").write_text("")
    resumed = MetricsLogger(tmp_path, True, _wandb(), total_steps=4, config_dict=TENSORBOARD_ON)
    for step in (3, 4):
        resumed.log_step(step, {"loss": 10.0 * step})
    resumed.finish()
    assert tensorboard_scalars(tmp_path)["loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert tensorboard_scalars(tmp_path) == {**jsonl_scalars(tmp_path), "eval/zh": []}


def test_tensorboard_off_writes_nothing_and_a_missing_package_is_one_line(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    MetricsLogger(tmp_path / "off", True, _wandb(), total_steps=1, config_dict={}).log_step(1, {"loss": 1.0})
    assert not (tmp_path / "off" / TENSORBOARD_DIR).exists()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(UserError, match=r"^logging.tensorboard.enabled=true but tensorboard cannot be imported .*"
                                        r"pip install -e '.\[tensorboard\]'"):
        MetricsLogger(tmp_path / "on", True, _wandb(), total_steps=1, config_dict=TENSORBOARD_ON)
