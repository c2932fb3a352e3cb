"""Tokenizers: ids against each backend's definition, special-token discovery, padding, user errors."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from megamoe.config import compose
from megamoe.data.tokenizer import (
    ByteTokenizer,
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    build_tokenizer,
    pad_vocab_size,
    tokenizer_from_config,
)
from megamoe.errors import UserError

MIXED = "小明住在上海。Alice has 12 apples.\n\tdef f(x):\n        return x + 1  # 返回 😀"
CORPUS = ["小明住在上海。小红每天早上吃饺子。三加四等于七。", "Alice lives in Paris. Bob eats bread on Monday.",
          "def add(x):\n    return x + 1"] * 20
FIM_SPECIALS = ["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]


def hf_tokenizer_file(tmp_path: Path, specials: list[str]) -> str:
    """A byte-level BPE with the given special tokens (ids 0..len-1), saved as tokenizer.json."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def sp_model_file(tmp_path: Path, user_symbols: list[str]) -> str:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=120,
                                   user_defined_symbols=user_symbols, character_coverage=1.0,
                                   hard_vocab_limit=False, num_threads=1, minloglevel=2)
    path = tmp_path / "sp.model"
    path.write_bytes(model.getvalue())
    return str(path)


def test_pad_vocab_size_is_the_smallest_multiple_of_128_that_fits() -> None:
    for n in range(1, 1000):
        padded = pad_vocab_size(n)
        assert padded % 128 == 0 and padded >= n and padded - 128 < n
    assert pad_vocab_size(134953) == 135040  # Yuan 2.0's sentencepiece vocabulary (docs/yuan2-m32.md §7)


def test_byte_tokenizer_ids_are_utf8_bytes_then_specials() -> None:
    tok = ByteTokenizer()
    assert tok.encode(MIXED) == list(MIXED.encode("utf-8"))
    assert tok.encode_batch([MIXED, "", "a"]) == [list(MIXED.encode("utf-8")), [], [97]]
    assert tok.vocab_size == 262 and tok.padded_vocab_size == 384
    assert tok.eod_id == 256 and tok.special_id("eod") == 256 and tok.special_id("pad") == 257
    assert [tok.special_id(r) for r in ("fim_prefix", "fim_middle", "fim_suffix", "fim_pad")] == [258, 259, 260, 261]
    assert tok.decode(tok.encode(MIXED) + [tok.eod_id] + tok.encode("x")) == MIXED + "<eod>x"


def test_byte_tokenizer_takes_a_named_eod() -> None:
    assert ByteTokenizer(eod_token="<pad>").eod_id == 257


def test_huggingface_matches_the_library_and_round_trips(tmp_path: Path) -> None:
    path = hf_tokenizer_file(tmp_path, ["<eod>", "<pad>", *FIM_SPECIALS])
    tok, ref = HuggingFaceTokenizer(path), HFTokenizer.from_file(path)
    assert tok.encode(MIXED) == ref.encode(MIXED, add_special_tokens=False).ids
    assert tok.encode_batch(CORPUS[:3] + [MIXED]) == [tok.encode(t) for t in CORPUS[:3] + [MIXED]]
    assert tok.decode(tok.encode(MIXED) + [tok.eod_id]) == MIXED + "<eod>"
    assert tok.vocab_size == ref.get_vocab_size() and tok.padded_vocab_size % 128 == 0
    assert tok.eod_id == 0 and tok.special_id("pad") == 1
    assert [tok.special_id(r) for r in ("fim_prefix", "fim_middle", "fim_suffix", "fim_pad")] == [2, 3, 4, 5]


@pytest.mark.parametrize("specials, eod", [
    (["<|endoftext|>"], "<|endoftext|>"),
    (["</s>", "<eod>"], "<eod>"),  # <eod> is preferred over </s>
    (["<pad>", "<|end_of_text|>"], "<|end_of_text|>"),
])
def test_huggingface_eod_is_found_among_special_tokens(tmp_path: Path, specials: list[str], eod: str) -> None:
    tok = HuggingFaceTokenizer(hf_tokenizer_file(tmp_path, specials))
    assert tok.eod_id == specials.index(eod)
    assert tok.special_id("fim_prefix") is None


def test_missing_eod_is_one_clear_error_and_can_be_named(tmp_path: Path) -> None:
    path = hf_tokenizer_file(tmp_path, ["<pad>"])
    with pytest.raises(UserError, match=r"no end-of-document token .* name one with --eod-token"):
        HuggingFaceTokenizer(path)
    assert HuggingFaceTokenizer(path, eod_token="<pad>").eod_id == 0
    with pytest.raises(UserError, match=r"eod token '<nope>' is not in the vocabulary"):
        HuggingFaceTokenizer(path, eod_token="<nope>")


def test_sentencepiece_matches_the_library(tmp_path: Path) -> None:
    path = sp_model_file(tmp_path, ["<eod>", *FIM_SPECIALS])
    tok, ref = SentencePieceTokenizer(path), spm.SentencePieceProcessor(model_file=path)
    assert tok.encode_batch(CORPUS[:3]) == [ref.encode(t) for t in CORPUS[:3]]
    assert tok.vocab_size == ref.get_piece_size()
    assert tok.eod_id == ref.piece_to_id("<eod>")
    assert tok.special_id("fim_middle") == ref.piece_to_id("<fim_middle>")
    text = CORPUS[0]
    assert tok.decode(tok.encode(text) + [tok.eod_id]) == text + "<eod>"
    assert tok.decode(tok.encode(text) + [ref.eos_id()]) == text + "</s>"  # control pieces are spelled out


def test_sentencepiece_falls_back_to_its_eos(tmp_path: Path) -> None:
    path = sp_model_file(tmp_path, [])
    tok = SentencePieceTokenizer(path)
    assert tok.eod_id == spm.SentencePieceProcessor(model_file=path).eos_id()
    assert tok.special_id("fim_prefix") is None


@pytest.mark.parametrize("kind, model, message", [
    ("GPT2BPETokenizer", None, r"unknown tokenizer type 'GPT2BPETokenizer'; choose one of HuggingFaceTokenizer"),
    ("HuggingFaceTokenizer", None, r"HuggingFaceTokenizer needs a model file"),
    ("SentencePieceTokenizer", "/no/such.model", r"tokenizer model not found: /no/such.model"),
    ("ByteTokenizer", "tokenizer.json", r"ByteTokenizer needs no model file"),
])
def test_build_tokenizer_user_errors(kind: str, model: str | None, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_tokenizer(kind, model)


def test_corrupt_model_files_are_user_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("not a tokenizer")
    with pytest.raises(UserError, match=f"cannot load Hugging Face tokenizer {bad}"):
        build_tokenizer("HuggingFaceTokenizer", str(bad))
    with pytest.raises(UserError, match=f"cannot load sentencepiece model {bad}"):
        build_tokenizer("SentencePieceTokenizer", str(bad))


def test_tokenizer_from_config() -> None:
    cfg = compose(["+exp=tiny"])
    tok = tokenizer_from_config(cfg.data.tokenizer)
    assert isinstance(tok, ByteTokenizer) and tok.padded_vocab_size <= cfg.model.vocab_size
