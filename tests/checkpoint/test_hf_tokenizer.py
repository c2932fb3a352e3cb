"""The run's tokenizer as Hugging Face files: transformers' AutoTokenizer, loading only what we
wrote, encodes text to our ids and decodes them back, for every kind of tokenizer we train
with; the special ids and the generation config."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from megamoe.checkpoint.hf_tokenizer import (
    GENERATION_CONFIG,
    SPECIAL_TOKENS_MAP,
    TOKENIZER_CONFIG,
    generation_config,
    token_ids,
    tokenizer_files,
)
from megamoe.data.tokenizer import ByteTokenizer, HuggingFaceTokenizer, SentencePieceTokenizer, Tokenizer
from megamoe.models.hf_mapping import TokenIds
from tests.data.test_tokenizer import CORPUS, FIM_SPECIALS, MIXED, hf_tokenizer_file, sp_model_file

transformers = pytest.importorskip("transformers")

TEXTS = [MIXED, CORPUS[0], CORPUS[1], "  leading and trailing  ", "a\n\nb\t\tc", "", "ünïcödé ñ 1234567890"]


def bpe_with_bos(tmp_path: Path) -> str:
    """A BPE tokenizer.json whose post-processor adds a BOS to every encoding, as Llama's does."""
    path = hf_tokenizer_file(tmp_path, ["<eod>", "<pad>", "<s>"])
    tok = HFTokenizer.from_file(path)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tok.save(path)
    return path


def sp_bpe_with_byte_fallback(tmp_path: Path) -> str:
    """A sentencepiece BPE that spells unknown characters as bytes (as Llama-style models do)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, user_defined_symbols=["<eod>"],
                                   character_coverage=1.0, num_threads=1, minloglevel=2)
    path = tmp_path / "bpe.model"
    path.write_bytes(model.getvalue())
    return str(path)


TOKENIZERS = {
    "byte": lambda tmp: ByteTokenizer(),
    "byte, eod named": lambda tmp: ByteTokenizer(eod_token="<pad>"),
    "bpe": lambda tmp: HuggingFaceTokenizer(hf_tokenizer_file(tmp, ["<eod>", "<pad>", *FIM_SPECIALS])),
    "bpe adding a bos": lambda tmp: HuggingFaceTokenizer(bpe_with_bos(tmp)),
    "sentencepiece": lambda tmp: SentencePieceTokenizer(sp_model_file(tmp, ["<eod>", "<sep>"])),
    "sentencepiece bpe, byte fallback": lambda tmp: SentencePieceTokenizer(sp_bpe_with_byte_fallback(tmp)),
}


def export(tokenizer: Tokenizer, directory: Path) -> Path:
    directory.mkdir()
    for name, content in tokenizer_files(tokenizer, max_length=4096).items():
        (directory / name).write_bytes(content)
    return directory


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_auto_tokenizer_encodes_our_ids(kind: str, tmp_path: Path) -> None:
    ours = TOKENIZERS[kind](tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(export(ours, tmp_path / "export"))
    for text in TEXTS:
        assert theirs.encode(text) == ours.encode(text), (kind, text)
        assert theirs(text)["input_ids"] == ours.encode(text)
    ids = ours.encode(CORPUS[0] + " " + CORPUS[2])  # (no character the small sentencepiece model lacks)
    assert theirs.decode(ids) == ours.decode(ids)
    eod = ours.spelling(ours.eod_id)
    assert (theirs.eos_token, theirs.eos_token_id, theirs.pad_token_id) == (eod, ours.eod_id, ours.eod_id)
    assert theirs.decode([*ids, ours.eod_id], skip_special_tokens=True) == ours.decode(ids)
    assert theirs.model_max_length == 4096


def test_files_and_special_ids(tmp_path: Path) -> None:
    sp = SentencePieceTokenizer(sp_model_file(tmp_path, ["<eod>", "<sep>"]))
    files = tokenizer_files(sp, max_length=128)
    assert set(files) == {"tokenizer.model", TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP}
    assert files["tokenizer.model"] == Path(sp.name).read_bytes()
    config = json.loads(files[TOKENIZER_CONFIG])
    assert config["tokenizer_class"] == "SentencePieceBackend"
    assert (config["add_bos_token"], config["add_eos_token"], config["clean_up_tokenization_spaces"]) == (False,) * 3
    assert json.loads(files[SPECIAL_TOKENS_MAP]) == {"bos_token": "<eod>", "eos_token": "<eod>", "pad_token": "<eod>"}
    assert token_ids(sp) == TokenIds(eod=sp.eod_id, sep=sp.special_id("sep")) and sp.special_id("sep") is not None
    assert token_ids(ByteTokenizer()) == TokenIds(eod=256, sep=None)
    assert set(tokenizer_files(ByteTokenizer(), 128)) == {"tokenizer.json", TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP}


def test_generation_config_suppresses_the_embedding_padding(tmp_path: Path) -> None:
    config = json.loads(generation_config(ByteTokenizer(), model_vocab_size=384))
    assert config == {"bos_token_id": 256, "eos_token_id": 256, "pad_token_id": 256,
                      "suppress_tokens": list(range(262, 384))}
    assert "suppress_tokens" not in json.loads(generation_config(ByteTokenizer(), model_vocab_size=262))
    (tmp_path / GENERATION_CONFIG).write_bytes(generation_config(ByteTokenizer(), 384))
    loaded = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.suppress_tokens[:2]) == (256, 256, [262, 263])
