"""benchmarks/generate.py at tiny sizes: both modes run, agree, and the last line is the JSON summary."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.pretrain import ROOT


def test_the_smoke_run_reports_both_modes() -> None:
    result = subprocess.run([sys.executable, "benchmarks/generate.py", "--prefixes", "8,24", "--new-tokens", "3",
                             "--repeats", "1", "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.splitlines()[-1])
    assert set(summary["speedup"]) == {"8", "24"} and summary["same_ids"]
    assert all(summary[f"{mode}_tokens_per_s"]["24"] > 0 for mode in ("cached", "uncached"))
