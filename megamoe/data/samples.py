"""GPT-style samples: windows of ``seq_len + 1`` tokens over shuffled documents, cached as .npy.

Three index arrays turn a document collection into a sample stream (as in Megatron-Core's
GPTDataset):

- **document index** — the documents of every epoch, each epoch in its own random order;
- **sample index** — for sample ``j``: (position in the document index, token offset) of its
  first token. Sample ``j`` covers tokens ``[j * seq_len, (j + 1) * seq_len]`` of the stream,
  so consecutive samples share one token (the last label of one is the first input of the
  next) and their inputs tile the stream: every token is an input exactly once per epoch;
- **shuffle index** — the order in which samples are read: a permutation within each block of
  ``SHUFFLE_BLOCK`` consecutive samples of an epoch (an epoch's samples are those starting
  inside it; its last block may be shorter), so no sample repeats or is skipped before the
  epoch is done.

The stream is *prefix-stable*: the first ``n`` samples are the same whatever ``num_samples``
the index was built for, because the documents' order never depends on it and the index is
always laid out to the end of the block that holds the last sample asked for. A run can thus
grow ``train.steps`` or change ``train.global_batch`` on resume and read exactly the samples
it would have read. Blocks of 65,536 samples (268M tokens at seq_len 4096) drawn from documents
already in random order decorrelate neighbouring batches as well as a whole-epoch shuffle.

Global rank 0 builds them once — vectorised over documents in fixed-size chunks written
straight to disk, so memory stays bounded at any corpus size — under a file name keyed by a
hash of everything that affects them. Every rank then memory-maps the same files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
import time
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from megamoe.data.indexed import IndexedDataset
from megamoe.errors import IndexWaitTimeout, UserError

log = logging.getLogger(__name__)

INDEX_FORMAT = 2  # bump whenever the layout or the algorithm of any cached index changes
DEFAULT_WAIT_TIMEOUT_S = 1800.0
_CHUNK = 1 << 18  # elements per vectorised step: small enough to stay in cache
SHUFFLE_BLOCK = 1 << 16  # samples shuffled together
_BAND = 1 << 25  # keys sorted at once (256 MB): bounds memory at any corpus size
_DOC_STREAM, _SAMPLE_STREAM = 0, 1  # independent random orders for documents and samples
_GOLDEN, _MIX1, _MIX2 = (np.uint64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def index_dtype(n: int) -> np.dtype:
    """int32 when every value fits (half the disk and page cache of int64), else int64."""
    return np.dtype(np.int32 if n < 2**31 else np.int64)


class NpyWriter:
    """Write a ``.npy`` file row block by row block; the length is filled in on :meth:`close`.

    An index then never has to exist whole in memory, and its length need not be known in
    advance (a partial last epoch stops when the samples are covered).
    """

    _HEADER_BYTES = 128  # magic, version, length, then the padded dict: room for any shape

    def __init__(self, path: str, dtype: npt.DTypeLike, row_shape: tuple[int, ...] = ()) -> None:
        self.path, self.dtype, self.row_shape = path, np.dtype(dtype), row_shape
        self.rows = 0
        self._file = open(path, "wb")
        self._file.write(b"\0" * self._HEADER_BYTES)

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path}: rows of shape {block.shape[1:]}, expected {self.row_shape}")
        self._file.write(block.data)
        self.rows += len(block)

    def close(self) -> None:
        header = repr({"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                       "shape": (self.rows, *self.row_shape)}).encode("latin1")
        body = self._HEADER_BYTES - 10
        self._file.seek(0)
        self._file.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", body) + header.ljust(body - 1) + b"\n")
        self._file.close()


def build_workers() -> int:
    """Threads for building several indices at once (numpy releases the GIL in the heavy steps).

    Capped at 8: each build holds up to ~0.6 GB of sort keys and chunks.
    """
    return max(1, min(8, len(os.sched_getaffinity(0))))


def index_digest(desc: Mapping[str, object]) -> str:
    """A short, stable hash of an index's description (a JSON-able dict)."""
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def cached_arrays(desc: Mapping[str, object], cache_dir: str, stem: str, names: Sequence[str],
                  build: Callable[[dict[str, str]], None], is_builder: bool,
                  wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S) -> dict[str, np.ndarray]:
    """Memory-map the arrays ``names`` of the index described by ``desc``, building them if needed.

    The builder calls ``build(paths)`` to write every array under a temporary path, renames
    them into place and writes ``{stem}-{hash}.json`` (the description) last: that file is the
    sign that the index is complete. Other ranks poll for it until ``wait_timeout_s``.
    """
    base = os.path.join(cache_dir, f"{stem}-{index_digest(desc)}")
    final = {name: f"{base}-{name}.npy" for name in names}
    marker = f"{base}.json"
    if not os.path.exists(marker):
        if is_builder:
            os.makedirs(cache_dir, exist_ok=True)
            tmp = {name: f"{path}.tmp{os.getpid()}" for name, path in final.items()}
            try:
                build(tmp)
                for name in names:
                    os.replace(tmp[name], final[name])
                with open(marker + ".tmp", "w") as f:
                    json.dump(desc, f, indent=1, sort_keys=True)
                os.replace(marker + ".tmp", marker)
            finally:
                for path in (*tmp.values(), marker + ".tmp"):
                    if os.path.exists(path):
                        os.remove(path)
        else:
            _wait_for(marker, wait_timeout_s)
    return {name: np.load(path, mmap_mode="r") for name, path in final.items()}


