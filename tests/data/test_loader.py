"""The loader: data-parallel ranks partition each global batch, resuming from consumed samples
continues the stream exactly, position ids restart after EOD, document ids count the documents;
datasets built from a config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megamoe.config import compose
from megamoe.data.indexed import IndexedDatasetBuilder
from megamoe.data.loader import (
    GlobalBatchLoader,
    build_datasets,
    data_eod_id,
    data_stream,
    document_ids,
    position_ids,
    stream_change,
)
from megamoe.data.mock import MockDataset
from megamoe.data.tokenizer import ByteTokenizer
from megamoe.errors import SharedError, UserError
from tests.data.helpers import blend_cfg

SEQ, GLOBAL = 8, 8


def _steps(loader: GlobalBatchLoader) -> list[np.ndarray]:
    """Per step, this rank's samples (tokens plus the last label) stacked over its micro-batches."""
    return [np.concatenate([np.concatenate([mb["tokens"], mb["labels"][:, -1:]], axis=1) for mb in step])
            for step in loader]


def test_micro_batches_hold_shifted_tokens() -> None:
    data = MockDataset(vocab_size=50, seq_len=SEQ, num_samples=40, seed=0)
    steps = list(GlobalBatchLoader(data, GLOBAL, micro_batch=2, dp_rank=0, dp_size=1))
    assert len(steps) == 5 and all(len(step) == 4 for step in steps)
    mb = steps[1][2]  # samples 12 and 13
    samples = np.stack([data[12], data[13]])
    assert mb["tokens"].dtype == torch.int64 and mb["tokens"].shape == (2, SEQ)
    assert np.array_equal(mb["tokens"], samples[:, :-1]) and np.array_equal(mb["labels"], samples[:, 1:])
    assert mb["loss_mask"].dtype == torch.float32 and bool((mb["loss_mask"] == 1).all())
    assert np.array_equal(mb["position_ids"], np.tile(np.arange(SEQ), (2, 1)))


@pytest.mark.parametrize("dp_size, micro", [(1, 4), (2, 2), (4, 1), (8, 1)])
def test_dp_ranks_partition_the_global_batch(dp_size, micro) -> None:
    data = MockDataset(vocab_size=50, seq_len=SEQ, num_samples=30, seed=1)
    per_rank = [_steps(GlobalBatchLoader(data, GLOBAL, micro, r, dp_size)) for r in range(dp_size)]
    assert all(len(steps) == 3 for steps in per_rank)  # 30 samples: three full global batches
    for g in range(3):
        together = np.concatenate([steps[g] for steps in per_rank])
        assert np.array_equal(together, np.stack([data[i] for i in range(g * GLOBAL, (g + 1) * GLOBAL)]))


@pytest.mark.parametrize("k", [0, 1, 3])
def test_resume_continues_exactly(k) -> None:
    data = MockDataset(vocab_size=50, seq_len=SEQ, num_samples=48, seed=2)
    full = _steps(GlobalBatchLoader(data, GLOBAL, 2, 1, 2))
    first = GlobalBatchLoader(data, GLOBAL, 2, 1, 2)
    it = iter(first)
    for _ in range(k):
        next(it)
    state = first.state_dict()
    assert state == {"consumed_samples": k * GLOBAL}
    resumed = GlobalBatchLoader(data, GLOBAL, 2, 1, 2)
    resumed.load_state_dict(state)
    rest = _steps(resumed)
    assert len(rest) == len(full) - k and all(np.array_equal(a, b) for a, b in zip(rest, full[k:]))
    assert resumed.state_dict() == {"consumed_samples": 48}
    # the same position on another layout reads the same global batches
    other = [_steps(GlobalBatchLoader(data, GLOBAL, 1, r, 4, consumed_samples=k * GLOBAL)) for r in range(4)]
    whole = [_steps(GlobalBatchLoader(data, GLOBAL, 8, 0, 1, consumed_samples=k * GLOBAL))][0]
    assert all(np.array_equal(np.concatenate([o[g] for o in other]), whole[g]) for g in range(len(whole)))


