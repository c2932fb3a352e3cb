"""preprocess_data.py: tokens on disk equal direct tokenization; formats, workers, bad and empty input,
damaged .gz files, interruption, leftovers of earlier runs."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools import preprocess_data
from data_tools.preprocess import readers, writer
from tests.data_tools.helpers import dataset_bytes, jsonl_texts, read_docs, reference_encoder, tokenizer_argv

REPO = Path(__file__).resolve().parents[2]
GOOD_TEXT = "Alice lives in Paris."
GOOD = json.dumps({"text": GOOD_TEXT}).encode() + b"\n"


def run(inputs: list, prefix: Path, *extra: str, tokenizer: tuple[str, Optional[str]] = ("ByteTokenizer", None)):
    argv = ["--input", *map(str, inputs), "--output-prefix", str(prefix), *tokenizer_argv(*tokenizer), *extra]
    return preprocess_data.main(argv)


def user_error(capsys: pytest.CaptureFixture, inputs: list, prefix: Path, *extra: str, **kw) -> str:
    """Run expecting a user error; returns its one stderr line (after the progress bar, if any)."""
    with pytest.raises(SystemExit) as exit_info:
        run(inputs, prefix, *extra, **kw)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    assert last.startswith("error: ") and "Traceback" not in last
    return last[len("error: "):]


def test_round_trip_equals_direct_tokenization(tmp_path: Path, corpus_dir: Path, tokenizer_args) -> None:
    summary = run([corpus_dir], tmp_path / "out", "--append-eod", tokenizer=tokenizer_args)
    encode, eod = reference_encoder(*tokenizer_args)
    texts = [t for name in ("code", "en", "zh") for t in jsonl_texts(corpus_dir / f"{name}.jsonl")]  # directory order
    expected = [encode(t) + [eod] for t in texts]
    assert read_docs(str(tmp_path / "out_text_document")) == expected
    assert summary.documents == len(texts) and summary.tokens == sum(map(len, expected))
    assert summary.empty == 0 and not summary.rejected


def test_without_append_eod_documents_are_bare(tmp_path: Path, corpus_dir: Path) -> None:
    run([corpus_dir / "en.jsonl"], tmp_path / "out")
    expected = [list(t.encode()) for t in jsonl_texts(corpus_dir / "en.jsonl")]
    assert read_docs(str(tmp_path / "out_text_document")) == expected


def test_all_input_formats_give_identical_bytes(
    tmp_path: Path, corpus_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = jsonl_texts(corpus_dir / "en.jsonl") + jsonl_texts(corpus_dir / "zh.jsonl")  # one line each: fits .txt
    lines = "".join(json.dumps({"text": t, "id": i}, ensure_ascii=False) + "\n" for i, t in enumerate(texts))
    (tmp_path / "a.jsonl").write_text(lines, encoding="utf-8")
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    (tmp_path / "a.txt").write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), tmp_path / "a.parquet", row_group_size=50)
    monkeypatch.setattr(readers, "PARQUET_BATCH_ROWS", 16)  # many record batches
    outputs = {}
    for name in ("a.jsonl", "a.jsonl.gz", "a.txt", "a.parquet"):
        run([tmp_path / name], tmp_path / name.replace(".", "_"), "--append-eod")
        outputs[name] = dataset_bytes(str(tmp_path / name.replace(".", "_")) + "_text_document")
    assert len(set(outputs.values())) == 1
    assert read_docs(str(tmp_path / "a_parquet_text_document")) == [list(t.encode()) + [256] for t in texts]


def test_workers_give_identical_bytes(
    tmp_path: Path, corpus_dir: Path, hf_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(readers, "CHUNK_BYTES", 2048)  # dozens of chunks, so all workers get several
    inputs = [corpus_dir / "zh.jsonl", corpus_dir / "code.jsonl"]
    assert len(list(readers.read_chunks(inputs, ["text"]))) > 12
    tok = ("HuggingFaceTokenizer", hf_model)
    run(inputs, tmp_path / "one", "--append-eod", "--workers", "1", tokenizer=tok)
    run(inputs, tmp_path / "four", "--append-eod", "--workers", "4", tokenizer=tok)
    assert dataset_bytes(str(tmp_path / "one_text_document")) == dataset_bytes(str(tmp_path / "four_text_document"))


def test_several_keys_write_aligned_datasets(tmp_path: Path) -> None:
    rows = [{"title": "A", "text": "alpha"}, {"title": "", "text": "skipped: blank title"},
            {"title": "C", "text": "gamma"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run([tmp_path / "in.jsonl"], tmp_path / "out", "--json-keys", "title", "text")
    assert read_docs(str(tmp_path / "out_title_document")) == [[65], [67]]
    assert read_docs(str(tmp_path / "out_text_document")) == [list(b"alpha"), list(b"gamma")]
    assert summary.empty == 1


BAD_LINES = [  # (line, reason kind, message the user sees after "path:2: ")
    (b'{"text": "a",}\n', "malformed JSON",
     "malformed JSON: Expecting property name enclosed in double quotes at column 14"),
    (b'{"text": "a"} {"text": "b"}\n', "malformed JSON", "malformed JSON: Extra data at column 15"),
    (b'["a"]\n', "not a JSON object", "expected a JSON object, got an array"),
    (b'{"body": "a", "id": 3}\n', "missing key", "missing key 'text' (keys: 'body', 'id')"),
    (b'{"text": 5}\n', "non-string value", "'text' is a number, not a string"),
    (b'{"text": null}\n', "non-string value", "'text' is null, not a string"),
    (b'{"text": "caf\xe9"}\n', "invalid UTF-8", "invalid UTF-8 at byte 13"),
    (b'{"text": "bad \\udc80 escape"}\n', "invalid UTF-8", "invalid UTF-8: a lone surrogate escape"),
]


@pytest.mark.parametrize("line, kind, message", BAD_LINES, ids=[f"{k}-{i}" for i, (_, k, _) in enumerate(BAD_LINES)])
def test_bad_document_stops_with_its_location(tmp_path: Path, capsys: pytest.CaptureFixture,
                                              line: bytes, kind: str, message: str) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(GOOD + line + GOOD)
    error = user_error(capsys, [path], tmp_path / "out")
    assert error == f"{path}:2: {message} (pass --skip-bad-docs to skip and count such documents)"
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]  # nothing written, not even temporaries


@pytest.mark.parametrize("tokenizer", ["HuggingFaceTokenizer", "SentencePieceTokenizer"])
def test_lone_surrogates_are_rejected_by_every_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                         tokenizer: str, hf_model: str, sp_model: str) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(GOOD + GOOD + b'{"text": "\\ud800"}\n')
    model = hf_model if tokenizer == "HuggingFaceTokenizer" else sp_model
    error = user_error(capsys, [path], tmp_path / "out", tokenizer=(tokenizer, model))
    assert error.startswith(f"{path}:3: invalid UTF-8: a lone surrogate escape")


def test_skip_bad_docs_counts_reasons_and_writes_rejects(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    blank_lines = b"\n" + b'{"text": "  \\n "}\n'  # an empty line and a whitespace-only document
    path.write_bytes(GOOD + b"".join(line for line, _, _ in BAD_LINES) + blank_lines + b'{"text": "end"}\n')
    summary = run([path], tmp_path / "out", "--skip-bad-docs", "--append-eod")
    assert read_docs(str(tmp_path / "out_text_document")) == [list(GOOD_TEXT.encode()) + [256], list(b"end") + [256]]
    assert summary.rejected == Counter(kind for _, kind, _ in BAD_LINES)
    assert summary.empty == 2 and summary.documents == 2
    rejects = [json.loads(line) for line in open(tmp_path / "out.rejects.jsonl", encoding="utf-8")]
    assert [(r["path"], r["line"], r["reason"]) for r in rejects] == [
        (str(path), i, message) for i, (_, _, message) in enumerate(BAD_LINES, start=2)]
    assert rejects[0]["raw"] == '{"text": "a",}' and rejects[6]["raw"] == '{"text": "caf\ufffd"}'
    assert rejects[7]["raw"] == '{"text": "bad \\udc80 escape"}'


def test_parquet_nulls_and_wrong_columns(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["a", None, "b"], "n": [1, 2, 3]}), path)
    summary = run([path], tmp_path / "out", "--skip-bad-docs")
    assert summary.rejected == {"non-string value": 1} and summary.documents == 2
    assert json.loads((tmp_path / "out.rejects.jsonl").read_text()) == {
        "path": str(path), "line": 2, "reason": "'text' is null, not a string", "raw": '{"text": null}'}
    assert user_error(capsys, [path], tmp_path / "x", "--json-keys", "body") == (
        f"{path}: no column 'body' (columns: text, n); choose with --json-keys")
    assert user_error(capsys, [path], tmp_path / "x", "--json-keys", "n") == f"{path}: column 'n' holds int64, not text"


def test_user_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = tmp_path / "in.jsonl"
    good.write_bytes(GOOD)
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert user_error(capsys, [tmp_path / "*.parquet"], out) == f"no files match '{tmp_path}/*.parquet'"
    assert user_error(capsys, [tmp_path / "missing.jsonl"], out) == f"input not found: {tmp_path}/missing.jsonl"
    assert user_error(capsys, [tmp_path / "empty"], out).startswith(f"{tmp_path}/empty: directory holds no .jsonl")
    assert user_error(capsys, [tmp_path / "notes.md"], out).startswith(f"{tmp_path}/notes.md: unsupported input type")
    assert user_error(capsys, [good], out, tokenizer=("Nope", None)).startswith("unknown tokenizer type 'Nope'")
    assert user_error(capsys, [good], out, tokenizer=("HuggingFaceTokenizer", str(tmp_path / "t.json"))) == (
        f"tokenizer model not found: {tmp_path}/t.json")
    assert user_error(capsys, [good], out, "--workers", "0") == "--workers must be at least 1, got 0"
    (tmp_path / "in.txt").write_text("a line\n")
    assert "give a single --json-keys key" in user_error(capsys, [tmp_path / "in.txt"], out, "--json-keys", "a", "b")
    assert not list(tmp_path.glob("out*"))


def test_interrupted_run_leaves_nothing_and_says_what_is_missing(tmp_path: Path, corpus_dir: Path,
                                                               capsys: pytest.CaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "CHUNK_BYTES", 2048)
    real_write, calls = writer._write, []

    def write_then_interrupt(builders, enc) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if Ctrl-C arrived mid-run (test_preprocess_data_faults sends real signals)
        real_write(builders, enc)

    monkeypatch.setattr(writer, "_write", write_then_interrupt)
    with pytest.raises(SystemExit) as exit_info:
        run([corpus_dir / "en.jsonl"], tmp_path / "out", "--skip-bad-docs", "--workers", "2")
    assert exit_info.value.code == 130
    assert os.listdir(tmp_path) == []
    last = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    assert re.fullmatch(rf"interrupted: {re.escape(str(tmp_path))}/out_text_document\.bin/\.idx not written "
                        rf"\([\d,]+ of ~[\d,]+ documents done\); nothing was left behind", last), last


def test_empty_inputs_warn_and_only_empty_inputs_fail(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    nothing, blank, good = tmp_path / "nothing.jsonl", tmp_path / "blank.txt", tmp_path / "good.jsonl"
    nothing.write_bytes(b"")
    blank.write_bytes(b"\n  \n\t\n")
    good.write_bytes(GOOD)
    summary = run([nothing, blank, good], tmp_path / "out")
    assert [line for line in capsys.readouterr().err.split("\n") if line.startswith("warning")] == [
        f"warning: {nothing} holds no documents", f"warning: {blank} holds no documents"]
    assert summary.documents == 1 and read_docs(str(tmp_path / "out_text_document")) == [list(GOOD_TEXT.encode())]
    assert user_error(capsys, [nothing], tmp_path / "none") == f"{nothing} holds no documents; nothing was written"
    assert user_error(capsys, [nothing, blank], tmp_path / "none") == (
        f"none of the 2 inputs ({nothing}, {blank}) holds a document; nothing was written")
    assert not list(tmp_path.glob("none*"))


def test_rejects_file_is_only_left_by_a_run_that_rejected(tmp_path: Path) -> None:
    bad, good = tmp_path / "bad.jsonl", tmp_path / "good.jsonl"
    bad.write_bytes(GOOD + b"{oops\n")
    good.write_bytes(GOOD)
    rejects = tmp_path / "out.rejects.jsonl"
    for second_run in (["--skip-bad-docs"], []):  # a rerun with no rejects, then one that allows none
        run([bad], tmp_path / "out", "--skip-bad-docs")
        assert [json.loads(line)["line"] for line in open(rejects)] == [2]
        run([good], tmp_path / "out", *second_run)
        assert not rejects.exists()
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "good.jsonl", "out_text_document.bin", "out_text_document.idx"]


def _gzip_lines(count: int) -> bytes:
    """A .jsonl.gz of ``count`` documents that compresses like text (not like one line repeated)."""
    return gzip.compress(b"".join(json.dumps({"text": f"document {i}: " + "word " * (i % 40)}).encode() + b"\n"
                                  for i in range(count)))


@pytest.mark.parametrize("chunk_bytes", [readers.CHUNK_BYTES, 4096], ids=["one-chunk", "many-chunks"])
def test_truncated_gzip_names_the_line_where_its_data_ends(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch, chunk_bytes: int) -> None:
    monkeypatch.setattr(readers, "CHUNK_BYTES", chunk_bytes)
    whole = _gzip_lines(5000)
    cut = whole[:len(whole) * 2 // 3]
    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(cut)
    line = zlib.decompressobj(wbits=31).decompress(cut).count(b"\n") + 1  # the first line not whole
    assert line > 1000
    assert user_error(capsys, [path], tmp_path / "out") == (
        f"{path}:{line}: cannot read (Compressed file ended before the end-of-stream marker was reached); "
        f"the file is truncated")
    assert os.listdir(tmp_path) == ["in.jsonl.gz"]


def test_corrupt_gzip_names_the_line_where_its_data_ends(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corrupt = bytearray(_gzip_lines(10))
    corrupt[10] |= 0b110  # the first deflate block's type becomes 3, which does not exist: zlib.error, not OSError
    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(_gzip_lines(5000) + corrupt)  # a good gzip member, then the corrupt one
    assert user_error(capsys, [path], tmp_path / "out") == (
        f"{path}:5001: cannot read (Error -3 while decompressing data: invalid block type)")
    assert os.listdir(tmp_path) == ["in.jsonl.gz"]


def test_command_line_exit_code(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(GOOD + b"{oops\n")
    proc = subprocess.run([sys.executable, "-m", "data_tools.preprocess_data", "--input", str(path),
                           "--output-prefix", str(tmp_path / "out"), "--tokenizer-type", "ByteTokenizer"],
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert proc.stderr.rstrip().split("\n")[-1] == (f"error: {path}:2: malformed JSON: Expecting property name "
                                                     f"enclosed in double quotes at column 2 (pass --skip-bad-docs "
                                                     f"to skip and count such documents)")
    assert "Traceback" not in proc.stderr
