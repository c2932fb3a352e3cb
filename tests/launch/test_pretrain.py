"""launch/pretrain.py end to end: torchrun / DeepSpeed-style / SLURM env, bad layouts, metrics files."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from launch.convert_checkpoint import main as convert
from launch.pretrain import hydra_overrides
from megamoe.checkpoint import read_config
from megamoe.parallel.mesh import grid_rank_lists, read_launch_env
from megamoe.train.metrics import TENSORBOARD_DIR
from tests.dist.launcher import free_port
from tests.pretrain import logged, run_pretrain
from tests.train.test_metrics import jsonl_scalars, tensorboard_scalars

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
TINY = ["+exp=tiny", "train.global_batch=4", "train.micro_batch=1", "train.seq_len=32", "train.steps=4",
        "train.warmup_steps=1", "train.log_interval=2", "train.eval_interval=4", "train.eval_iters=1"]


def _launch(args: list[str], nproc: int, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "launch/pretrain.py", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_bad_layout_is_one_line_on_rank0_and_exit_2() -> None:
    result = _launch([*TINY, "parallel.ep=4"], nproc=2, timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: parallel.ep: 4 does not divide the data-parallel size 2 (world 2 / pp 1)"]
    assert 'pretrain.py", line' not in result.stderr  # torchrun prints its own traceback; ours prints none


def test_typo_is_one_line_and_exit_2_without_launcher() -> None:
    result = subprocess.run([sys.executable, "launch/pretrain.py", "+exp=tiny", "train.stepz=3"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: train.stepz: Key 'stepz' not in 'TrainConfig'"]


def test_two_process_pipeline_writes_metrics_and_eval(tmp_path: Path) -> None:
    """Layers 1 and 2 dense (moe.layer_freq): each stage reports its one MoE layer's expert load."""
    mixed = ["moe.layer_freq=[1,0,0,1]", "model.dense_ffn_hidden_size=96"]
    result = _launch([*TINY, *mixed, "parallel.pp=2", f"run.dir={tmp_path}", "logging.tensorboard.enabled=true"],
                     nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "consumed_samples"):
        assert all(key in r for r in records), key
    assert records[-1]["consumed_samples"] == 16
    assert set(records[1]["expert_fraction"]) == {"0", "3"}
    assert [json.loads(line)["step"] for line in (tmp_path / "eval.jsonl").read_text().splitlines()] == [4]
    assert "step 4/4" in result.stdout + result.stderr
    assert (tmp_path / "config.yaml").exists()
    assert len(list((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 1  # from one rank
    assert tensorboard_scalars(tmp_path) == jsonl_scalars(tmp_path)


def test_a_dense_model_trains_and_upcycles(tmp_path: Path) -> None:
    """The README's upcycling starts from a dense run: it logs every step (no expert load to show)
    and its checkpoints upcycle."""
    result = run_pretrain(tmp_path / "dense", "model.ffn_type=dense", "model.dense_ffn_hidden_size=128",
                          "train.steps=2", "checkpoint.interval=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in logged(tmp_path / "dense")] == [1, 2]
    assert not any("expert_load_max" in r for r in logged(tmp_path / "dense"))
    convert(["upcycle", "--dense", str(tmp_path / "dense/checkpoints"), "--output", str(tmp_path / "moe"),
             "--num-experts", "4"])
    assert read_config(tmp_path / "moe").moe.num_experts == 4


def _address_space(limit_mb: int) -> Callable[[], None]:
    """For subprocess's preexec_fn: the process (torchrun and the workers it starts) may map at most
    ``limit_mb`` MB, so that a larger allocation fails as on a machine that ran out of memory."""
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (limit_mb << 20, limit_mb << 20))


@pytest.mark.parametrize(("fault", "overrides", "line"), [
    ("missing data", ["data.kind=indexed", "data.sources=[{path: /nowhere/en_text_document, weight: 1}]"],
     r"error: /nowhere/en_text_document\.idx does not exist; expected a dataset written by "
     r"data_tools/preprocess_data\.py"),
    pytest.param("out of memory", ["model.vocab_size=4000000"],  # a 1 GB embedding under a 2.5 GB address space
     r"error: out of host memory: 1\.0 GB more could not be allocated with [\d.]+ [MG]B in use, so this rank needed at "
     r"least [\d.]+ GB; the estimator puts the layout's fullest rank at [\d.]+ GB \(launch/model_stats\.py\): lower "
     r"train\.micro_batch, set train\.activation_checkpointing=full, or spread the model over more ranks "
     r"\(parallel\.pp, parallel\.ep\); python launch/plan\.py finds a layout that fits", marks=pytest.mark.slow),
])
def test_a_failure_every_rank_meets_at_startup_is_one_line(tmp_path: Path, fault: str, overrides: list[str],
                                                          line: str) -> None:
    """Said once, by the lowest rank that fails, and torchrun's root cause holds that message."""
    result = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "launch/pretrain.py", *TINY,
                             *overrides, f"run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=_address_space(2500))
    assert result.returncode != 0
    errors = [error for error in result.stderr.splitlines() if error.startswith("error: ")]
    assert len(errors) == 1 and re.fullmatch(line, errors[0]), result.stderr[-4000:]
    root_cause = result.stderr.split("Root Cause")[1]
    assert errors[0].removeprefix("error: ").split(";")[0] in root_cause


def test_deepspeed_local_rank_argument_is_dropped() -> None:
    assert hydra_overrides(["--local_rank=3", "+exp=tiny", "train.steps=2"]) == ["+exp=tiny", "train.steps=2"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (3, 8, 1, "torchrun")),
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5"}, (5, 16, 5, "slurm")),
        ({}, (0, 1, 0, "single")),
    ],
)
def test_launch_env(env: dict[str, str], expected: tuple) -> None:
    e = read_launch_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.launcher) == expected