def _wait_for(path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise IndexWaitTimeout(
                f"waited {timeout_s:.0f}s for {path}, which global rank 0 builds; check rank 0's log, "
                f"and that data.cache_dir is on a file system every node shares")
        time.sleep(0.5)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def num_epochs(tokens_per_epoch: int, seq_len: int, num_samples: int) -> int:
    """Epochs needed for ``num_samples`` samples: ``num_samples * seq_len + 1`` tokens."""
    return _ceil_div(num_samples * seq_len + 1, tokens_per_epoch) if num_samples else 0


def _mix64(k: np.ndarray) -> None:
    """SplitMix64's finaliser, in place: a bijection on uint64 that scatters nearby inputs."""
    k ^= k >> np.uint64(30)
    k *= _MIX1
    k ^= k >> np.uint64(27)
    k *= _MIX2
    k ^= k >> np.uint64(31)


def _band_edges(n: int, first: float) -> list[float]:
    """Key-space fractions that cut ``[0, 1)`` into bands of at most ~_BAND of ``n`` keys, one edge at ``first``."""
    edges = [0.0]
    for lo, hi in ((0.0, first), (first, 1.0)):
        if hi > lo:
            edges += np.linspace(lo, hi, max(1, math.ceil((hi - lo) * n / _BAND)) + 1)[1:].tolist()
    return edges


def shuffled(n: int, seed: int, stream: int, key: Sequence[int], first_fraction: float = 1.0) -> Iterator[np.ndarray]:
    """``range(n)`` in a uniformly random order, yielded a band at a time (int64 arrays).

    The random key of index ``i`` is a keyed 64-bit hash of ``i`` (SplitMix64), and the order
    is by key: computing keys is sequential and sorting is cache-friendly, where Fisher–Yates
    on tens of millions of entries is one cache miss per element (~4× slower here). Key space
    is cut into bands of at most ~_BAND indices, sorted one at a time, so memory stays bounded;
    the first band ends at ``first_fraction``, so a consumer that needs only the start of the
    order (a partial last epoch) stops after it, paying one hashing pass and a small sort.
    ``key`` (e.g. the epoch) picks one of independent orders.
    """
    if n == 0:
        return
    bits = max(1, (n - 1).bit_length())  # low bits hold the index, high bits the truncated key
    span = 1 << (64 - bits)
    offset = np.random.SeedSequence([seed, stream, *key]).generate_state(1, np.uint64)[0]
    edges = _band_edges(n, first_fraction)
    whole = len(edges) == 2  # one band: every key is in it, no selection needed
    for lo_f, hi_f in zip(edges[:-1], edges[1:]):
        lo, hi = np.uint64(int(lo_f * span)), np.uint64(int(hi_f * span))
        whole_band = np.empty(n, dtype=np.uint64) if whole else None
        pieces = []
        for a in range(0, n, _CHUNK):
            i = np.arange(a, min(n, a + _CHUNK), dtype=np.uint64)
            k = np.multiply(i, _GOLDEN, out=whole_band[a:a + len(i)] if whole_band is not None else None)
            k += offset
            _mix64(k)
            k >>= np.uint64(bits)
            if not whole:
                keep = (k >= lo) & (k < hi)
                k, i = k[keep], i[keep]
                pieces.append(k)
            k <<= np.uint64(bits)
            k |= i
        band = whole_band if whole_band is not None else np.concatenate(pieces)
        band.sort()
        band &= np.uint64((1 << bits) - 1)
        yield band.view(np.int64)


def laid_out_samples(tokens: int, seq_len: int, num_samples: int) -> int:
    """Samples the index covers: through the end of the shuffle block holding the last one asked for."""
    if not num_samples:
        return 0
    last = num_samples - 1
    epoch = last * seq_len // tokens  # the epoch whose tokens sample ``last`` starts in
    lo, hi = _ceil_div(epoch * tokens, seq_len), _ceil_div((epoch + 1) * tokens, seq_len)
    return min(hi, lo + ((last - lo) // SHUFFLE_BLOCK + 1) * SHUFFLE_BLOCK)


def build_sample_index(lengths: np.ndarray, seq_len: int, num_samples: int, seed: int,
                       paths: Mapping[str, str]) -> int:
    """Write the ``doc``, ``sample`` and ``shuffle`` arrays for documents of ``lengths`` tokens.

    Works on lengths alone (no tokens), a cache-sized chunk of documents at a time: gather
    the lengths in this epoch's order, cumsum them into token end positions, and
    ``searchsorted`` the sample start positions (multiples of ``seq_len``) into them. The
    layout stops once :func:`laid_out_samples` are covered. Returns the number of epochs.
    """
    lengths = np.asarray(lengths)
    n_docs = len(lengths)
    tokens = int(lengths.sum(dtype=np.int64))
    if num_samples and tokens == 0:
        raise ValueError("cannot make samples from documents that hold no tokens")
    total = laid_out_samples(tokens, seq_len, num_samples)
    epochs = num_epochs(tokens, seq_len, total)
    needed = total * seq_len + 1 if total else 0  # the stream's tokens the samples span
    doc_w = NpyWriter(paths["doc"], index_dtype(n_docs))
    sample_w = NpyWriter(paths["sample"], index_dtype(epochs * n_docs), (2,))
    shuffle_w = NpyWriter(paths["shuffle"], index_dtype(total))
    end = 0  # tokens of the stream laid out so far
    for epoch in range(epochs):
        fraction = min(1.0, (needed - end) / tokens * 1.05 + 1 / 1024)  # a margin for unlucky draws
        for order in shuffled(n_docs, seed, _DOC_STREAM, (epoch,), fraction):
            base = doc_w.rows
            for a in range(0, len(order), _CHUNK):
                ids = order[a:a + _CHUNK]
                doc_w.write(ids)
                lens = lengths[ids]
                ends = np.cumsum(lens, dtype=np.int64)
                ends += end
                first, stop = sample_w.rows, min(total, _ceil_div(int(ends[-1]), seq_len))
                if stop > first:  # samples that start in this chunk
                    starts = np.arange(first, stop, dtype=np.int64) * seq_len
                    pos = np.searchsorted(ends, starts, side="right")  # skips empty documents
                    rows = np.empty((stop - first, 2), dtype=sample_w.dtype)
                    rows[:, 0] = pos + (base + a)
                    rows[:, 1] = starts - (ends[pos] - lens[pos])
                    sample_w.write(rows)
                end = int(ends[-1])
                if end >= needed:
                    break
            if end >= needed:
                break
        lo = _ceil_div(epoch * tokens, seq_len)  # the samples that start in this epoch
        hi = min(total, _ceil_div((epoch + 1) * tokens, seq_len))
        for block, start in enumerate(range(lo, hi, SHUFFLE_BLOCK)):
            for part in shuffled(min(SHUFFLE_BLOCK, hi - start), seed, _SAMPLE_STREAM, (epoch, block)):
                part += start
                shuffle_w.write(part)
    for w in (doc_w, sample_w, shuffle_w):
        w.close()
    return epochs


class SampleDataset:
    """``num_samples`` samples of ``seq_len + 1`` tokens from documents ``docs`` of one dataset.

    Item ``i`` is an int64 array; the shuffle is applied, so reading items 0, 1, 2, … in order
    visits every sample of an epoch once before any of the next.
    """

    def __init__(self, data: IndexedDataset, docs: range, seq_len: int, num_samples: int, seed: int,
                 cache_dir: str, is_builder: bool, wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S) -> None:
        seq_len, num_samples, seed = int(seq_len), int(num_samples), int(seed)  # numpy ints do not hash as JSON
        self.data, self.docs, self.seq_len, self.num_samples = data, docs, seq_len, num_samples
        lengths = data.sequence_lengths[docs.start:docs.stop]
        tokens = int(lengths.sum(dtype=np.int64))
        if num_samples and tokens == 0:
            raise UserError(f"{data.prefix}: documents {docs.start}..{docs.stop - 1} hold no tokens, "
                            f"but {num_samples} samples are asked of them; check data.split and the dataset")
        self.desc = {"kind": "gpt_samples", "format": INDEX_FORMAT, "data": os.path.abspath(data.prefix),
                     "num_docs": len(data), "docs": [docs.start, docs.stop], "tokens": tokens,
                     "seq_len": seq_len, "num_samples": num_samples, "seed": seed}

        def build(paths: dict[str, str]) -> None:
            t0 = time.perf_counter()
            epochs = build_sample_index(lengths, seq_len, num_samples, seed, paths)
            log.info("sample index for %s docs %d..%d: %d samples of %d tokens, %d epoch(s), built in %.1fs",
                     data.prefix, docs.start, docs.stop - 1, num_samples, seq_len, epochs, time.perf_counter() - t0)

        arrays = cached_arrays(self.desc, cache_dir, os.path.basename(data.prefix), ("doc", "sample", "shuffle"),
                               build, is_builder, wait_timeout_s)
        self.doc_index, self.sample_index, self.shuffle_index = arrays["doc"], arrays["sample"], arrays["shuffle"]

    def __len__(self) -> int:
        return self.num_samples

    def _pieces(self, i: int) -> Iterator[tuple[int, int, int]]:
        """(document, first token, token count) of each document part that sample ``i`` spans."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        pos, offset = (int(x) for x in self.sample_index[self.shuffle_index[i]])
        left = self.seq_len + 1
        while left:
            doc = self.docs.start + int(self.doc_index[pos])
            take = min(left, int(self.data.sequence_lengths[doc]) - offset)
            yield doc, offset, take
            left -= take
            pos, offset = pos + 1, 0

    def __getitem__(self, i: int) -> np.ndarray:
        return np.concatenate([self.data.get(doc, offset, take) for doc, offset, take in self._pieces(i)],
                              dtype=np.int64)

    def describe_token(self, i: int, token_id: int) -> str:
        """Where sample ``i`` got ``token_id`` from: the dataset and the document."""
        doc = next((d for d, offset, take in self._pieces(i) if token_id in self.data.get(d, offset, take)), None)
        return f"{self.data.prefix}, document {doc}"
