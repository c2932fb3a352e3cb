"""Shared inputs for the data tool tests: a small demo corpus and one tokenizer of each kind."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional

import pytest
import sentencepiece as spm

from data_tools.make_demo_corpus import make_corpus
from data_tools.train_tokenizer import train
from megamoe.data.tokenizer import TOKENIZER_TYPES


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """zh.jsonl, en.jsonl, code.jsonl: ~60 KB, a few hundred documents."""
    path = tmp_path_factory.mktemp("corpus")
    make_corpus(str(path), size_mb=0.06, seed=0)
    return path


@pytest.fixture(scope="session")
def hf_model(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    train([str(corpus_dir)], 600, str(path), show_progress=False)
    return str(path)


@pytest.fixture(scope="session")
def sp_model(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    texts = [json.loads(line)["text"] for name in ("zh", "en")
             for line in open(corpus_dir / f"{name}.jsonl", encoding="utf-8")]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=400,
                                   user_defined_symbols=["<eod>"], character_coverage=1.0,
                                   hard_vocab_limit=False, num_threads=1, minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "sp.model"
    path.write_bytes(model.getvalue())
    return str(path)


@pytest.fixture(params=TOKENIZER_TYPES)
def tokenizer_args(request: pytest.FixtureRequest, hf_model: str, sp_model: str) -> tuple[str, Optional[str]]:
    """(--tokenizer-type, --tokenizer-model) for each kind."""
    model = {"ByteTokenizer": None, "HuggingFaceTokenizer": hf_model, "SentencePieceTokenizer": sp_model}
    return request.param, model[request.param]
