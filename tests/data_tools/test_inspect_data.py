"""inspect_data.py: counts and histogram agree with the dataset; documents decode to their text."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from data_tools import inspect_data, preprocess_data

TEXTS = ["a" * n for n in (1, 2, 3, 5, 9, 17, 100)] + ["小明住在上海。"]


def test_counts_histogram_and_decoded_documents(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS))
    preprocess_data.main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "d"),
                          "--tokenizer-type", "ByteTokenizer", "--append-eod"])
    capsys.readouterr()
    inspect_data.main([str(tmp_path / "d_text_document"), "--tokenizer-type", "ByteTokenizer", "--docs", "8"])
    out = capsys.readouterr().out
    lengths = [len(t.encode()) + 1 for t in TEXTS]
    assert f"{len(TEXTS)} documents, {sum(lengths)} tokens (uint16)" in out
    rows = {int(lo.replace(",", "")): int(n.replace(",", ""))
            for lo, n in re.findall(r"^\s+([\d,]+)–[\d,]+\s+([\d,]+)\s+█", out, re.M)}
    # power-of-two buckets from the definition: [2^b, 2^(b+1)), the first one from 0
    assert rows == Counter(0 if n < 2 else 2 ** (n.bit_length() - 1) for n in lengths)
    assert "小明住在上海。<eod>" in out and "aaaaaaaaa<eod>" in out


def test_without_tokenizer_shows_ids(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "in.txt").write_text("hi\n")
    preprocess_data.main(["--input", str(tmp_path / "in.txt"), "--output-prefix", str(tmp_path / "d"),
                          "--tokenizer-type", "ByteTokenizer"])
    capsys.readouterr()
    inspect_data.main([str(tmp_path / "d_text_document")])
    assert "[0] 2 tokens: 104 105" in capsys.readouterr().out
