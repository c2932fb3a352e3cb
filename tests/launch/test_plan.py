"""launch/plan.py as users run it: the table, one line per shape that never fits, the JSON last
line that selects a layout, and one line with exit 2 when nothing fits."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from megamoe.config import compose
from megamoe.estimators import balance, memory
from megamoe.models import validate_config
from tests.pretrain import ROOT

spec = importlib.util.spec_from_file_location("plan_script", ROOT / "launch" / "plan.py")
plan_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plan_script)


def _plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/plan.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_m32_on_256_h100s() -> None:
    result = _plan("+exp=m32_2000b", "--gpus", "256", "--gpu", "h100-80gb", "--top", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("256 × h100-80gb (80 GiB, 72.0 usable")
    assert "pp=8 ep=1: out of memory in every variant (smallest " in result.stdout  # the paper's layout
    best = json.loads(lines[-1])
    assert {"layout", "memory_gib", "step_s", "tokens_per_s", "mfu", "days", "gpu_hours"} <= set(best)
    assert len(best["top"]) == 3 and best["top"][0] == {k: best[k] for k in best["top"][0]}
    # the layout it names is a valid config whose memory estimate is the one it printed
    cfg = compose(["+exp=m32_2000b", *(f"{k}={v}".replace(" ", "") for k, v in best["layout"].items())])
    validate_config(cfg, world_size=256)
    assert balance.memory_per_gpu(cfg, 256)[1].total / memory.GIB == pytest.approx(best["memory_gib"], abs=0.01)
    assert best["memory_gib"] <= 72 and 0 < best["mfu"] < 0.6
    assert best["gpu_hours"] == pytest.approx(best["days"] * 24 * 256, rel=0.01)


def test_nothing_fits_is_one_line_naming_the_smallest_memory() -> None:
    result = _plan("+exp=m32_2000b", "--gpus", "8", "--gpu-memory", "40")
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: no layout of 8 × h100-80gb fits (36.0 GiB usable): the smallest needs ")
    assert line.endswith(" GiB per GPU; add GPUs or choose larger ones")


@pytest.mark.slow
def test_described_hardware_and_bad_flags() -> None:
    slow = json.loads(_plan("+exp=tiny", "--gpus", "2", "--tflops", "1", "--top", "1").stdout.splitlines()[-1])
    fast = json.loads(_plan("+exp=tiny", "--gpus", "2", "--tflops", "1000", "--top", "1").stdout.splitlines()[-1])
    assert slow["step_s"] > 100 * fast["step_s"]
    assert _plan("+exp=tiny", "--gpus", "2", "--gpu", "tpu").returncode == 2


@pytest.mark.parametrize(("flag", "value", "line"), [
    ("--gpu-memory", "0", "error: --gpu-memory 0: must be positive"),
    ("--tflops", "-1", "error: --tflops -1: must be positive"),
    ("--efficiency", "1.5", "error: --efficiency 1.5: must be a share of peak in (0, 1]"),
])
def test_a_hardware_figure_out_of_range_names_its_flag(flag: str, value: str, line: str,
                                                      capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        plan_script.main(["+exp=tiny", "--gpus", "2", flag, value])
    assert info.value.code == 2 and capsys.readouterr().err.splitlines() == [line]


@pytest.mark.parametrize(("gpus", "line"), [
    (64, "error: no valid layout: 64 GPUs are too many for this config: with at most 4 pipeline stages "
         "(model.num_layers) every layout has more data-parallel ranks than the 8 sequences of train.global_batch; "
         "use fewer GPUs or raise train.global_batch"),
    (7, "error: no valid layout: 7 GPUs divide this config in no valid way: every layout breaks a divisibility rule, "
        "most often train.global_batch: 8 is not divisible by train.micro_batch × dp = 1 × 7; choose a GPU count "
        "whose layouts satisfy it"),
])
def test_no_valid_layout_says_why_instead_of_asking_for_gpus(gpus: int, line: str,
                                                            capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        plan_script.main(["+exp=tiny", "--gpus", str(gpus)])
    assert info.value.code == 2 and capsys.readouterr().err.splitlines() == [line]


@pytest.mark.slow
def test_the_best_layout_names_the_imbalance_it_fits_and_verify_dry_runs_it() -> None:
    result = _plan("+exp=tiny", "--gpus", "2", "parallel.ep=2", "--top", "2", "--expert-imbalance", "1.5",
                   "--verify", "1")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert (summary["expert_imbalance"], summary["max_expert_imbalance"]) == (1.5, 4.0)  # tiny fits any routing
    assert "the best layout fits up to 4 × (--expert-imbalance)" in result.stdout
    (verified,) = summary["verified"]
    assert verified["layout"] == summary["layout"] and verified["fits"]
    assert verified["estimated_gib"] == pytest.approx(summary["memory_gib"], abs=0.01)
    assert 0.8 < verified["estimated_gib"] / verified["measured_gib"] < 1.25
    assert "verified by dry runs" in result.stdout
    bad = _plan("+exp=tiny", "--gpus", "2", "--expert-imbalance", "0.5")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --expert-imbalance: 0.5 is outside [1, 4]")
