"""``launch/pretrain.py`` as users run it — one plain process, or torchrun — for the tests that
need the real command: exit codes, the lines users see, files on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
TINY = ["+exp=tiny", "train.global_batch=4", "train.micro_batch=1", "train.seq_len=32", "train.warmup_steps=1",
        "train.log_interval=1"]


def pretrain_command(run_dir: Path, *overrides: str, nproc: int = 1) -> list[str]:
    script = ["launch/pretrain.py", *TINY, f"run.dir={run_dir}", *overrides]
    if nproc == 1:
        return [sys.executable, *script]
    return [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *script]


def pretrain_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **extra}


def run_pretrain(run_dir: Path, *overrides: str, nproc: int = 1, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(pretrain_command(run_dir, *overrides, nproc=nproc), cwd=ROOT, env=pretrain_env(),
                          capture_output=True, text=True, timeout=timeout)


def start_pretrain(run_dir: Path, *overrides: str, nproc: int = 1, **env: str) -> subprocess.Popen:
    """The run in the background (``env`` added to its environment), its output (stdout and stderr
    together) on a pipe."""
    return subprocess.Popen(pretrain_command(run_dir, *overrides, nproc=nproc), cwd=ROOT, env=pretrain_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def logged_steps(run_dir: Path) -> list[int]:
    """The steps metrics.jsonl holds, in file order."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []
