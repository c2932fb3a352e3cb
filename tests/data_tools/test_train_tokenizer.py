"""train_tokenizer.py: a lossless byte-level BPE with our special tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_tools.train_tokenizer import SPECIAL_TOKENS, main
from megamoe.data.tokenizer import HuggingFaceTokenizer

UNSEEN = "生僻字：龘靐齉。Ünïcödé and emoji 🚀, tabs\tand  double spaces, 12345."


def test_trained_tokenizer_is_lossless_with_specials(hf_model: str) -> None:
    tok = HuggingFaceTokenizer(hf_model)
    assert 256 + len(SPECIAL_TOKENS) < tok.vocab_size <= 600
    assert tok.eod_id == 0 and tok.special_id("pad") == 1
    assert [tok.special_id(r) for r in ("fim_prefix", "fim_middle", "fim_suffix", "fim_pad")] == [2, 3, 4, 5]
    assert tok.decode(tok.encode(UNSEEN)) == UNSEEN  # byte-level: no unknown token, no normalisation
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]  # digits one by one


def test_vocab_too_small_is_a_user_error(tmp_path: Path, corpus_dir: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--input", str(corpus_dir), "--vocab-size", "100", "--output", str(tmp_path / "t.json")])
    assert capsys.readouterr().err == "error: --vocab-size must exceed 262 (256 bytes + 6 special tokens), got 100\n"


def test_bad_document_stops_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "in.jsonl").write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    with pytest.raises(SystemExit):
        main(["--input", str(tmp_path / "in.jsonl"), "--vocab-size", "300", "--output", str(tmp_path / "t.json")])
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}/in.jsonl:2: missing key 'text'")
    assert not (tmp_path / "t.json").exists()
