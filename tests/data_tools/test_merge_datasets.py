"""merge_datasets.py: merging shards equals preprocessing their concatenation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_tools import merge_datasets, preprocess_data
from tests.data_tools.helpers import dataset_bytes, tokenizer_argv


def preprocess(inputs: list[Path], prefix: Path, hf_model: str) -> str:
    preprocess_data.main(["--input", *map(str, inputs), "--output-prefix", str(prefix), "--append-eod",
                          *tokenizer_argv("HuggingFaceTokenizer", hf_model)])
    return f"{prefix}_text_document"


def test_merge_equals_preprocessing_the_concatenation(tmp_path: Path, corpus_dir: Path, hf_model: str) -> None:
    shards = tmp_path / "shards"
    a = preprocess([corpus_dir / "zh.jsonl"], shards / "a", hf_model)
    b = preprocess([corpus_dir / "en.jsonl"], shards / "b", hf_model)
    whole = preprocess([corpus_dir / "zh.jsonl", corpus_dir / "en.jsonl"], tmp_path / "whole", hf_model)
    merge_datasets.main(["--input", a, b, "--output-prefix", str(tmp_path / "by_prefix")])
    merge_datasets.main(["--input", str(shards), "--output-prefix", str(shards / "merged")])
    merge_datasets.main(["--input", str(shards), "--output-prefix", str(shards / "merged")])  # skips its own output
    assert dataset_bytes(str(tmp_path / "by_prefix")) == dataset_bytes(whole) == dataset_bytes(str(shards / "merged"))


def test_merge_refuses_mixed_token_types(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from megamoe.data.indexed import IndexedDatasetBuilder

    for name, dtype in (("small", np.uint16), ("big", np.int32)):
        with IndexedDatasetBuilder(str(tmp_path / name), np.dtype(dtype)) as builder:
            builder.add_document(np.arange(3, dtype=dtype))
    with pytest.raises(SystemExit) as exit_info:
        merge_datasets.main(["--input", str(tmp_path / "small"), str(tmp_path / "big"),
                             "--output-prefix", str(tmp_path / "m")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"error: {tmp_path}/big holds int32 tokens but {tmp_path}/small holds uint16; "
                                       f"merged datasets must come from the same tokenizer\n")
    assert not list(tmp_path.glob("m*"))


def test_merge_of_a_missing_prefix_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        merge_datasets.main(["--input", str(tmp_path / "nope"), "--output-prefix", str(tmp_path / "m")])
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}/nope.idx does not exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        merge_datasets.main(["--input", str(tmp_path / "empty"), "--output-prefix", str(tmp_path / "m")])
    assert capsys.readouterr().err == f"error: {tmp_path}/empty: directory holds no .bin/.idx dataset pairs\n"
