"""From datasets to per-rank micro-batches, and from a config to the datasets.

The loader's whole state is ``consumed_samples``, the position in the global sample stream:
global batch ``g`` is samples ``[g * B, (g + 1) * B)`` (for a fixed batch ``B``), and data-
parallel rank ``r`` of ``D`` reads the contiguous slice ``r * B / D`` … of it, split into
micro-batches. Saving that one number and restoring it continues the stream exactly, on any
data-parallel layout.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Optional

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from megamoe.config.choices import DataKind
from megamoe.data.blend import BlendedDataset, Dataset, blend_counts, normalize_weights, split_ranges
from megamoe.data.fim import FIMDataset, FIMSentinels
from megamoe.data.indexed import IndexedDataset
from megamoe.data.mock import MockDataset
from megamoe.data.samples import DEFAULT_WAIT_TIMEOUT_S, SampleDataset, build_workers
from megamoe.data.tokenizer import Tokenizer, tokenizer_from_config
from megamoe.errors import SharedError, UserError

Batch = dict[str, torch.Tensor]


def position_ids(tokens: np.ndarray, eod_id: Optional[int]) -> np.ndarray:
    """Positions ``0, 1, …`` per row; with ``eod_id``, restarting at 0 after each end-of-document."""
    pos = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int64), tokens.shape)
    if eod_id is None:
        return pos.copy()
    after_eod = np.where(tokens == eod_id, pos + 1, 0)  # a document starts right after each eod
    doc_start = np.zeros_like(pos)
    np.maximum.accumulate(after_eod[:, :-1], axis=1, out=doc_start[:, 1:])
    return pos - doc_start


def document_ids(tokens: np.ndarray, eod_id: int) -> np.ndarray:
    """Each token's document in its row: 0 for the first, one more after each end-of-document
    token, which belongs to the document it ends (megamoe.nn.documents)."""
    is_eod = tokens == eod_id
    return (np.cumsum(is_eod, axis=1) - is_eod).astype(np.int64)


class GlobalBatchLoader:
    """Yields, per training step, this data-parallel rank's micro-batches of the global batch.

    Each micro-batch holds ``tokens`` and ``labels`` (the next tokens) ``[micro_batch, seq_len]``
    int64, ``loss_mask`` (float32 ones) and ``position_ids`` int64, which restart after every
    ``eod_id`` when ``reset_position_ids`` (data without an eod token, e.g. mock, has nothing
    to restart); with ``reset_attention_mask`` also ``document_ids`` int64 (:func:`document_ids`),
    which keep attention inside each document. Iteration stops when the dataset cannot fill
    another global batch.

    With ``vocab_size``, every micro-batch's largest id is checked on the host: an id the
    embedding cannot hold would otherwise fail mid-step with a bare IndexError (on a GPU, a
    device-side assert that names nothing), so the loader names the dataset and document.
    """

    def __init__(self, dataset: Dataset, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0, eod_id: Optional[int] = None, reset_position_ids: bool = False,
                 vocab_size: Optional[int] = None, reset_attention_mask: bool = False) -> None:
        if global_batch % (micro_batch * dp_size):
            raise ValueError(f"global batch {global_batch} is not a multiple of micro batch {micro_batch} "
                             f"× data-parallel size {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"data-parallel rank {dp_rank} outside [0, {dp_size})")
        if reset_attention_mask and eod_id is None:
            raise ValueError("reset_attention_mask finds the documents by their end-of-document token: give eod_id")
        self.dataset, self.global_batch, self.micro_batch = dataset, global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = consumed_samples
        self.reset_eod = eod_id if reset_position_ids else None
        self.document_eod = eod_id if reset_attention_mask else None
        self.vocab_size = vocab_size

    def __iter__(self) -> Iterator[list[Batch]]:
        per_rank = self.global_batch // self.dp_size
        while self.consumed_samples + self.global_batch <= len(self.dataset):
            first = self.consumed_samples + self.dp_rank * per_rank
            batches = [self._micro_batch(range(s, s + self.micro_batch))
                       for s in range(first, first + per_rank, self.micro_batch)]
            self.consumed_samples += self.global_batch
            yield batches

    def _micro_batch(self, indices: range) -> Batch:
        samples = np.stack([self.dataset[i] for i in indices]).astype(np.int64, copy=False)
        if self.vocab_size is not None and samples.max(initial=0) >= self.vocab_size:
            self._out_of_vocab(indices, samples)
        tokens, labels = samples[:, :-1], samples[:, 1:]
        batch = {
            "tokens": torch.from_numpy(np.ascontiguousarray(tokens)),
            "labels": torch.from_numpy(np.ascontiguousarray(labels)),
            "loss_mask": torch.ones(tokens.shape, dtype=torch.float32),
            "position_ids": torch.from_numpy(position_ids(tokens, self.reset_eod)),
        }
        if self.document_eod is not None:
            batch["document_ids"] = torch.from_numpy(document_ids(tokens, self.document_eod))
        return batch

    def _out_of_vocab(self, indices: range, samples: np.ndarray) -> None:
        row = int(np.argmax(samples.max(axis=1) >= self.vocab_size))
        token = int(samples[row].max())
        where = self.dataset.describe_token(indices[row], token)
        raise UserError(f"{where} holds token id {token}, but model.vocab_size is {self.vocab_size} (sample "
                        f"{indices[row]} of the stream): the data was tokenized with a larger vocabulary; "
                        "set model.vocab_size and data.tokenizer to the tokenizer that wrote it, or re-tokenize")

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed_samples = int(state["consumed_samples"])


def data_stream(cfg: DictConfig) -> dict[str, Any]:
    """Everything that fixes which sample comes at which position of the training stream, under
    the config keys that set it (documents and tokens per source stand for the data itself).

    The run length and the global batch are not part of it: the stream is prefix-stable
    (:mod:`megamoe.data.samples`, :mod:`megamoe.data.blend`), so a resumed run may change them.
    """
    d = cfg.data
    stream: dict[str, Any] = {"data.kind": d.kind, "train.seq_len": cfg.train.seq_len, "seed": cfg.seed}
    if d.kind == DataKind.MOCK:
        return {**stream, "model.vocab_size": cfg.model.vocab_size}
    stream.update({"data.split": d.split, "data.sources": len(d.sources)})
    weights = normalize_weights([s.weight for s in d.sources])
    for i, (src, weight) in enumerate(zip(d.sources, weights.tolist())):
        data = IndexedDataset(src.path)
        key = f"data.sources[{i}]"
        stream.update({f"{key}.documents": len(data), f"{key}.tokens": data.num_tokens, f"{key}.weight": weight,
                       f"{key}.fim_rate": src.fim_rate, f"{key}.fim_spm_rate": src.fim_spm_rate})
    return stream


def stream_change(before: dict[str, Any], now: dict[str, Any]) -> Optional[str]:
    """The first setting whose change reorders the stream, as ``key: old → new``; None if none."""
    key = next((k for k in {**before, **now} if before.get(k) != now.get(k)), None)
    return None if key is None else f"{key}: {before.get(key)} → {now.get(key)}"


def data_eod_id(cfg: DictConfig) -> Optional[int]:
    """The end-of-document id of the run's data (None for mock data, which has none)."""
    return None if cfg.data.kind == DataKind.MOCK else tokenizer_from_config(cfg.data.tokenizer).eod_id


