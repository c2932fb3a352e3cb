"""launch/model_stats.py as a user runs it: the table, the JSON last line, and one-line errors."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "model_stats.py"


def load_script():
    spec = importlib.util.spec_from_file_location("model_stats", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


model_stats = load_script()


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_tiny_matches_a_hand_count(capsys: pytest.CaptureFixture) -> None:
    model_stats.main(["+exp=tiny"])
    out = capsys.readouterr().out
    stats = last_json(out)
    # vocab 512 × hidden 64 tied; per layer: q/k/v/o 4·64², LFA convs 2·(32·64·2) + biases 96 + norm 64,
    # attention router 3·8·64, 8 SwiGLU experts of 3·64·128 (2 active), two norms of 64; final norm 64.
    per_layer_fixed = 4 * 64 * 64 + (2 * 32 * 64 * 2 + 96 + 64) + 3 * 8 * 64 + 2 * 64
    expert = 3 * 64 * 128
    assert stats["total_params"] == 512 * 64 + 4 * (per_layer_fixed + 8 * expert) + 64 == 924_864
    assert stats["active_params"] == 512 * 64 + 4 * (per_layer_fixed + 2 * expert) + 64 == 335_040
    matmul = 4 * (4 * 64 * 64 + 2 * 32 * 64 * 2 + 3 * 8 * 64 + 2 * expert) + 512 * 64
    assert stats["fwd_flops_per_token"] == 2 * matmul
    assert stats["compute_ratio_vs_dense"] == pytest.approx(matmul / 924_864)
    for label in ("embedding", "attention", "LFA", "router", "routed experts", "RMSNorms", "output head"):
        assert label in out


def test_m32_from_the_command_line_gives_the_paper_numbers() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), "+exp=m32_2000b"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    stats = last_json(result.stdout)
    assert stats["total_params"] == pytest.approx(40e9, rel=0.01)
    assert stats["active_params"] == pytest.approx(3.7e9, rel=0.01)
    assert stats["fwd_flops_per_token"] == pytest.approx(7.4e9, rel=0.01)
    assert stats["compute_ratio_vs_dense"] == pytest.approx(0.0925, abs=0.0005)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["+exp=tiny", "model.hiden_size=64"], "model.hiden_size"),  # unknown key
        (["+exp=tiny", "moe.top_k=9"], "moe.top_k"),  # impossible value (validation)
        (["+exp=nope"], "exp/nope"),  # missing experiment
    ],
)
def test_a_bad_override_exits_2_with_one_line(args: list[str], named: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        model_stats.main(args)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], captured.err
