"""GPT samples against a slow reference built from the definition: the token stream of the
shuffled epochs cut into overlapping windows, read in per-epoch shuffled order; plus the cache."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter

import numpy as np
import pytest

import megamoe.data.samples as samples
from megamoe.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megamoe.data.samples import NpyWriter, SampleDataset, shuffled
from megamoe.errors import IndexWaitTimeout, UserError

M64 = 2**64


def ref_order(n: int, seed: int, stream: int, *key: int) -> list[int]:
    """range(n) sorted by the SplitMix64 hash of each index (high bits), ties by index — in Python ints."""
    offset = int(np.random.SeedSequence([seed, stream, *key]).generate_state(1, np.uint64)[0])
    bits = max(1, (n - 1).bit_length())

    def key(i: int) -> int:
        z = (i * 0x9E3779B97F4A7C15 + offset) % M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % M64
        return (z ^ (z >> 31)) >> bits

    return sorted(range(n), key=lambda i: (key(i), i))


def ref_samples(docs: list[list[int]], seq_len: int, num_samples: int, seed: int, block: int) -> list[list[int]]:
    """Samples in reading order, from the definition: shuffled epochs → stream → windows → each
    epoch's samples shuffled in blocks of ``block``. Built for whole epochs, then cut: the first
    ``num_samples`` cannot depend on how many are asked for."""
    tokens = sum(map(len, docs))
    epochs = -(-(num_samples * seq_len + 1) // tokens) + 1
    stream = [t for e in range(epochs + 1) for d in ref_order(len(docs), seed, 0, e) for t in docs[d]]
    order: list[int] = []
    for e in range(epochs):
        lo, hi = -(-e * tokens // seq_len), -(-(e + 1) * tokens // seq_len)
        for b, start in enumerate(range(lo, hi, block)):
            order += [start + j for j in ref_order(min(block, hi - start), seed, 1, e, b)]
    return [stream[j * seq_len:(j + 1) * seq_len + 1] for j in order[:num_samples]]


def _dataset(tmp_path, docs: list[list[int]], dtype: type = np.uint16) -> IndexedDataset:
    prefix = str(tmp_path / "corpus")
    with IndexedDatasetBuilder(prefix, np.dtype(dtype)) as builder:
        for d in docs:
            builder.add_document(np.array(d, dtype=np.int64))
    return IndexedDataset(prefix)


def _random_docs(n: int, seed: int = 0, max_len: int = 30) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 1000, rng.integers(0, max_len)).tolist() for _ in range(n)]


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_shuffled_matches_reference(n) -> None:
    assert np.concatenate(list(shuffled(n, 5, 0, (3,)))).tolist() == ref_order(n, 5, 0, 3)


def test_shuffled_in_bands_is_the_same_order(monkeypatch) -> None:
    whole = ref_order(3000, 1, 0, 0)
    monkeypatch.setattr(samples, "_BAND", 256)
    bands = list(shuffled(3000, 1, 0, (0,), first_fraction=0.3))
    assert len(bands) > 5 and max(map(len, bands)) < 600
    assert np.concatenate(bands).tolist() == whole


@pytest.mark.parametrize("block", [16, 1 << 16])  # several blocks per epoch, one
@pytest.mark.parametrize("num_samples", [1, 37, 200])  # within one epoch, a partial second, several
def test_samples_match_reference(tmp_path, monkeypatch, num_samples, block) -> None:
    monkeypatch.setattr(samples, "SHUFFLE_BLOCK", block)
    docs = _random_docs(60)
    ds = SampleDataset(_dataset(tmp_path, docs), range(60), 16, num_samples, 9, str(tmp_path / "cache"), True)
    assert len(ds) == num_samples
    got = [ds[i].tolist() for i in range(num_samples)]
    assert got == ref_samples(docs, 16, num_samples, 9, block)
    assert ds[0].dtype == np.int64


def test_a_longer_stream_starts_with_the_shorter_one(tmp_path, monkeypatch) -> None:
    """Growing train.steps or the global batch on resume must not reorder samples already due."""
    monkeypatch.setattr(samples, "SHUFFLE_BLOCK", 16)
    data, cache = _dataset(tmp_path, _random_docs(60)), str(tmp_path / "cache")
    short, long = (SampleDataset(data, range(60), 16, n, 9, cache, True) for n in (21, 150))
    assert [short[i].tolist() for i in range(21)] == [long[i].tolist() for i in range(21)]


def test_document_range_and_small_chunks(tmp_path, monkeypatch) -> None:
    """A split (documents 20..79) and chunks smaller than an epoch give the same samples."""
    monkeypatch.setattr(samples, "_CHUNK", 7)
    docs = _random_docs(100, seed=1)
    ds = SampleDataset(_dataset(tmp_path, docs), range(20, 80), 8, 150, 2, str(tmp_path / "cache"), True)
    assert [ds[i].tolist() for i in range(150)] == ref_samples(docs[20:80], 8, 150, 2, samples.SHUFFLE_BLOCK)


def test_every_token_once_per_epoch(tmp_path) -> None:
    """The inputs of the samples read during an epoch tile its token stream: nothing repeated or skipped.

    Every token id is unique within the corpus; an epoch's last sample runs on into the next
    epoch's first documents, so exactly those tokens are seen a second time.
    """
    docs, next_id = [], 0
    for n in np.random.default_rng(3).integers(0, 25, 80):
        docs.append(list(range(next_id, next_id + n)))
        next_id += n
    seq_len, tokens = 10, next_id
    num_samples = -(-3 * tokens // seq_len)  # three whole epochs (a partial one reads a subset of its samples)
    ds = SampleDataset(_dataset(tmp_path, docs, np.int32), range(80), seq_len, num_samples, 4,
                       str(tmp_path / "cache"), True)
    stream = [t for epoch in range(4) for d in ref_order(80, 4, 0, epoch) for t in docs[d]]
    lo = 0
    for epoch in range(3):
        hi = min(num_samples, -(-(epoch + 1) * tokens // seq_len))  # the samples starting in this epoch
        inputs = Counter(np.concatenate([ds[i][:-1] for i in range(lo, hi)]).tolist())
        assert inputs == Counter(stream[lo * seq_len:hi * seq_len])
        if epoch < 2:  # all but < seq_len ids once; < seq_len of them read past its end again
            assert len(set(range(tokens)) - set(inputs)) < seq_len
            assert sum(inputs.values()) - len(inputs) < seq_len
        lo = hi


def test_cache_is_reused_and_keyed(tmp_path, monkeypatch) -> None:
    data, cache = _dataset(tmp_path, _random_docs(50)), str(tmp_path / "cache")
    first = SampleDataset(data, range(50), 16, 40, 1, cache, True)
    files = sorted(os.listdir(cache))
    assert len(files) == 4 and not any(".tmp" in f for f in files)  # three arrays and the description

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(samples, "build_sample_index", no_build)
    again = SampleDataset(data, range(50), 16, 40, 1, cache, True)
    assert all(np.array_equal(first[i], again[i]) for i in range(40))
    assert sorted(os.listdir(cache)) == files
    monkeypatch.undo()
    for change in ({"seed": 2}, {"seq_len": 8}, {"num_samples": 41}):
        args = {"seq_len": 16, "num_samples": 40, "seed": 1, **change}
        SampleDataset(data, range(50), args["seq_len"], args["num_samples"], args["seed"], cache, True)
    assert len(os.listdir(cache)) == 4 * 4


def test_failed_build_leaves_no_index(tmp_path, monkeypatch) -> None:
    data, cache = _dataset(tmp_path, _random_docs(50)), str(tmp_path / "cache")

    def crash(lengths, seq_len, num_samples, seed, paths):
        open(paths["doc"], "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(samples, "build_sample_index", crash)
    with pytest.raises(KeyboardInterrupt):
        SampleDataset(data, range(50), 16, 40, 1, cache, True)
    assert os.listdir(cache) == []


def test_other_ranks_wait_for_the_builder(tmp_path) -> None:
    data, cache = _dataset(tmp_path, _random_docs(50)), str(tmp_path / "cache")
    with pytest.raises(IndexWaitTimeout, match="which global rank 0 builds"):
        SampleDataset(data, range(50), 16, 40, 1, cache, is_builder=False, wait_timeout_s=0.3)
    builder = threading.Timer(0.7, lambda: SampleDataset(data, range(50), 16, 40, 1, cache, True))
    builder.start()
    start = time.monotonic()
    waiter = SampleDataset(data, range(50), 16, 40, 1, cache, is_builder=False, wait_timeout_s=30)
    builder.join()
    assert time.monotonic() - start >= 0.6
    assert [waiter[i].tolist() for i in range(40)] == ref_samples(_random_docs(50), 16, 40, 1, samples.SHUFFLE_BLOCK)


def test_samples_from_no_tokens_is_a_user_error(tmp_path) -> None:
    data = _dataset(tmp_path, [[], [1, 2], []])
    with pytest.raises(UserError, match="hold no tokens"):
        SampleDataset(data, range(0, 1), 4, 3, 1, str(tmp_path / "cache"), True)


def test_npy_writer_streams_blocks(tmp_path) -> None:
    path = str(tmp_path / "a.npy")
    writer = NpyWriter(path, np.int32, (2,))
    blocks = [np.arange(6).reshape(3, 2), np.zeros((0, 2)), np.ones((1, 2))]
    for b in blocks:
        writer.write(b)
    writer.close()
    loaded = np.load(path, mmap_mode="r")
    assert loaded.dtype == np.int32 and np.array_equal(loaded, np.concatenate(blocks))
