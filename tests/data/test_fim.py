"""Fill-in-the-middle: every document of a sample is either untouched or a PSM/SPM rearrangement
that a reader of the definition can undo; length, EOD positions and the other tokens are kept."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from megamoe.data.fim import FIMDataset, FIMSentinels, apply_fim
from megamoe.data.mock import MockDataset

EOD, PRE, MID, SUF = 1000, 1001, 1002, 1003
SENTINELS = FIMSentinels(prefix=PRE, middle=MID, suffix=SUF)


def undo(doc: list[int]) -> tuple[str, list[int]]:
    """('none' | 'psm' | 'spm', the document with its suffix's last 3 tokens cut) from the definition."""
    if not doc or doc[0] != PRE:
        return "none", doc
    if doc[1] == SUF:  # SPM: <PRE> <SUF> suffix <MID> prefix middle
        mid = doc.index(MID)
        return "spm", doc[mid + 1:] + doc[2:mid]
    suf, mid = doc.index(SUF), doc.index(MID)  # PSM: <PRE> prefix <SUF> suffix <MID> middle
    return "psm", doc[1:suf] + doc[mid + 1:] + doc[suf + 1:mid]


def _sample(rng: np.random.Generator, length: int = 257) -> np.ndarray:
    sample = rng.integers(0, 1000, length)
    sample[rng.random(length) < 0.03] = EOD
    return sample


def _documents(sample: np.ndarray) -> list[list[int]]:
    return [d for d in np.split(sample, np.flatnonzero(sample == EOD)) for d in [d[d != EOD].tolist()]]


@pytest.mark.parametrize("spm_rate", [0.0, 0.5, 1.0])
def test_each_document_is_kept_or_rearranged(spm_rate) -> None:
    rng = np.random.default_rng(0)
    kinds: Counter[str] = Counter()
    for i in range(200):
        sample = _sample(rng)
        out = apply_fim(sample, np.random.default_rng(i), 1.0, spm_rate, SENTINELS, EOD)
        assert len(out) == len(sample) and out.dtype == sample.dtype
        assert np.array_equal(np.flatnonzero(out == EOD), np.flatnonzero(sample == EOD))  # documents stay put
        for before, after in zip(_documents(sample), _documents(out)):
            kind, restored = undo(after)
            kinds[kind] += 1
            if kind == "none":
                assert after == before
            else:  # the original less the suffix's last three tokens; those three became the sentinels
                assert restored == before[:-3]
                assert Counter(after) == Counter(before[:-3]) + Counter([PRE, MID, SUF])
    # PSM with an empty prefix reads like SPM; SPM never reads like PSM.
    spm_share = kinds["spm"] / (kinds["spm"] + kinds["psm"])
    assert {0.0: spm_share < 0.15, 0.5: 0.4 < spm_share < 0.65, 1.0: spm_share == 1.0}[spm_rate]
    assert kinds["none"] > 0  # documents whose suffix is too short to give up 3 tokens


def test_rate_zero_is_identity_and_rate_is_respected() -> None:
    rng = np.random.default_rng(1)
    sample = _sample(rng, 4097)
    assert np.array_equal(apply_fim(sample, rng, 0.0, 0.5, SENTINELS, EOD), sample)
    changed, total = 0, 0
    for i in range(300):
        docs = _documents(apply_fim(sample, np.random.default_rng(i), 0.5, 0.5, SENTINELS, EOD))
        changed += sum(undo(d)[0] != "none" for d in docs if len(d) > 20)
        total += sum(len(d) > 20 for d in docs)
    assert 0.4 < changed / total < 0.55  # 0.5, less the few cuts that leave a suffix of <= 3 tokens


def test_dataset_is_deterministic_per_index() -> None:
    inner = MockDataset(vocab_size=1001, seq_len=64, num_samples=10, seed=3)  # id 1000 = EOD appears
    a = FIMDataset(inner, 0.9, 0.5, SENTINELS, EOD, seed=(7, 0, 0))
    b = FIMDataset(inner, 0.9, 0.5, SENTINELS, EOD, seed=(7, 0, 0))
    other = FIMDataset(inner, 0.9, 0.5, SENTINELS, EOD, seed=(7, 1, 0))
    assert len(a) == 10
    assert all(np.array_equal(a[i], b[i]) for i in [3, 0, 9, 3])
    assert any(not np.array_equal(a[i], other[i]) for i in range(10))
    assert all(len(a[i]) == 65 for i in range(10))