def test_grid_groups_partition_the_world() -> None:
    groups = grid_rank_lists(pp=2, dp=4, ep=2)
    for kind in ("pp", "dp", "ep", "edp"):
        assert sorted(r for g in groups[kind] for r in g) == list(range(8)), kind
    assert groups["ep"][0] == [0, 1] and groups["edp"][0] == [0, 2] and groups["pp"][0] == [0, 4]
    assert groups["embed"] == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_runs_under_slurm_environment(tmp_path: Path) -> None:
    """What `srun` gives each task (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID) is enough to train."""
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    base.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), SLURM_NTASKS="2")
    procs = [
        subprocess.Popen([sys.executable, "launch/pretrain.py", *TINY, "parallel.pp=2", f"run.dir={tmp_path}"],
                         cwd=ROOT, env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4


@pytest.mark.slow
def test_runs_under_deepspeed_launcher(tmp_path: Path) -> None:
    """`deepspeed --num_gpus N launch/pretrain.py ...` (the launcher only; CPU accelerator here)."""
    pytest.importorskip("deepspeed")
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    port = str(free_port())  # not the launcher's default 29500, which another run may hold
    result = subprocess.run([deepspeed, "--num_gpus", "2", "--master_port", port, "launch/pretrain.py", *TINY,
                             "parallel.pp=2", f"run.dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4


def test_sigusr1_through_torchrun_saves_a_checkpoint(tmp_path: Path) -> None:
    """The SLURM preemption path: torchrun forwards SIGUSR1, every rank saves the same step and exits 0.

    torchrun itself then exits 1: after forwarding a signal it re-raises it (SignalException).
    """
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", "--signals-to-handle=SIGTERM,SIGINT,SIGUSR1",
           "--shutdown-timeout=60", "launch/pretrain.py", *TINY, "parallel.pp=2", "train.steps=100000",
           "checkpoint.interval=100000", f"run.dir={tmp_path}"]
    log = tmp_path / "output.log"  # a file, not a pipe: nobody reads while it trains
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=sink,
                                stderr=subprocess.STDOUT)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"never saw step 3; output:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    proc.wait(timeout=120)
    out = log.read_text()
    assert proc.returncode == 1, out[-3000:]  # torchrun re-raises the signal it forwarded ...
    assert f"SignalException: Process {proc.pid} got signal: {signal.SIGUSR1.value}" in out
    stopped = re.findall(r"stopping after step (\d+) on SIGUSR1; the checkpoint is saved", out)
    assert len(stopped) == 1, out[-3000:]  # ... after the workers stopped cleanly (rank 0 says so once)
    step = int(stopped[0])
    assert json.loads(metrics.read_text().splitlines()[-1])["step"] == step
    assert 3 <= step < 100000
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / f"step_{step}" / "manifest.json").exists()
    assert (checkpoints / "latest").read_text().strip() == f"step_{step}"
