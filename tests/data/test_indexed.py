"""The .bin/.idx pair: bytes exactly as Megatron-Core's format spec, read back token for token,
damaged files refused with one line naming the file."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from megamoe.data.indexed import IndexedDataset, IndexedDatasetBuilder, best_dtype
from megamoe.errors import DatasetFormatError, UserError

DOCS = [[5, 6, 7], [], [8], [9, 10, 11, 12, 300]]
SPEC_CODES = {np.uint16: 8, np.int32: 4, np.uint8: 1, np.int64: 5}  # from the format description


def _write(prefix: str, docs: list[list[int]], dtype: type = np.uint16) -> None:
    with IndexedDatasetBuilder(prefix, np.dtype(dtype)) as builder:
        for doc in docs:
            builder.add_document(np.array(doc, dtype=np.int64))


def _spec_idx(docs: list[list[int]], dtype: type) -> bytes:
    """The .idx bytes, packed field by field from the format description."""
    lengths = [len(d) for d in docs]
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * np.dtype(dtype).itemsize if docs else []
    out = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", SPEC_CODES[dtype])
    out += struct.pack("<Q", len(docs)) + struct.pack("<Q", len(docs) + 1)
    out += b"".join(struct.pack("<i", n) for n in lengths)
    out += b"".join(struct.pack("<q", int(p)) for p in pointers)
    out += b"".join(struct.pack("<q", i) for i in range(len(docs) + 1))
    return out


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_bytes_follow_the_format_spec(tmp_path, dtype) -> None:
    prefix = str(tmp_path / "ds")
    _write(prefix, DOCS, dtype)
    assert open(prefix + ".idx", "rb").read() == _spec_idx(DOCS, dtype)
    fmt = "<H" if dtype == np.uint16 else "<i"
    assert open(prefix + ".bin", "rb").read() == b"".join(struct.pack(fmt, t) for d in DOCS for t in d)


def test_read_back_token_for_token(tmp_path) -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 65000, rng.integers(0, 40)).tolist() for _ in range(200)]
    prefix = str(tmp_path / "ds")
    _write(prefix, docs)
    ds = IndexedDataset(prefix)
    assert len(ds) == 200 and ds.dtype == np.uint16
    assert ds.num_tokens == sum(map(len, docs))
    assert ds.sequence_lengths.tolist() == [len(d) for d in docs]
    assert all(ds[i].tolist() == d for i, d in enumerate(docs))
    assert ds.get(3, 2, 4).tolist() == docs[3][2:6] and ds.get(3, 1).tolist() == docs[3][1:]
    with pytest.raises(IndexError):
        ds.get(3, len(docs[3]), 1)
    assert IndexedDataset(prefix + ".bin")[0].tolist() == docs[0]  # a .bin/.idx name is taken as the prefix


def test_empty_dataset(tmp_path) -> None:
    prefix = str(tmp_path / "empty")
    _write(prefix, [])
    assert open(prefix + ".idx", "rb").read() == _spec_idx([], np.uint16)
    ds = IndexedDataset(prefix)
    assert len(ds) == 0 and ds.num_tokens == 0


def test_best_dtype() -> None:
    assert best_dtype(512) == np.uint16 and best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32 and best_dtype(135040) == np.int32


def test_merge_equals_concatenation(tmp_path) -> None:
    a, b, merged = (str(tmp_path / n) for n in ("a", "b", "merged"))
    _write(a, DOCS)
    _write(b, [[1, 2], [3]])
    with IndexedDatasetBuilder(merged, np.dtype(np.uint16)) as builder:
        builder.add_index(a)
        builder.add_document(np.array([4]))
        builder.add_index(b)
    expect = DOCS + [[4], [1, 2], [3]]
    assert open(merged + ".idx", "rb").read() == _spec_idx(expect, np.uint16)
    ds = IndexedDataset(merged)
    assert [ds[i].tolist() for i in range(len(ds))] == expect
    other = str(tmp_path / "wide")
    _write(other, [[1]], np.int32)
    with (pytest.raises(UserError, match="same tokenizer"),
          IndexedDatasetBuilder(merged, np.dtype(np.uint16)) as builder):
        builder.add_index(other)


def test_token_too_large_for_dtype(tmp_path) -> None:
    builder = IndexedDatasetBuilder(str(tmp_path / "ds"), np.dtype(np.uint16))
    with pytest.raises(UserError, match="do not fit uint16"):
        builder.add_document(np.array([1, 70000]))
    builder.abort()


def test_interrupted_build_leaves_nothing_that_looks_finished(tmp_path) -> None:
    prefix = str(tmp_path / "ds")
    with pytest.raises(RuntimeError), IndexedDatasetBuilder(prefix, np.dtype(np.uint16)) as builder:
        builder.add_document(np.array([1, 2, 3]))
        assert os.listdir(tmp_path) == ["ds.bin.tmp"]  # streamed to a temporary name
        raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


def _error(prefix: str) -> str:
    with pytest.raises(DatasetFormatError) as info:
        IndexedDataset(prefix)
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, UserError)
    return message


def test_damaged_files_are_refused_with_one_line(tmp_path) -> None:
    prefix = str(tmp_path / "ds")
    _write(prefix, DOCS)
    idx, bin_ = open(prefix + ".idx", "rb").read(), open(prefix + ".bin", "rb").read()

    def damage(idx_bytes: bytes, bin_bytes: bytes) -> str:
        open(prefix + ".idx", "wb").write(idx_bytes)
        open(prefix + ".bin", "wb").write(bin_bytes)
        return _error(prefix)

    assert damage(idx, bin_[:-2]) == f"{prefix}.bin is truncated: {len(bin_) - 2} bytes, index expects {len(bin_)}"
    assert "larger than its index says" in damage(idx, bin_ + b"\0\0")
    assert damage(idx[:-8], bin_) == f"{prefix}.idx is truncated: {len(idx) - 8} bytes, its header expects {len(idx)}"
    assert "a header needs" in damage(idx[:10], bin_)
    assert "not a Megatron .idx file" in damage(b"XXXXXXXXX" + idx[9:], bin_)
    assert "index version 2" in damage(idx[:9] + struct.pack("<Q", 2) + idx[17:], bin_)
    assert "unknown dtype code 9" in damage(idx[:17] + b"\x09" + idx[18:], bin_)
    os.remove(prefix + ".bin")
    assert _error(prefix).startswith(f"{prefix}.bin does not exist")


def test_explicit_finalize_inside_with_block(tmp_path) -> None:
    prefix = str(tmp_path / "ds")
    with IndexedDatasetBuilder(prefix, np.dtype(np.uint16)) as builder:
        builder.add_document(np.array([1, 2]))
        builder.finalize()
    assert IndexedDataset(prefix)[0].tolist() == [1, 2]
