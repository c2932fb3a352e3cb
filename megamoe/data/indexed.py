"""Token datasets on disk: Megatron-Core's ``.bin``/``.idx`` pair, written and memory-mapped.

The format is Megatron-Core's IndexedDataset byte for byte, so datasets move both ways:

``.idx`` (little endian)::

    magic b"MMIDIDX\\x00\\x00" | version u64 = 1 | dtype code u8 | sequence count u64 (N)
    | document count u64 (D + 1) | N × int32 sequence lengths | N × int64 byte pointers into .bin
    | (D + 1) × int64 document boundaries (indices into the sequences, starting at 0)

``.bin``: the tokens of all sequences back to back. We write one sequence per document; a
file from Megatron-LM with several sequences per document reads fine, and — as in
Megatron-Core's GPTDataset — sampling treats each sequence as the unit.
"""

from __future__ import annotations

import array
import contextlib
import os
import shutil
import struct
from types import TracebackType
from typing import Optional

import numpy as np

from megamoe.errors import DatasetFormatError, UserError, naming

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count

DTYPE_CODES: dict[int, type] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
    5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
_CODE_OF = {np.dtype(t): code for code, t in DTYPE_CODES.items()}


def best_dtype(vocab_size: int) -> np.dtype:
    """The smallest token type Megatron uses for a vocabulary: uint16 below 65,500, else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def data_file_path(prefix: str) -> str:
    return f"{prefix}.bin"


def index_file_path(prefix: str) -> str:
    return f"{prefix}.idx"


def _strip_suffix(prefix: str) -> str:
    """Accept ``foo.bin`` / ``foo.idx`` where a prefix is meant (a common slip on the command line)."""
    root, ext = os.path.splitext(prefix)
    return root if ext in (".bin", ".idx") else prefix


def _read_header(idx_path: str) -> tuple[np.dtype, int, int]:
    """Parse and check the fixed header; returns (token dtype, sequence count, document count)."""
    with open(idx_path, "rb") as f:
        raw = f.read(_HEADER.size)
    if len(raw) < _HEADER.size:
        raise DatasetFormatError(f"{idx_path} is truncated: {len(raw)} bytes, a header needs {_HEADER.size}")
    magic, version, code, n_seq, n_doc = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise DatasetFormatError(f"{idx_path} is not a Megatron .idx file (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise DatasetFormatError(f"{idx_path} has index version {version}; only version {VERSION} is supported")
    if code not in DTYPE_CODES:
        raise DatasetFormatError(f"{idx_path} has unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
    if n_doc < 1:
        raise DatasetFormatError(f"{idx_path} is corrupt: document count {n_doc}, must be at least 1")
    return np.dtype(DTYPE_CODES[code]), n_seq, n_doc


class IndexedDataset:
    """Read-only, memory-mapped view of ``{prefix}.bin`` / ``{prefix}.idx``.

    Opening costs only the header checks: lengths, pointers and tokens stay on disk and are
    paged in on demand, so a 20B-token shard opens instantly on every rank.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = _strip_suffix(prefix)
        idx_path, bin_path = index_file_path(self.prefix), data_file_path(self.prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise DatasetFormatError(f"{path} does not exist; "
                                         "expected a dataset written by data_tools/preprocess_data.py")
        self.dtype, n_seq, n_doc = _read_header(idx_path)

        expected_idx = _HEADER.size + n_seq * (4 + 8) + n_doc * 8
        idx_size = os.path.getsize(idx_path)
        if idx_size != expected_idx:
            state = "truncated" if idx_size < expected_idx else "corrupt (trailing bytes)"
            raise DatasetFormatError(f"{idx_path} is {state}: {idx_size} bytes, its header expects {expected_idx}")
        idx = np.memmap(idx_path, dtype=np.uint8, mode="r")
        off = _HEADER.size
        self.sequence_lengths: np.ndarray = idx[off:off + 4 * n_seq].view(np.int32)
        off += 4 * n_seq
        self.sequence_pointers: np.ndarray = idx[off:off + 8 * n_seq].view(np.int64)
        off += 8 * n_seq
        self.document_indices: np.ndarray = idx[off:off + 8 * n_doc].view(np.int64)

        if n_seq and (self.sequence_lengths.min() < 0 or self.document_indices[-1] != n_seq):
            raise DatasetFormatError(f"{idx_path} is corrupt: negative lengths or document boundaries "
                                     f"that do not end at {n_seq}")
        expected_bin = (int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
                        if n_seq else 0)
        bin_size = os.path.getsize(bin_path)
        if bin_size != expected_bin:
            state = "truncated" if bin_size < expected_bin else "corrupt (larger than its index says)"
            raise DatasetFormatError(f"{bin_path} is {state}: {bin_size} bytes, index expects {expected_bin}")
        self._tokens = (np.memmap(bin_path, dtype=self.dtype, mode="r") if bin_size
                        else np.empty(0, dtype=self.dtype))

    def __len__(self) -> int:
        """Number of sequences (= documents for data we write)."""
        return len(self.sequence_lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def get(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of sequence ``i`` (a read-only view, no copy)."""
        n = int(self.sequence_lengths[i])
        length = n - offset if length is None else length
        if not (0 <= offset and 0 <= length and offset + length <= n):
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {i} of length {n}")
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        return self._tokens[start:start + length]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)


class IndexedDatasetBuilder:
    """Stream documents into ``{prefix}.bin``/``.idx``; files appear only when complete.

    Tokens go straight to a temporary ``.bin`` (never all in memory); only the int32 length of
    each document is kept. :meth:`finalize` writes the index and renames both files into
    place — the ``.idx`` last, so a crash at any point leaves no pair that opens as finished.
    """

    def __init__(self, prefix: str, dtype: np.dtype) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise UserError(f"token dtype {self.dtype} cannot be stored; use one of {sorted(str(d) for d in _CODE_OF)}")
        self._bin_tmp = data_file_path(prefix) + ".tmp"
        self._idx_tmp = index_file_path(prefix) + ".tmp"
        self._lengths = array.array("i")
        self._closed = False  # finalized or aborted: the context manager's exit then does nothing
        self._info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._bin = open(self._bin_tmp, "wb")  # last: an interrupt before it leaves no file behind

    @staticmethod
    def index_bytes(documents: int) -> int:
        """The size of the ``.idx`` for ``documents`` documents (one sequence each, as written here)."""
        return _HEADER.size + documents * (4 + 8) + (documents + 1) * 8

    def add_document(self, tokens: np.ndarray) -> None:
        """Append one document (a 1-D array of token ids) as one sequence."""
        arr = np.asarray(tokens)
        self.add_documents(arr, np.array([arr.size]))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append ``len(lengths)`` documents, their tokens back to back in ``tokens``, in one write."""
        arr = np.asarray(tokens)
        if arr.size != int(np.sum(lengths)):
            raise ValueError(f"{arr.size} tokens for documents whose lengths add up to {int(np.sum(lengths))}")
        if arr.dtype != self.dtype:
            if self._info is not None and arr.size and (arr.min() < self._info.min or arr.max() > self._info.max):
                raise UserError(f"{self.prefix}: token ids [{arr.min()}, {arr.max()}] do not fit {self.dtype}; "
                                f"choose the dtype with best_dtype(vocab_size)")
            arr = arr.astype(self.dtype)
        with naming(self._bin_tmp):  # a full disk shows in write(), which names no file
            self._bin.write(np.ascontiguousarray(arr).tobytes())
        self._lengths.frombytes(np.ascontiguousarray(lengths, dtype=np.int32).tobytes())

    def add_index(self, other_prefix: str) -> None:
        """Append a finished dataset (e.g. one preprocessing shard) after what was added so far."""
        other = IndexedDataset(other_prefix)
        if other.dtype != self.dtype:
            raise UserError(f"{other.prefix} holds {other.dtype} tokens but this dataset is {self.dtype}; "
                            f"all merged shards must use the same tokenizer")
        self._lengths.frombytes(np.ascontiguousarray(other.sequence_lengths, dtype="<i4").tobytes())
        with open(data_file_path(other.prefix), "rb") as src:
            shutil.copyfileobj(src, self._bin, length=16 << 20)

    def finalize(self) -> None:
        """Write the index, then rename ``.bin`` and ``.idx`` into place (the ``.idx`` last).

        If that fails (a full disk, an interrupt), the temporaries are removed as by :meth:`abort`."""
        if self._closed:
            return
        try:
            self._close_bin()
            self._write_index()
            os.replace(self._bin_tmp, data_file_path(self.prefix))
            os.replace(self._idx_tmp, index_file_path(self.prefix))
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def _close_bin(self) -> None:
        """Close the ``.bin``: this flushes its last tokens, so a full disk may show only here."""
        with naming(self._bin_tmp):
            self._bin.close()

    def _write_index(self) -> None:
        """Write the ``.idx`` under its temporary name."""
        lengths = np.frombuffer(self._lengths, dtype=np.int32)
        n = len(lengths)
        pointers = np.zeros(n, dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        with naming(self._idx_tmp), open(self._idx_tmp, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, _CODE_OF[self.dtype], n, n + 1))
            f.write(lengths.astype("<i4", copy=False).tobytes())
            f.write(pointers.astype("<i8", copy=False).tobytes())
            f.write(np.arange(n + 1, dtype="<i8").tobytes())

    def abort(self) -> None:
        """Drop everything written so far (temporaries only; finished files are never touched)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):  # flushing onto a full disk fails; the file goes all the same
            self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()
