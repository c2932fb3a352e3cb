"""``launch/pretrain.py`` as users run it — one plain process, torchrun, or processes given their
rank in the environment as ``srun`` does — for the tests that need the real command: exit codes,
the lines users see, files on disk; and catching a save in the act, to hit it with a signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
TINY = ["+exp=tiny", "train.global_batch=4", "train.micro_batch=1", "train.seq_len=32", "train.warmup_steps=1",
        "train.log_interval=1"]


def pretrain_command(run_dir: Path, *overrides: str, nproc: int = 1, torchrun: Sequence[str] = ()) -> list[str]:
    """One plain process, or torchrun with ``nproc`` workers (``torchrun`` replaces --standalone,
    e.g. a multi-node rendezvous, and adds options such as --max-restarts)."""
    script = ["launch/pretrain.py", *TINY, f"run.dir={run_dir}", *overrides]
    if nproc == 1 and not torchrun:
        return [sys.executable, *script]
    return [TORCHRUN, *(torchrun or ["--standalone"]), f"--nproc_per_node={nproc}", *script]


def pretrain_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **extra}


def run_pretrain(run_dir: Path, *overrides: str, nproc: int = 1, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(pretrain_command(run_dir, *overrides, nproc=nproc), cwd=ROOT, env=pretrain_env(),
                          capture_output=True, text=True, timeout=timeout)


def start_pretrain(run_dir: Path, *overrides: str, nproc: int = 1, torchrun: Sequence[str] = (),
                   **env: str) -> subprocess.Popen:
    """The run in the background (``env`` added to its environment), its output (stdout and stderr
    together) on a pipe."""
    return subprocess.Popen(pretrain_command(run_dir, *overrides, nproc=nproc, torchrun=torchrun), cwd=ROOT,
                            env=pretrain_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def start_ranks(run_dir: Path, *overrides: str, nproc: int, port: int) -> list[subprocess.Popen]:
    """``nproc`` plain processes told their rank through RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT,
    as srun's tasks are (no torchrun agent to restart or stop them); output (stdout and stderr) on pipes."""
    base = {k: v for k, v in pretrain_env().items() if k not in ("LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT")}
    base.update(WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return [subprocess.Popen(pretrain_command(run_dir, *overrides), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)})
            for r in range(nproc)]


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def catch_a_save(checkpoints: Path, pids: Callable[[], list[int]], caught: Callable[[Path], bool],
                 after_step: int = 1, timeout: float = 180) -> Path:
    """Freeze a run in the middle of a save: wait for a ``step_N.tmp/`` (N > ``after_step``), stop
    every process in ``pids()`` (SIGSTOP), and return that directory if ``caught(it)`` holds — the
    processes stay stopped, for the caller to signal and continue; otherwise let them go on
    (SIGCONT) and wait for the next save. A tiny model's save takes milliseconds, so it may take a
    few saves to land in the moment wanted."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        saving = [p for p in checkpoints.glob("step_*.tmp")
                  if int(p.name.removeprefix("step_").removesuffix(".tmp")) > after_step]
        if saving:
            frozen = pids()
            signal_all(frozen, signal.SIGSTOP)
            if saving[0].is_dir() and caught(saving[0]):
                return saving[0]
            signal_all(frozen, signal.SIGCONT)
        time.sleep(0.001)
    raise AssertionError(f"no save in {checkpoints} was caught in the moment wanted within {timeout:.0f} s")


def logged(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    """The complete records of a run's metrics.jsonl (or eval.jsonl) so far; a line torn by a
    kill in mid-write is left out."""
    path, records = run_dir / name, []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


def logged_steps(run_dir: Path) -> list[int]:
    """The steps metrics.jsonl holds, in file order."""
    return [record["step"] for record in logged(run_dir)]


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """Global rank → pid of a torchrun's workers (its children, whose environment holds RANK)."""
    workers = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != launcher_pid:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        rank = next((int(v[5:]) for v in environ if v.startswith(b"RANK=")), None)
        if rank is not None:
            workers[rank] = int(stat.parent.name)
    return workers