def build_datasets(cfg: DictConfig, is_builder: bool, wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S
                   ) -> tuple[Dataset, dict[str, Dataset], dict[str, Dataset]]:
    """Train dataset, and validation / test datasets per language, for a run's config.

    Train holds ``train.steps × train.global_batch`` samples; every validation and test set
    holds ``train.eval_iters × train.global_batch`` (the same samples at every evaluation, so
    the per-language curves compare like with like). Only ``is_builder`` (global rank 0)
    writes index files; the other ranks wait up to ``wait_timeout_s`` for them.
    """
    t = cfg.train
    n_train, n_eval = t.steps * t.global_batch, t.eval_iters * t.global_batch
    if cfg.data.kind == DataKind.MOCK:
        def mock(n: int, salt: int) -> MockDataset:
            return MockDataset(cfg.model.vocab_size, t.seq_len, n, cfg.seed + salt)
        return mock(n_train, 0), {"mock": mock(n_eval, 1)}, {"mock": mock(n_eval, 2)}
    return _IndexedBuilder(cfg, is_builder, wait_timeout_s).build(n_train, n_eval)


class _IndexedBuilder:
    """Opens every source once, builds all per-source sample indices in parallel, then blends."""

    def __init__(self, cfg: DictConfig, is_builder: bool, wait_timeout_s: float) -> None:
        self.cfg, self.is_builder, self.wait_timeout_s = cfg, is_builder, wait_timeout_s
        self.sources = list(cfg.data.sources)
        self.data = [IndexedDataset(s.path) for s in self.sources]
        self.ranges = [split_ranges(cfg.data.split, len(d)) for d in self.data]
        self.tokenizer = tokenizer_from_config(cfg.data.tokenizer)
        check_vocabulary(self.tokenizer, cfg.model.vocab_size)

    def _cache_dir(self, i: int) -> str:
        return self.cfg.data.cache_dir or os.path.join(os.path.dirname(os.path.abspath(self.data[i].prefix)), "cache")

    def build(self, n_train: int, n_eval: int) -> tuple[Dataset, dict[str, Dataset], dict[str, Dataset]]:
        for i, r in enumerate(self.ranges):
            if not len(r[0]):
                raise UserError(f"data.sources[{i}] ({self.sources[i].path}): data.split '{self.cfg.data.split}' "
                                f"leaves none of its {len(self.data[i])} documents for training")
        # (name, split, member sources, samples): the train blend, then one eval set per language.
        groups = [("train", 0, list(range(len(self.sources))), n_train)]
        for split in (1, 2):
            langs: OrderedDict[str, list[int]] = OrderedDict()
            for i, s in enumerate(self.sources):
                if len(self.ranges[i][split]) and n_eval:
                    langs.setdefault(s.lang, []).append(i)
            groups += [(lang, split, members, n_eval) for lang, members in langs.items()]
        counts = [blend_counts([self.sources[i].weight for i in members], n) for _, _, members, n in groups]
        jobs = [(i, split, int(c)) for (_, split, members, _), cs in zip(groups, counts) for i, c in zip(members, cs)]
        with ThreadPoolExecutor(build_workers()) as pool:
            built = list(tqdm(pool.map(lambda job: self._samples(*job), jobs), total=len(jobs),
                              desc="sample indices", unit="index", disable=not self.is_builder))
        parts = dict(zip(((i, split) for i, split, _ in jobs), built))
        out: list[dict[str, Dataset]] = [{}, {}, {}]
        for name, split, members, n in groups:
            ds = [parts[i, split] for i in members]
            weights = [self.sources[i].weight for i in members]
            out[split][name] = ds[0] if len(ds) == 1 else BlendedDataset(
                ds, weights, n, self._cache_dir(0), self.is_builder, self.wait_timeout_s)
        return out[0]["train"], out[1], out[2]

    def _samples(self, i: int, split: int, n: int) -> Dataset:
        src, seed = self.sources[i], self.cfg.seed
        ds: Dataset = SampleDataset(self.data[i], self.ranges[i][split], self.cfg.train.seq_len, n, seed,
                                    self._cache_dir(i), self.is_builder, self.wait_timeout_s)
        if src.fim_rate > 0:
            ds = FIMDataset(ds, src.fim_rate, src.fim_spm_rate, fim_sentinels(self.tokenizer, f"data.sources[{i}]"),
                            self.tokenizer.eod_id, (seed, i, split))
        return ds


def check_vocabulary(tokenizer: Tokenizer, vocab_size: int) -> None:
    """The model's embedding must hold every id the tokenizer can produce (checked at startup)."""
    if tokenizer.vocab_size > vocab_size:
        raise SharedError(f"model.vocab_size: {vocab_size} is smaller than the vocabulary of data.tokenizer "
                          f"({tokenizer.name}: {tokenizer.vocab_size} ids); set model.vocab_size to at least "
                          f"{tokenizer.padded_vocab_size} (padded), or name the tokenizer the data was made with")


def fim_sentinels(tokenizer: Tokenizer, where: str) -> FIMSentinels:
    """The tokenizer's FIM sentinel ids; a tokenizer without them cannot do FIM."""
    ids = {role: tokenizer.special_id(f"fim_{role}") for role in ("prefix", "middle", "suffix")}
    missing = [role for role, token_id in ids.items() if token_id is None]
    if missing:
        raise UserError(f"{where}.fim_rate > 0, but tokenizer {tokenizer.name} has no fim_{missing[0]} token "
                        f"(e.g. <fim_{missing[0]}>); add the FIM special tokens or set fim_rate to 0")
    return FIMSentinels(**{role: token_id for role, token_id in ids.items() if token_id is not None})
