"""Random tokens that need no files: ``data.kind=mock`` for smoke tests, benchmarks and layout checks."""

from __future__ import annotations

import numpy as np


class MockDataset:
    """``num_samples`` samples of ``seq_len + 1`` uniform random token ids below ``vocab_size``.

    Sample ``i`` depends only on ``(seed, i)``, so every rank, layout and resume sees the same
    stream without sharing any state.
    """

    def __init__(self, vocab_size: int, seq_len: int, num_samples: int, seed: int) -> None:
        self.vocab_size, self.seq_len, self.num_samples, self.seed = vocab_size, seq_len, num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        return np.random.default_rng([self.seed, i]).integers(0, self.vocab_size, self.seq_len + 1, dtype=np.int64)

    def describe_token(self, i: int, token_id: int) -> str:
        return f"mock sample {i}"
