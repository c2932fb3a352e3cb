"""benchmarks/gpu_check.py --dry-run: every GPU check's code path on the CPU at tiny shapes, so
the one command that proves the GPU path still runs the first time a GPU is at hand."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.pretrain import ROOT


@pytest.mark.slow
def test_the_dry_run_passes_every_check() -> None:
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    summary = json.loads(lines[-1])
    names = ["bf16_tracks_fp32", "grouped_gemm", "flash_sdpa", "fused_adamw", "muon", "memory_vs_estimate", "mfu",
             "document_attention"]
    assert list(summary["checks"]) == names and summary["passed"] and summary["dry_run"]
    assert [line.split()[1] for line in lines if line.startswith(("PASS", "FAIL"))] == names
    checks = summary["checks"]
    assert checks["grouped_gemm"]["max_relative_error"] <= 2e-2  # the comparisons ran, not only the code
    assert checks["fused_adamw"]["max_relative_difference"] <= 1e-5
    assert checks["muon"]["max_relative_error"] <= 1e-5  # on the CPU the iteration runs in fp32
    assert checks["memory_vs_estimate"]["relative_gap"] <= 0.15
    assert checks["document_attention"]["max_relative_error"] <= 1e-5  # fp32 on the CPU


def test_without_a_gpu_it_says_how_to_dry_run() -> None:
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: no CUDA GPU here; run with --dry-run to exercise the checks on the CPU"
