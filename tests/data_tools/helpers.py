"""Helpers shared by the data tool tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer

from megamoe.data.indexed import IndexedDataset


def reference_encoder(kind: str, model: Optional[str]) -> tuple[Callable[[str], list[int]], int]:
    """(encode one text, eod id) straight from each library, bypassing megamoe.data.tokenizer."""
    if kind == "ByteTokenizer":
        return (lambda text: list(text.encode("utf-8"))), 256
    if kind == "HuggingFaceTokenizer":
        hf = HFTokenizer.from_file(model)
        return (lambda text: hf.encode(text, add_special_tokens=False).ids), hf.token_to_id("<eod>")
    sp = spm.SentencePieceProcessor(model_file=model)
    return (lambda text: sp.encode(text)), sp.piece_to_id("<eod>")


def tokenizer_argv(kind: str, model: Optional[str]) -> list[str]:
    return ["--tokenizer-type", kind] + (["--tokenizer-model", model] if model else [])


def read_docs(prefix: str) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def jsonl_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in open(path, encoding="utf-8")]


def dataset_bytes(prefix: str) -> tuple[bytes, bytes]:
    return Path(prefix + ".bin").read_bytes(), Path(prefix + ".idx").read_bytes()
