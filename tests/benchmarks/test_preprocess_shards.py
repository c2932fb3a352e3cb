"""benchmarks/preprocess_shards.py runs on a tiny corpus and its time model is the documented formula."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_smoke_run_prints_the_time_model() -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.preprocess_shards", "--size-mb", "0.2", "--quick",
                           "--tokenizer-type", "ByteTokenizer", "--nodes", "2", "--cores", "4"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rate, efficiency, merge = result["tokens_per_s_1_shard"], result["efficiency"], result["merge_mb_per_s"] * 1e6
    assert result["tokens"] > 0 and 0 < efficiency and result["ratio_2_vs_1"] == pytest.approx(2 * efficiency, 0.01)
    hours = result["model_hours"]["2x4"]
    assert hours["tokenize_h"] == pytest.approx(2e12 / (2 * 4 * rate * efficiency) / 3600, rel=0.01)
    assert hours["merge_h"] == pytest.approx(2e12 * 4 / merge / 3600, rel=0.01)
