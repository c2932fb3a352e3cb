"""Fill-in-the-middle (Bavarian et al. 2022): teach a left-to-right model to infill.

Each document inside a sample (the pieces between end-of-document tokens) is, with
probability ``rate``, cut at two random points into prefix / middle / suffix and rearranged
with sentinel tokens so that the middle comes last:

- PSM: ``<PRE> prefix <SUF> suffix <MID> middle``
- SPM (with probability ``spm_rate``): ``<PRE> <SUF> suffix <MID> prefix middle``

The three sentinels would lengthen the sample, so — as Megatron-LM's and BigCode's FIM do —
the suffix gives up its last three tokens (a document whose suffix is that short is left
as it is). The sample keeps its ``seq_len + 1`` tokens; since we rearrange tokens rather
than re-tokenised text, no padding is ever needed. The paper's run used rate 0.5, SPM 0.5 on
code. Randomness comes from ``(seed, sample index)`` alone, so a sample is the same on every
rank, at every resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megamoe.data.blend import Dataset

_SENTINELS = 3


@dataclass(frozen=True)
class FIMSentinels:
    """Token ids of the FIM sentinels (the tokenizer's ``<fim_prefix>`` etc.)."""

    prefix: int
    middle: int
    suffix: int


def permute_document(doc: np.ndarray, rng: np.random.Generator, rate: float, spm_rate: float,
                     sentinels: FIMSentinels) -> np.ndarray:
    """One document, FIM-rearranged with probability ``rate``; always the same length."""
    if rng.random() >= rate:
        return doc
    cut = np.sort(rng.integers(0, len(doc) + 1, size=2))
    spm = rng.random() < spm_rate
    prefix, middle, suffix = doc[:cut[0]], doc[cut[0]:cut[1]], doc[cut[1]:]
    if len(suffix) <= _SENTINELS:
        return doc
    suffix = suffix[:-_SENTINELS]
    pre, mid, suf = ([s] for s in (sentinels.prefix, sentinels.middle, sentinels.suffix))
    parts: list[np.ndarray | list[int]] = ([pre, suf, suffix, mid, prefix, middle] if spm
                                           else [pre, prefix, suf, suffix, mid, middle])
    return np.concatenate(parts).astype(doc.dtype, copy=False)


def apply_fim(sample: np.ndarray, rng: np.random.Generator, rate: float, spm_rate: float,
              sentinels: FIMSentinels, eod_id: int) -> np.ndarray:
    """Rearrange every document of ``sample``; end-of-document tokens stay where they are."""
    breaks = np.flatnonzero(sample == eod_id)
    starts = np.concatenate([[0], breaks + 1])
    stops = np.concatenate([breaks, [len(sample)]])
    out = []
    for a, b in zip(starts, stops):
        out.append(permute_document(sample[a:b], rng, rate, spm_rate, sentinels))
        if b < len(sample):
            out.append(sample[b:b + 1])
    return np.concatenate(out)


class FIMDataset:
    """A dataset whose samples are FIM-rearranged, deterministically per sample index.

    ``seed`` is the entropy of the per-sample generators, e.g. (run seed, source, split), so
    sources and splits draw independent decisions.
    """

    def __init__(self, inner: Dataset, rate: float, spm_rate: float, sentinels: FIMSentinels,
                 eod_id: int, seed: tuple[int, ...]) -> None:
        self.inner, self.rate, self.spm_rate = inner, rate, spm_rate
        self.sentinels, self.eod_id, self.seed = sentinels, eod_id, seed

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> np.ndarray:
        rng = np.random.default_rng([*self.seed, i])
        return apply_fim(self.inner[i], rng, self.rate, self.spm_rate, self.sentinels, self.eod_id)

    def describe_token(self, i: int, token_id: int) -> str:
        return self.inner.describe_token(i, token_id)
