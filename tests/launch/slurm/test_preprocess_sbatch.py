"""launch/slurm/preprocess.sbatch on a real SLURM, the way users run it: an array of 4 tasks with
one of them cancelled mid-shard, its resubmission, and the merge, which must equal one run.

Needs a SLURM controller that this machine can submit to (any cluster, or a one-node SLURM
started locally); CI has none, so it skips there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from data_tools import preprocess_data
from tests.data_tools.helpers import dataset_bytes

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "launch" / "slurm" / "preprocess.sbatch"
SHARD_MB = 6  # per task: long enough to cancel one mid-shard, short enough for a test
TIMEOUT_S = 300


def _slurm_reason_to_skip() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH: no SLURM here (CI has none)"
    try:
        info = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sbatch is on PATH but sinfo does not answer ({exc})"
    if info.returncode or not re.search(r"idle|mixed|allocated", info.stdout):
        return f"sbatch is on PATH but no SLURM controller with a usable node answers ({info.stderr.strip()})"
    return None


SKIP = _slurm_reason_to_skip()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=str(SKIP))


def _run(*argv: str, cwd: Path) -> str:
    return subprocess.run(argv, cwd=cwd, check=True, capture_output=True, text=True, timeout=60).stdout.strip()


class Jobs:
    """The jobs this test submits, so that every one of them is cancelled at the end, whatever happens."""

    def __init__(self, cwd: Path, args: list[str]) -> None:
        self.cwd, self.args, self.ids = cwd, args, []
        self.name = f"preprocess-test-{uuid.uuid4().hex[:8]}"
        self.env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def submit(self, array: str, *extra: str) -> str:
        out = subprocess.run(["sbatch", "--parsable", f"--array={array}", "--cpus-per-task=1",
                              f"--job-name={self.name}", f"--output={self.cwd}/logs/%x-%A_%a.out", str(SCRIPT),
                              *self.args, *extra], cwd=self.cwd, env=self.env, check=True, capture_output=True,
                             text=True, timeout=60).stdout.strip()
        self.ids.append(out.split(";")[0])
        return self.ids[-1]

    def merge_job(self, array_job: str) -> str:
        """The merge the array's first task submitted (it says so in its log)."""
        log = self.log(array_job, wait_for="merge: job ")
        self.ids.append(re.search(r"merge: job (\d+)", log)[1])
        return self.ids[-1]

    def log(self, array_job: str, task: int | None = None, wait_for: str = "") -> str:
        pattern = f"{self.name}-{array_job}_*.out" if task is None else f"{self.name}-{array_job}_{task}.out"
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            text = "".join(p.read_text() for p in sorted((self.cwd / "logs").glob(pattern)))
            if wait_for in text:
                return text
            assert time.monotonic() < deadline, f"no {wait_for!r} in {pattern} within {TIMEOUT_S} s"
            time.sleep(0.2)

    def cancel_all(self) -> None:
        if self.ids:
            subprocess.run(["scancel", *self.ids], capture_output=True, timeout=60)


def job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=60).stdout
    return re.search(r"JobState=(\w+)", out)[1]


def wait_until_done(job: str) -> str:
    """The final state of a job (an array: of each task), once none is pending or running."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True,
                             timeout=60).stdout
        states = re.findall(r"JobState=(\w+)", out)
        if states and not {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING"} & set(states):
            return " ".join(sorted(set(states)))
        assert time.monotonic() < deadline, f"job {job} still not done after {TIMEOUT_S} s: {states}"
        time.sleep(0.5)


def _corpus(raw: Path) -> None:
    """4 × SHARD_MB of jsonl in three files, the middle one cut across three shards."""
    raw.mkdir()
    line = 0
    for name, shards in (("a.jsonl", 0.5), ("b.jsonl", 3.0), ("c.jsonl", 0.5)):
        size, lines = 0, []
        while size < shards * SHARD_MB * 1e6:
            lines.append(json.dumps({"text": f"document {line}: " + "word " * (line % 97)}) + "\n")
            size, line = size + len(lines[-1]), line + 1
        (raw / name).write_text("".join(lines))


def test_an_array_with_a_cancelled_task_resubmitted_merges_to_one_run(tmp_path: Path) -> None:
    _corpus(tmp_path / "raw")
    (tmp_path / "logs").mkdir()
    args = ["--input", "raw", "--output-prefix", "out/corpus", "--tokenizer-type", "ByteTokenizer", "--append-eod"]
    jobs = Jobs(tmp_path, args)
    try:
        array = jobs.submit("0-3")
        first_merge = jobs.merge_job(array)
        shard2 = tmp_path / "out" / "corpus.shards" / "shard-00002-of-00004_text_document.bin.tmp"
        deadline = time.monotonic() + TIMEOUT_S
        while not (shard2.exists() and shard2.stat().st_size):  # task 2 is writing its shard
            assert time.monotonic() < deadline and job_state(f"{array}_2") in ("PENDING", "RUNNING"), (
                "task 2 ended before it could be cancelled")
            time.sleep(0.02)
        _run("scancel", f"{array}_2", cwd=tmp_path)

        assert wait_until_done(array) == "CANCELLED COMPLETED"
        assert wait_until_done(first_merge) == "CANCELLED"  # its dependency can no longer be met
        shards = tmp_path / "out" / "corpus.shards"
        assert sorted(p.name for p in shards.glob("*.done.json")) == [f"shard-0000{i}-of-00004.done.json"
                                                                      for i in (0, 1, 3)]
        assert [p.name for p in shards.glob("shard-00002-*")] == ["shard-00002-of-00004.lock"]  # nothing else
        assert "nothing was left behind" in jobs.log(array, 2)
        assert not (tmp_path / "out" / "corpus_text_document.bin").exists()

        again = jobs.submit("0,2", "--num-shards", "4")  # a done task with it: it must do nothing
        second_merge = jobs.merge_job(again)
        assert wait_until_done(again) == "COMPLETED"
        assert wait_until_done(second_merge) == "COMPLETED"
        assert "shard 0 of 4 is already complete" in jobs.log(again, 0)
        assert "shard 2 of 4 complete" in jobs.log(again, 2)
        assert "merged 4 shards" in (tmp_path / "logs" / f"{jobs.name}-merge-{second_merge}.out").read_text()
    finally:
        jobs.cancel_all()

    preprocess_data.main(["--input", str(tmp_path / "raw"), "--output-prefix", str(tmp_path / "single"), *args[4:]])
    assert dataset_bytes(str(tmp_path / "out" / "corpus_text_document")) == dataset_bytes(
        str(tmp_path / "single_text_document"))
