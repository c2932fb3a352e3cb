"""preprocess_data.py under real faults: Ctrl-C and SIGTERM sent to the whole process group mid-run,
a read-only output directory, a full disk, a worker process that dies. Each must end in one line,
with nothing left behind, and never hang."""

from __future__ import annotations

import gzip
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_tools.preprocess import pool, readers, writer
from megamoe.data import indexed
from megamoe.errors import UserError, format_bytes
from tests.data_tools.test_preprocess_data import GOOD, REPO, user_error
from tests.faults import full_disk_writes, read_only_dir, small_filesystem

STOP_WITHIN_S = 5.0


@pytest.fixture(scope="module")
def endless_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~400 MB of jsonl in ~1 MB of .jsonl.gz (one gzip member, repeated): far more than a run
    gets through before it is stopped. A bad first line keeps --skip-bad-docs' rejects file open."""
    member = gzip.compress(GOOD * ((1 << 20) // len(GOOD)))
    path = tmp_path_factory.mktemp("endless") / "in.jsonl.gz"
    path.write_bytes(gzip.compress(b"{oops\n") + member * 400)
    return path


def _start(input_path: Path, out_dir: Path, log: Path, workers: int) -> subprocess.Popen:
    """The tool as a terminal starts it: in a process group of its own, with its workers."""
    argv = [sys.executable, "-m", "data_tools.preprocess_data", "--input", str(input_path), "--output-prefix",
            str(out_dir / "out"), "--tokenizer-type", "ByteTokenizer", "--workers", str(workers), "--skip-bad-docs"]
    with open(log, "w") as stderr:  # a file, not a pipe nobody reads while it runs
        return subprocess.Popen(argv, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=stderr,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_until_writing(proc: subprocess.Popen, bin_tmp: Path) -> None:
    """Until the run has written tokens, so that its workers are busy."""
    deadline = time.monotonic() + 60
    while not (bin_tmp.exists() and bin_tmp.stat().st_size > 0):
        assert proc.poll() is None, f"the run ended (exit code {proc.returncode}) before it wrote anything"
        assert time.monotonic() < deadline, "the run wrote nothing within 60 s"
        time.sleep(0.01)


def _stop_within(proc: subprocess.Popen, seconds: float) -> int:
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"still running {seconds} s after the signal: it hangs")


TRIES = [(signal.SIGINT, 2, 0), (signal.SIGINT, 2, 1), (signal.SIGINT, 2, 2),
         (signal.SIGINT, 1, 3), (signal.SIGTERM, 2, 4)]


@pytest.mark.parametrize("signum, workers, seed", TRIES,
                         ids=[f"{s.name}-{w}workers-{seed}" for s, w, seed in TRIES])
def test_signal_to_the_process_group_stops_cleanly(tmp_path: Path, endless_input: Path,
                                                   signum: signal.Signals, workers: int, seed: int) -> None:
    out_dir, log = tmp_path / "out", tmp_path / "stderr.txt"
    out_dir.mkdir()
    proc = _start(endless_input, out_dir, log, workers)
    _wait_until_writing(proc, out_dir / "out_text_document.bin.tmp")
    time.sleep(random.Random(seed).uniform(0, 1))  # the hang was intermittent: stop at different moments
    assert proc.poll() is None, "the run ended before the signal; make the input larger"
    os.killpg(proc.pid, signum)  # what a terminal does on Ctrl-C
    assert _stop_within(proc, STOP_WITHIN_S) == 128 + signum
    assert os.listdir(out_dir) == []  # no .bin/.idx, no .tmp, no rejects file
    err = log.read_text()
    assert "Traceback" not in err
    lines = [line for line in re.split(r"[\r\n]+", err) if line.strip() and not line.startswith("tokenizing")]
    assert len(lines) == 1, err
    assert re.fullmatch(rf"interrupted: {re.escape(str(out_dir))}/out_text_document\.bin/\.idx not written "
                        rf"\((no documents done yet|[\d,]+ of ~[\d,]+ documents done)\); nothing was left behind",
                        lines[0]), lines[0]


def test_read_only_output_directory_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(GOOD * 10)
    with read_only_dir(tmp_path / "ro") as ro:
        reason = r"\((Read-only file system|Permission denied)\); choose a writable --output-prefix"
        error = user_error(capsys, [path], ro / "out")
        assert re.fullmatch(rf"{re.escape(str(ro))}/out_text_document\.bin\.tmp: cannot write {reason}", error), error
        error = user_error(capsys, [path], ro / "sub" / "out")  # the directory it would create
        assert re.fullmatch(rf"{re.escape(str(ro))}/sub: cannot write {reason}", error), error
        assert os.listdir(ro) == []


FULL_DISK = (r"(?P<path>.+): cannot write \(No space left on device\): the disk is full \((needs (?P<needs>[\d.,]+ "
             r"\w+), )?(?P<free>[\d.,]+ \w+) free\); free some space or choose another --output-prefix")
UNITS = {"bytes": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}


def _bytes(size: str) -> float:
    """format_bytes, read back."""
    number, unit = size.split()
    return float(number.replace(",", "")) * UNITS[unit]


PAGE = 4096
DISKS = [  # (filesystem size, documents, workers, the file being written when it fills)
    (64 * PAGE, 20_000, 2, "out_text_document.bin.tmp"),  # ~1 MB of tokens into 256 KiB
    (PAGE, 80, 1, "out_text_document.idx.tmp"),  # 3,360 bytes of tokens fill the only page; the index finds none
]


@pytest.mark.parametrize("size, documents, workers, filling", DISKS, ids=["tokens", "index"])
def test_full_disk_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                               size: int, documents: int, workers: int, filling: str) -> None:
    monkeypatch.setattr(readers, "CHUNK_BYTES", 16 << 10)  # some chunks fit before the disk is full
    path = tmp_path / "in.jsonl"
    path.write_bytes(GOOD * documents)
    with small_filesystem(tmp_path / "disk", size) as disk:
        error = re.fullmatch(FULL_DISK, user_error(capsys, [path], disk / "out", "--workers", str(workers)))
        assert error and error["path"] == f"{disk}/{filling}"
        assert error["free"] == format_bytes(size)  # measured once the temporaries, and the workers, were gone
        assert size < _bytes(error["needs"]) < 2 * documents * len(GOOD) * 2  # tokens (2 bytes each) and index
        assert os.listdir(disk) == []


FILLING = [(indexed, 8192, "out_text_document.bin.tmp"), (writer, 0, "out.rejects.jsonl.tmp")]


@pytest.mark.parametrize("module, room, filling", FILLING, ids=["dataset", "rejects"])
def test_full_disk_in_process_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch, module: object, room: int,
                                             filling: str) -> None:
    """The same through an injected ENOSPC, for machines where no filesystem can be mounted."""
    monkeypatch.setattr(readers, "CHUNK_BYTES", 2048)
    path = tmp_path / "in.jsonl"
    path.write_bytes(GOOD * 500 + b"{oops\n" + GOOD * 500)
    full_disk_writes(monkeypatch, module, room_bytes=room)
    error = re.fullmatch(FULL_DISK, user_error(capsys, [path], tmp_path / "out", "--skip-bad-docs"))
    assert error and error["path"] == f"{tmp_path}/{filling}"
    assert error["needs"] is not None
    assert os.listdir(tmp_path) == ["in.jsonl"]


def _no_setup() -> None:
    pass


def _killed_at_three(item: int) -> int:
    if item == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer would
    return item


def _fails_at_three(item: int) -> int:
    if item == 3:
        raise ValueError("three")
    return item


@pytest.mark.timeout(60)  # multiprocessing.Pool waited forever here
def test_a_worker_that_dies_is_one_line_not_a_hang() -> None:
    with pytest.raises(UserError, match=r"^worker process \d+ stopped unexpectedly \(killed by signal 9: Killed\); "
                                        r"if the machine ran out of memory, use fewer --workers$"):
        list(pool.ordered_map(_killed_at_three, range(20), 2, _no_setup, ()))


def test_a_worker_exception_is_raised_here_with_where_it_happened() -> None:
    with pytest.raises(ValueError, match="three") as info:
        list(pool.ordered_map(_fails_at_three, range(20), 2, _no_setup, ()))
    assert "in worker process" in info.value.__notes__[0] and "_fails_at_three" in info.value.__notes__[0]
