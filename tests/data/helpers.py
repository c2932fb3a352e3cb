"""Small real datasets for the data and checkpoint tests: byte-tokenized words, a two-language blend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from megamoe.config import compose
from megamoe.data.indexed import IndexedDatasetBuilder
from megamoe.data.tokenizer import ByteTokenizer
from megamoe.models import validate_config


def byte_corpus(path: str, text: str, docs: int, seed: int, dtype: type = np.uint16) -> None:
    """``docs`` documents of random words from ``text``, byte-tokenized, each ending in <eod>."""
    tok, rng = ByteTokenizer(), np.random.default_rng(seed)
    words = text.split()
    with IndexedDatasetBuilder(path, np.dtype(dtype)) as builder:
        for _ in range(docs):
            doc = " ".join(rng.choice(words, rng.integers(1, 12)))
            builder.add_document(np.array(tok.encode(doc) + [tok.eod_id]))


def blend_overrides(tmp_path: Path, split: str = "80,10,10") -> list[str]:
    """Config overrides for a zh (weight 0.7) + en (0.3, FIM 0.5) blend of 300 documents each."""
    zh, en = str(tmp_path / "zh_text_document"), str(tmp_path / "en_text_document")
    if not Path(zh + ".idx").exists():
        byte_corpus(zh, "数据 模型 训练 中文 语料 专家 路由", 300, 0)
        byte_corpus(en, "data model train english corpus expert router", 300, 1)
    return ["data.kind=indexed", f"data.split='{split}'", f"data.cache_dir={tmp_path}/cache",
            f"data.sources=[{{path:'{zh}',weight:0.7,lang:zh}},{{path:'{en}',weight:0.3,lang:en,fim_rate:0.5}}]"]


def blend_cfg(tmp_path: Path, *overrides: str, split: str = "80,10,10") -> DictConfig:
    cfg = compose(["+exp=tiny", *blend_overrides(tmp_path, split), "train.steps=20", *overrides])
    validate_config(cfg)
    return cfg