def ref_position_ids(tokens: np.ndarray, eod: int) -> np.ndarray:
    """Megatron's definition: after an EOD at index j, positions from j + 1 count from 0 again."""
    out = np.zeros_like(tokens)
    for b, row in enumerate(tokens):
        start = 0
        for j, t in enumerate(row):
            out[b, j] = j - start
            if t == eod:
                start = j + 1
    return out


def test_position_ids_restart_after_eod() -> None:
    tokens = np.random.default_rng(0).integers(0, 6, (5, 40))  # eod = 0: frequent, runs of several
    tokens[0, 0] = tokens[0, -1] = 0
    assert np.array_equal(position_ids(tokens, 0), ref_position_ids(tokens, 0))
    assert np.array_equal(position_ids(tokens, None), np.tile(np.arange(40), (5, 1)))
    data = MockDataset(vocab_size=6, seq_len=SEQ, num_samples=8, seed=0)
    mb = next(iter(GlobalBatchLoader(data, GLOBAL, 8, 0, 1, eod_id=0, reset_position_ids=True)))[0]
    assert np.array_equal(mb["position_ids"], ref_position_ids(mb["tokens"].numpy(), 0))
    mb = next(iter(GlobalBatchLoader(data, GLOBAL, 8, 0, 1, eod_id=0)))[0]  # not asked: no reset
    assert np.array_equal(mb["position_ids"], np.tile(np.arange(SEQ), (8, 1)))


def test_document_ids_count_the_eods_before_each_token() -> None:
    """The eod ends its own document; the next token starts the next one (Megatron's and Yuan's rule)."""
    tokens = np.array([[5, 0, 0, 7, 8, 0], [0, 1, 2, 3, 4, 5]])  # eod = 0
    assert document_ids(tokens, 0).tolist() == [[0, 0, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1]]
    data = MockDataset(vocab_size=6, seq_len=SEQ, num_samples=8, seed=0)
    mb = next(iter(GlobalBatchLoader(data, GLOBAL, 8, 0, 1, eod_id=0, reset_attention_mask=True)))[0]
    assert np.array_equal(mb["document_ids"], document_ids(mb["tokens"].numpy(), 0))
    assert mb["document_ids"].dtype == torch.int64 and mb["document_ids"].max() > 0
    assert "document_ids" not in next(iter(GlobalBatchLoader(data, GLOBAL, 8, 0, 1, eod_id=0)))[0]  # not asked
    with pytest.raises(ValueError, match="give eod_id"):
        GlobalBatchLoader(data, GLOBAL, 8, 0, 1, reset_attention_mask=True)


def test_bad_layout_is_refused() -> None:
    data = MockDataset(vocab_size=6, seq_len=SEQ, num_samples=8, seed=0)
    with pytest.raises(ValueError, match="not a multiple"):
        GlobalBatchLoader(data, 8, 3, 0, 2)
    with pytest.raises(ValueError, match="outside"):
        GlobalBatchLoader(data, 8, 2, 2, 2)


def test_mock_tokens_depend_only_on_seed_and_index() -> None:
    a, b = MockDataset(100, 16, 10, seed=5), MockDataset(100, 16, 1000, seed=5)
    assert all(np.array_equal(a[i], b[i]) for i in range(10))
    assert not np.array_equal(a[0], MockDataset(100, 16, 10, seed=6)[0])
    assert a[3].shape == (17,) and a[3].dtype == np.int64 and 0 <= a[3].min() and a[3].max() < 100
    with pytest.raises(IndexError):
        a[10]


def test_build_mock_datasets() -> None:
    cfg = compose(["+exp=tiny"])
    train, valid, test = build_datasets(cfg, is_builder=True)
    t = cfg.train
    assert len(train) == t.steps * t.global_batch and train[0].shape == (t.seq_len + 1,)
    assert list(valid) == ["mock"] and len(valid["mock"]) == t.eval_iters * t.global_batch
    assert not np.array_equal(train[0], valid["mock"][0]) and not np.array_equal(valid["mock"][0], test["mock"][0])
    assert data_eod_id(cfg) is None


def _chinese(samples: np.ndarray) -> np.ndarray:
    """Per sample: does it hold UTF-8 bytes of Chinese text (ids 128..255)?"""
    return ((samples >= 128) & (samples < 256)).any(axis=1)


