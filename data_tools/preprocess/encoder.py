"""Tokenizing parsed chunks into flat token arrays; one ChunkEncoder lives in each worker process."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from itertools import chain
from typing import Optional, Sequence

import numpy as np

from data_tools.preprocess.parsers import Parsed, Reject, parse_chunk
from data_tools.preprocess.readers import Chunk
from megamoe.data.indexed import best_dtype
from megamoe.data.tokenizer import Tokenizer, build_tokenizer


def _encodable(text: str) -> bool:
    """False for strings holding lone surrogates (JSON "\\udc80" escapes), which no tokenizer accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class Encoded:
    """A chunk's documents as flat token arrays (one per key) plus its bookkeeping."""

    path: str  # the input file they came from
    tokens: list[np.ndarray]
    lengths: list[np.ndarray]
    rejects: list[Reject]
    empty: int
    input_bytes: int

    @property
    def documents(self) -> int:
        return len(self.lengths[0])


class ChunkEncoder:
    """Parses and tokenizes chunks; one lives in each worker process."""

    def __init__(self, keys: Sequence[str], tokenizer: Tokenizer, append_eod: bool) -> None:
        self.keys = list(keys)
        self.tokenizer = tokenizer
        self.append_eod = append_eod
        self.dtype = best_dtype(tokenizer.vocab_size)

    def __call__(self, chunk: Chunk) -> Encoded:
        parsed = parse_chunk(chunk, self.keys)
        ids = self._encode(parsed, chunk.path)
        tokens, lengths = zip(*map(self._flatten, ids))
        parsed.rejects.sort(key=lambda r: r.line)
        return Encoded(chunk.path, list(tokens), list(lengths), parsed.rejects, parsed.empty, chunk.input_bytes)

    def _encode(self, parsed: Parsed, path: str) -> list[list[list[int]]]:
        """Batch-encode every column; documents a tokenizer refuses (lone surrogates) become rejects."""
        try:
            return [self.tokenizer.encode_batch(column) for column in parsed.columns]
        except Exception:
            bad = {i for column in parsed.columns for i, text in enumerate(column) if not _encodable(text)}
            if not bad:
                raise
        for i in sorted(bad):
            raw = json.dumps({key: column[i] for key, column in zip(self.keys, parsed.columns)})  # \u-escapes them
            parsed.rejects.append(Reject(path, parsed.lines[i], "invalid UTF-8",
                                         "invalid UTF-8: a lone surrogate escape", raw))
        good = [i for i in range(len(parsed.lines)) if i not in bad]
        parsed.columns = [[column[i] for i in good] for column in parsed.columns]
        parsed.lines = [parsed.lines[i] for i in good]
        return [self.tokenizer.encode_batch(column) for column in parsed.columns]

    def _flatten(self, docs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        if self.append_eod:
            for doc in docs:
                doc.append(self.tokenizer.eod_id)
        lengths = np.fromiter(map(len, docs), dtype=np.int32, count=len(docs))
        tokens = np.fromiter(chain.from_iterable(docs), dtype=self.dtype, count=int(lengths.sum()))
        return tokens, lengths


_ENCODER: Optional[ChunkEncoder] = None


def init_worker_encoder(keys: Sequence[str], tokenizer_args: tuple[str, Optional[str], Optional[str]],
                        append_eod: bool) -> None:
    # One tokenizer thread per worker: --workers is the parallelism knob, and HF's own thread pool
    # would oversubscribe the cores (it is also unsafe after fork).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    global _ENCODER
    _ENCODER = ChunkEncoder(keys, build_tokenizer(*tokenizer_args), append_eod)


def worker_encoder() -> ChunkEncoder:
    """This worker's encoder, set up by :func:`init_worker_encoder`."""
    assert _ENCODER is not None, "worker not initialised"
    return _ENCODER


def encode_chunk(chunk: Chunk) -> Encoded:
    """What a worker does with each chunk (the function handed to the pool)."""
    return worker_encoder()(chunk)
