"""Sharded preprocessing: the merge of N shards is byte-identical to one run; complete shards are
not redone; a killed shard leaves nothing the merge would take; the merge names what stops it."""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools import preprocess_data
from data_tools.preprocess import writer
from data_tools.preprocess.plan import plan_shares
from data_tools.preprocess.readers import expand_inputs
from data_tools.preprocess.shards import Shard, index_ranges
from tests.data_tools.helpers import dataset_bytes, jsonl_texts, tokenizer_argv
from tests.data_tools.test_preprocess_data import REPO, user_error
from tests.faults import read_only_dir

FLAGS = ["--append-eod", "--skip-bad-docs", "--tokenizer-type", "ByteTokenizer"]
BAD = [b'{"text": oops}\n', b'{"body": "no text key"}\n', b"\n", b'{"text": 7}\n']


@pytest.fixture(scope="module")
def raw(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every kind of input, in one directory: a plain jsonl with bad and blank lines all through it
    (split by bytes), a .jsonl.gz (read whole), a parquet of small row groups (split by row group),
    a .txt, and an empty file."""
    raw = tmp_path_factory.mktemp("raw")
    texts = jsonl_texts(corpus_dir / "en.jsonl") + jsonl_texts(corpus_dir / "zh.jsonl")
    lines = [json.dumps({"text": t}, ensure_ascii=False).encode() + b"\n" for t in texts]
    for i, bad in enumerate(BAD * 6):
        lines.insert(len(lines) * (i + 1) // 25, bad)
    (raw / "a.jsonl").write_bytes(b"".join(lines))
    (raw / "b.jsonl.gz").write_bytes(gzip.compress((corpus_dir / "code.jsonl").read_bytes()))
    pq.write_table(pa.table({"text": texts[::3]}), raw / "c.parquet", row_group_size=16)
    (raw / "d.txt").write_text("".join(t.replace("\n", " ") + "\n" for t in texts[1::5]), encoding="utf-8")
    (raw / "e.jsonl").write_bytes(b"")
    return raw


@pytest.fixture(scope="module")
def single(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one run over the same inputs."""
    prefix = tmp_path_factory.mktemp("single") / "out"
    preprocess_data.main(["--input", str(raw), "--output-prefix", str(prefix), *FLAGS])
    return prefix


def shard(raw: Path, prefix: Path, index: int, count: int, *flags: str):
    return preprocess_data.main(["--input", str(raw), "--output-prefix", str(prefix), *(flags or FLAGS),
                                 "--shard-index", str(index), "--num-shards", str(count)])


def merge(raw: Path, prefix: Path, count: int, *flags: str):
    return preprocess_data.main(["--input", str(raw), "--output-prefix", str(prefix), *(flags or FLAGS),
                                 "--num-shards", str(count), "--merge-shards"])


def outputs(prefix: Path) -> tuple[bytes, bytes, bytes]:
    return (*dataset_bytes(f"{prefix}_text_document"), Path(f"{prefix}.rejects.jsonl").read_bytes())


@pytest.mark.parametrize("count", [1, 2, 5])
def test_merged_shards_are_byte_identical_to_one_run(raw: Path, single: Path, tmp_path: Path, count: int) -> None:
    for i in range(count):
        shard(raw, tmp_path / "out", i, count)
    merged = merge(raw, tmp_path / "out", count)
    assert outputs(tmp_path / "out") == outputs(single)  # tokens, index, and the rejects with their file lines
    assert merged.shards == count and merged.rejected == len(BAD * 6) - 6  # blank lines are not rejects
    if count == 5:  # the inputs really were cut: text by bytes, parquet by row groups, gzip never
        pieces = [p for share in plan_shares(expand_inputs([str(raw)]), count) for p in share]
        assert {p.path.suffix for p in pieces if not p.whole} == {".jsonl", ".parquet"}
        assert [p for p in pieces if p.path.name == "b.jsonl.gz"] == [p for p in pieces if p.path.name == "b.jsonl.gz"
                                                                       and p.whole]


def test_several_keys_merge_to_aligned_datasets(tmp_path: Path, corpus_dir: Path) -> None:
    (tmp_path / "raw").mkdir()
    rows = [{"title": t[:20], "text": t} for t in jsonl_texts(corpus_dir / "en.jsonl")]
    (tmp_path / "raw" / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    keys = ["--json-keys", "title", "text", *FLAGS]
    for i in range(3):
        shard(tmp_path / "raw", tmp_path / "out", i, 3, *keys)
    merge(tmp_path / "raw", tmp_path / "out", 3, *keys)
    preprocess_data.main(["--input", str(tmp_path / "raw"), "--output-prefix", str(tmp_path / "one"), *keys])
    for key in ("title", "text"):
        assert dataset_bytes(f"{tmp_path}/out_{key}_document") == dataset_bytes(f"{tmp_path}/one_{key}_document")


def test_a_complete_shard_is_not_redone(raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    first = shard(raw, tmp_path / "out", 1, 3)
    files = sorted((tmp_path / "out.shards").iterdir())
    stamps = [p.stat().st_mtime_ns for p in files]
    capsys.readouterr()
    again = shard(raw, tmp_path / "out", 1, 3)
    assert again.summary is None
    assert capsys.readouterr().out == (f"shard 1 of 3 is already complete ({tmp_path}/out.shards/shard-00001-of-00003"
                                       f".done.json: {first.summary.documents:,} documents, "
                                       f"{first.summary.tokens:,} tokens); nothing to do\n")
    assert sorted((tmp_path / "out.shards").iterdir()) == files and [p.stat().st_mtime_ns for p in files] == stamps


def test_an_interrupted_shard_leaves_nothing_and_only_it_is_redone(raw: Path, single: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    for i in (0, 2):
        shard(raw, tmp_path / "out", i, 3)
    real_write = writer._write

    def interrupted_write(builders, enc) -> None:
        raise KeyboardInterrupt  # as SIGTERM from scancel does (tests/launch/slurm sends the real one)

    monkeypatch.setattr(writer, "_write", interrupted_write)
    with pytest.raises(SystemExit) as exit_info:
        shard(raw, tmp_path / "out", 1, 3)
    assert exit_info.value.code == 130
    assert [p.name for p in (tmp_path / "out.shards").glob("shard-00001-*")] == ["shard-00001-of-00003.lock"]
    assert user_error(capsys, [raw], tmp_path / "out", *FLAGS[:2], "--num-shards", "3", "--merge-shards").startswith(
        f"cannot merge {tmp_path}/out.shards, shards of a 3-shard split: missing: 1; rerun those shards")
    monkeypatch.setattr(writer, "_write", real_write)
    capsys.readouterr()
    for i in range(3):
        shard(raw, tmp_path / "out", i, 3)
    said = capsys.readouterr().out
    assert said.count("is already complete") == 2 and "shard 1 of 3 complete" in said
    merge(raw, tmp_path / "out", 3)
    assert outputs(tmp_path / "out") == outputs(single)


def test_a_shard_killed_outright_is_redone_by_its_rerun(tmp_path: Path) -> None:
    """kill -9 (the out-of-memory killer, a lost node): temporaries stay, but no marker, so the
    merge does not take the shard and the rerun writes it again."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "big.jsonl").write_bytes(b"".join(json.dumps({"text": f"document {i} " + "word " * (i % 50)}).encode()
                                             + b"\n" for i in range(40_000)))  # 6 MB: shard 1 takes a few chunks
    proc = subprocess.Popen([sys.executable, "-m", "data_tools.preprocess_data", "--input", str(raw), "--output-prefix",
                             str(tmp_path / "out"), *FLAGS, "--shard-index", "1", "--num-shards", "2"],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    tmp_bin = tmp_path / "out.shards" / "shard-00001-of-00002_text_document.bin.tmp"
    deadline = time.monotonic() + 60
    while not (tmp_bin.exists() and tmp_bin.stat().st_size):
        assert proc.poll() is None and time.monotonic() < deadline, "the shard ended before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tmp_bin.exists() and not Path(Shard(str(tmp_path / "out"), 1, 2).marker).exists()
    with pytest.raises(SystemExit):
        merge(raw, tmp_path / "out", 2)
    runs = [shard(raw, tmp_path / "out", i, 2) for i in range(2)]
    assert all(run.summary is not None for run in runs) and not tmp_bin.exists()
    merge(raw, tmp_path / "out", 2)
    preprocess_data.main(["--input", str(raw), "--output-prefix", str(tmp_path / "one"), *FLAGS])
    assert dataset_bytes(str(tmp_path / "out_text_document")) == dataset_bytes(str(tmp_path / "one_text_document"))


def test_the_merge_names_every_shard_that_stops_it(raw: Path, tmp_path: Path, hf_model: str,
                                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    shard(raw, out, 0, 5, *FLAGS[:2], *tokenizer_argv("HuggingFaceTokenizer", hf_model))
    shard(raw, out, 1, 5)
    shard(raw, out, 2, 5, "--skip-bad-docs", "--tokenizer-type", "ByteTokenizer")  # no --append-eod
    shard(raw, out, 4, 5)
    error = user_error(capsys, [raw], out, *FLAGS[:2], "--num-shards", "5", "--merge-shards")
    assert error == (f"cannot merge {out}.shards, shards of a 5-shard split: made with another tokenizer: 0; "
                     f"made with other flags (--append-eod): 2; missing: 3; rerun those shards (--shard-index, or "
                     f"sbatch --array=0,2-3 launch/slurm/preprocess.sbatch --num-shards 5 <the same arguments>), "
                     f"then merge")
    assert not list(tmp_path.glob("out_*")) and not list(tmp_path.glob("out.rejects*"))
    capsys.readouterr()
    shard(raw, out, 0, 5)
    assert "(redone: the earlier one was made with another tokenizer)" in capsys.readouterr().out


def test_the_merge_checks_files_and_inputs_against_the_markers(raw: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    inputs = tmp_path / "raw"
    inputs.mkdir()
    for path in raw.iterdir():
        (inputs / path.name).write_bytes(path.read_bytes())
    for i in range(3):
        shard(inputs, out, i, 3)
    data = out.parent / "out.shards" / "shard-00001-of-00003_text_document.bin"
    original = data.read_bytes()
    data.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])  # same size, one bit off
    error = user_error(capsys, [inputs], out, *FLAGS[:2], "--num-shards", "3", "--merge-shards")
    assert error.startswith(f"cannot merge {out}.shards, shards of a 3-shard split: changed since they were done: 1;")
    capsys.readouterr()
    shard(inputs, out, 1, 3)  # the damaged shard is redone, not taken as complete
    assert "(redone: the earlier one was done, but shard-00001-of-00003_text_document.bin no longer matches" in (
        capsys.readouterr().out)
    os.utime(inputs / "d.txt")  # an input rewritten since the shards were made
    error = user_error(capsys, [inputs], out, *FLAGS[:2], "--num-shards", "3", "--merge-shards")
    assert error.startswith(f"cannot merge {out}.shards, shards of a 3-shard split: made from other inputs (files "
                            f"added, removed or changed since): 0-2;")


def test_a_shard_refuses_a_directory_of_another_split(raw: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    shard(raw, tmp_path / "out", 2, 4)
    error = user_error(capsys, [raw], tmp_path / "out", *FLAGS[:2], "--shard-index", "0", "--num-shards", "3")
    assert error == (f"{tmp_path}/out.shards holds shards of a 4-shard split (shard-00002-of-00004.done.json); "
                     f"pass --num-shards 4 to redo one of them, or move {tmp_path}/out.shards away to start a "
                     f"3-shard split")


def test_a_shard_being_written_is_not_written_twice(raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    lock_path = Shard(str(tmp_path / "out"), 1, 2).prefix + ".lock"
    os.makedirs(os.path.dirname(lock_path))
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another task, still running
        error = user_error(capsys, [raw], tmp_path / "out", *FLAGS[:2], "--shard-index", "1", "--num-shards", "2")
    assert error == (f"shard 1 of 2 is being written by another process right now ({lock_path} is locked); "
                     f"wait for it, or stop it first")


def test_an_unwritable_shard_directory_is_one_line(raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with read_only_dir(tmp_path / "ro") as ro:
        error = user_error(capsys, [raw], ro / "out", *FLAGS[:2], "--shard-index", "0", "--num-shards", "2")
    assert re.fullmatch(rf"{re.escape(str(ro))}/out\.shards: cannot write \((Read-only file system|Permission "
                        rf"denied)\); choose a writable --output-prefix", error), error


def test_shards_with_nothing_to_read_merge_too(tmp_path: Path, corpus_dir: Path) -> None:
    """One gzip file cut three ways: one shard reads it, two have empty shares."""
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "en.jsonl.gz").write_bytes(gzip.compress((corpus_dir / "en.jsonl").read_bytes()))
    runs = [shard(tmp_path / "raw", tmp_path / "out", i, 3) for i in range(3)]
    assert [run.summary.documents for run in runs] == [0, len(jsonl_texts(corpus_dir / "en.jsonl")), 0]
    merge(tmp_path / "raw", tmp_path / "out", 3)
    preprocess_data.main(["--input", str(tmp_path / "raw"), "--output-prefix", str(tmp_path / "one"), *FLAGS])
    assert dataset_bytes(str(tmp_path / "out_text_document")) == dataset_bytes(str(tmp_path / "one_text_document"))


@pytest.mark.parametrize("flags, message", [
    (["--shard-index", "0"], "--shard-index needs --num-shards N (how many shards the inputs are split into)"),
    (["--merge-shards"], "--merge-shards needs --num-shards N (how many shards the inputs are split into)"),
    (["--num-shards", "4"],
     "--num-shards needs --shard-index I (tokenize one shard) or --merge-shards (merge them all)"),
    (["--num-shards", "0", "--merge-shards"], "--num-shards must be at least 1, got 0"),
    (["--num-shards", "4", "--shard-index", "4"], "--shard-index 4 is out of range for --num-shards 4 (0 to 3)"),
    (["--num-shards", "4", "--shard-index", "1", "--merge-shards"],
     "--merge-shards merges every shard: drop --shard-index"),
])
def test_sharding_flag_mistakes_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, flags: list[str],
                                             message: str) -> None:
    (tmp_path / "in.jsonl").write_bytes(b'{"text": "a"}\n')
    assert user_error(capsys, [tmp_path / "in.jsonl"], tmp_path / "out", *flags) == message


def test_index_ranges_use_slurm_array_syntax() -> None:
    assert index_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8" and index_ranges([3]) == "3" and index_ranges([]) == ""