def test_build_indexed_datasets(tmp_path) -> None:
    cfg = blend_cfg(tmp_path)
    train, valid, test = build_datasets(cfg, is_builder=True)
    n, t = cfg.train.steps * cfg.train.global_batch, cfg.train
    assert len(train) == n and sorted(valid) == sorted(test) == ["en", "zh"]
    samples = np.stack([train[i] for i in range(n)])
    is_zh = _chinese(samples)
    assert abs(is_zh.mean() - 0.7) <= 1 / n
    assert (samples[~is_zh] == 258).any() and not (samples[is_zh] == 258).any()  # FIM only on en
    assert all(len(valid[lang]) == t.eval_iters * t.global_batch for lang in valid)
    for lang in valid:
        chinese = _chinese(np.stack([valid[lang][i] for i in range(len(valid[lang]))]))
        assert chinese.all() if lang == "zh" else not chinese.any()
    assert data_eod_id(cfg) == ByteTokenizer().eod_id
    again, _, _ = build_datasets(cfg, is_builder=False, wait_timeout_s=0.1)  # all cached: nobody waits
    assert all(np.array_equal(again[i], train[i]) for i in range(0, n, 7))


def test_no_training_documents_is_a_user_error(tmp_path) -> None:
    cfg = blend_cfg(tmp_path, split="0,50,50")
    with pytest.raises(UserError, match=r"data.sources\[0\].*leaves none of its 300 documents for training"):
        build_datasets(cfg, is_builder=True)


def test_a_longer_run_or_larger_batch_reads_the_same_stream(tmp_path) -> None:
    """Resuming with more steps or another global batch must not reorder samples (nor repeat or skip)."""
    short, _, _ = build_datasets(blend_cfg(tmp_path), is_builder=True)
    longer, _, _ = build_datasets(blend_cfg(tmp_path, "train.global_batch=16", "train.steps=30"), is_builder=True)
    assert len(longer) > len(short)
    assert all(np.array_equal(short[i], longer[i]) for i in range(len(short)))


def test_data_stream_names_what_reorders_samples(tmp_path) -> None:
    stream = data_stream(blend_cfg(tmp_path))
    same = data_stream(blend_cfg(tmp_path, "train.global_batch=16", "train.steps=99", "data.sources.0.weight=1.4",
                                 "data.sources.1.weight=0.6"))  # the same blend, scaled weights
    assert stream_change(stream, same) is None
    assert stream_change(stream, data_stream(blend_cfg(tmp_path, "train.seq_len=32"))) == "train.seq_len: 64 → 32"
    assert stream_change(stream, data_stream(blend_cfg(tmp_path, "data.sources.1.fim_rate=0.2"))) == \
        "data.sources[1].fim_rate: 0.5 → 0.2"


def test_token_beyond_the_vocabulary_names_the_dataset_and_document(tmp_path) -> None:
    prefix = str(tmp_path / "wide_text_document")
    with IndexedDatasetBuilder(prefix, np.dtype(np.int32)) as builder:
        for doc in range(40):
            builder.add_document(np.array([70002 if doc == 17 else 5] * 7 + [256]))
    cfg = compose(["+exp=tiny", "data.kind=indexed", f"data.sources=[{{path:'{prefix}'}}]", "data.split='100,0,0'",
                   "train.seq_len=16", "train.global_batch=2", "train.micro_batch=1", "train.steps=10"])
    train, _, _ = build_datasets(cfg, is_builder=True)
    loader = GlobalBatchLoader(train, 2, 1, 0, 1, vocab_size=cfg.model.vocab_size)
    with pytest.raises(UserError, match=rf"^{prefix}, document 17 holds token id 70002, but model.vocab_size is 512"):
        list(loader)
    assert len(list(GlobalBatchLoader(train, 2, 1, 0, 1))) == 10  # unchecked, the same batches pass


def test_a_tokenizer_larger_than_the_model_is_refused_at_startup(tmp_path) -> None:
    with pytest.raises(SharedError, match=r"^model.vocab_size: 200 is smaller than the vocabulary of data.tokenizer "
                                          r"\(ByteTokenizer: 262 ids\); set model.vocab_size to at least 384"):
        build_datasets(blend_cfg(tmp_path, "model.vocab_size=200"), is_builder=True)
