"""launch/report.py on a run a real training wrote and on hand-written logs; its one-line errors;
and the expert-load figure wandb receives."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from launch.report import main
from megamoe.train.metrics import MetricsLogger

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ("loss.png", "lr.png", "grad_norm.png", "tokens_per_s.png", "expert_load.png", "expert_load_last.png")


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which must follow the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def table_row(summary: str, label: str) -> str:
    (row,) = [line for line in summary.splitlines() if line.startswith(f"| {label} |")]
    return row


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-step single-process run of tiny on mock data, expert load every 2 steps, eval every 3."""
    run_dir = tmp_path_factory.mktemp("run")
    args = ["+exp=tiny", "train.steps=6", "train.warmup_steps=1", "train.global_batch=4", "train.micro_batch=2",
            "train.seq_len=32", "train.log_interval=2", "train.eval_interval=3", "train.eval_iters=1",
            "checkpoint.interval=1000", f"run.dir={run_dir}"]
    result = subprocess.run([sys.executable, "launch/pretrain.py", *args], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    main([str(run_dir)])
    return run_dir


def test_real_run_gets_every_figure(trained: Path) -> None:
    for name in FIGURES:
        width, height = png_size(trained / "report" / name)
        assert width > 100 and height > 100, name


def test_real_run_summary_numbers(trained: Path) -> None:
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (trained / "eval.jsonl").read_text().splitlines()]
    summary = (trained / "report" / "summary.md").read_text()
    assert table_row(summary, "steps") == "| steps | 6 logged, last step 6 |"
    assert table_row(summary, "tokens") == "| tokens | 768 (24 samples × seq_len 32) |"  # 6 steps × 4 × 32
    assert f"first {records[0]['loss']:.4f} (step 1), last {records[-1]['loss']:.4f}" in summary
    # mean throughput from its definition: global batch × seq_len tokens per step over the total time
    tokens_per_s = 6 * 4 * 32 / sum(r["step_time_s"] for r in records)
    assert table_row(summary, "mean tokens/s") == f"| mean tokens/s | {tokens_per_s:,.0f} (tokens / total step time) |"
    (source,) = evals[0]["loss"]
    best = min(evals, key=lambda e: e["loss"][source])
    assert table_row(summary, source).startswith(f"| {source} | {best['loss'][source]:.4f} | {best['step']} |")
    assert "## Expert load at step 6" in summary
    for name in FIGURES:
        assert f"({name})" in summary


def write_run(run_dir: Path, records: list[dict], evals: list[dict] | None = None, seq_len: int = 128) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml({"train": {"seq_len": seq_len}}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if evals is not None:
        (run_dir / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    return run_dir


def step(n: int, loss: float, **extra: object) -> dict:
    return {"step": n, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "skipped": False, "tokens_per_s": 1000.0,
            "consumed_samples": 8 * n, "step_time_s": 2.0, **extra}


def test_hand_written_run(tmp_path: Path) -> None:
    load = {"expert_fraction": {"0": [0.5, 0.25, 0.125, 0.125], "1": [0.25, 0.25, 0.25, 0.25]},
            "expert_load_max": 2.0, "expert_load_min": 0.5}
    records = [step(1, 5.0), step(2, math.nan, skipped=True, grad_norm=math.inf),
               step(3, 4.0, tokens_per_s=3000.0, **load), step(4, 4.5, step_time_s=6.0)]
    evals = [{"step": 2, "loss": {"zh": 4.8, "en": 4.9}}, {"step": 4, "loss": {"zh": 4.6, "en": 5.0}}]
    run = write_run(tmp_path / "run", records, evals)
    main([str(run)])
    summary = (run / "report" / "summary.md").read_text()
    assert table_row(summary, "steps") == "| steps | 4 logged, last step 4 |"
    assert table_row(summary, "tokens") == "| tokens | 4,096 (32 samples × seq_len 128) |"
    assert table_row(summary, "train loss") == "| train loss | first 5.0000 (step 1), last 4.5000, lowest 4.0000 |"
    # tokens: 1000·2 + 1000·2 + 3000·2 + 1000·6 = 16000 over 12 s
    assert table_row(summary, "mean tokens/s") == "| mean tokens/s | 1,333 (tokens / total step time) |"
    assert table_row(summary, "skipped updates") == "| skipped updates | 1 |"
    assert table_row(summary, "zh") == "| zh | 4.6000 | 4 | 4.6000 |"
    assert table_row(summary, "en") == "| en | 4.9000 | 2 | 5.0000 |"
    assert "## Expert load at step 3" in summary and "Most loaded expert 2.00, least loaded 0.50." in summary
    assert table_row(summary, "0") == "| 0 | 0.50 | 2.00 |" and table_row(summary, "1") == "| 1 | 1.00 | 1.00 |"
    for name in FIGURES:
        png_size(run / "report" / name)


def test_dense_run_without_eval_or_expert_load(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", [step(1, 3.0), step(2, 2.5)])
    main([str(run)])
    written = sorted(p.name for p in (run / "report").iterdir())
    assert written == sorted(["loss.png", "lr.png", "grad_norm.png", "tokens_per_s.png", "summary.md"])
    summary = (run / "report" / "summary.md").read_text()
    assert "not logged (a dense model, or logging.expert_load=false)" in summary and "Validation" not in summary


def test_an_unfinished_last_line_is_left_out(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", [step(1, 3.0), step(2, 2.5)])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 2.')  # the trainer is writing it right now
    main([str(run)])
    assert "| steps | 2 logged, last step 2 |" in (run / "report" / "summary.md").read_text()


def broken(tmp_path: Path, what: str) -> tuple[Path, str]:
    """A run directory with one problem, and the text the error line must contain."""
    run = tmp_path / "run"
    if what == "no run dir":
        return run, f"{run}: no such run directory"
    if what == "no metrics":
        run.mkdir()
        return run, "metrics.jsonl: missing"
    if what == "empty metrics":
        write_run(run, [])
        return run, "metrics.jsonl: empty"
    if what == "bad line":
        write_run(run, [step(1, 3.0)])
        with open(run / "metrics.jsonl", "a") as f:
            f.write("not json\n")
        return run, "metrics.jsonl:2: not a JSON object"
    write_run(run, [step(1, 3.0)])
    (run / "config.yaml").unlink()
    return run, "config.yaml: missing"


@pytest.mark.parametrize("what", ["no run dir", "no metrics", "empty metrics", "bad line", "no config"])
def test_errors_are_one_line_and_exit_2(what: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run, expected = broken(tmp_path, what)
    with pytest.raises(SystemExit) as exit_info:
        main([str(run)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines


def test_wandb_gets_the_expert_load_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    wandb.teardown()  # wandb keeps the first run's settings (its directory) per process: start afresh
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    wandb_cfg = OmegaConf.create({"enabled": True, "project": "megamoe", "mode": "offline"})
    logger = MetricsLogger(tmp_path, True, wandb_cfg, total_steps=2, config_dict={"run": {"name": "t"}})
    logger.log_step(1, {"loss": 2.0})  # no expert load logged at this step: no figure
    logger.log_step(2, {"loss": 1.9, "expert_fraction": {"0": [0.75, 0.25], "1": [0.5, 0.5]}})
    logger.finish()
    wandb.teardown()  # and leave later tests a fresh wandb too
    (image,) = (tmp_path / "wandb").glob("offline-run-*/files/media/images/expert_load_*.png")  # step 2's only
    assert png_size(image)[0] > 100
