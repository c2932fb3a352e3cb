"""The single-process backend: the whole model in one process (megamoe.inference.load_for_inference).

Log-likelihoods run in batches of requests sorted longest first, so a batch's rows have similar
lengths and little padding; greedy continuations use the KV-cached decoder. Progress shows as
one bar per task on stderr.
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch
from tqdm import tqdm

from megamoe.evaluation.scoring import Request, greedy_rows, pack, sequence_logprobs
from megamoe.inference import Sampling, generate
from megamoe.nn.decoder import Decoder


class ModelBackend:
    """:class:`megamoe.evaluation.scoring.Backend` over a whole model in eval mode."""

    def __init__(self, model: Decoder, eod_id: int, vocab_size: int, batch_size: int) -> None:
        self.model, self.eod_id, self.vocab_size, self.batch_size = model, eod_id, vocab_size, batch_size

    def _bar(self, total: int, desc: str, unit: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)

    @torch.inference_mode()
    def scores(self, requests: Sequence[Request], desc: str) -> list[tuple[float, bool]]:
        """Per request, its continuation's log-likelihood and whether greedy decoding would produce
        the continuation (lm-evaluation-harness's ``(logprob, is_greedy)``)."""
        device = self.model.head_weight.device
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].tokens))
        values: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        with self._bar(len(requests), desc, "choice") as bar:
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                chosen = [requests[i] for i in batch]
                tokens, labels = pack(chosen, len(chosen), len(chosen[0].tokens) - 1, self.eod_id)
                hidden, labels = self.model.hidden_states(tokens.to(device)), labels.to(device)
                logprobs = sequence_logprobs(hidden, self.model.head_weight, labels).tolist()
                greedy = greedy_rows(hidden, self.model.head_weight, labels, self.vocab_size).tolist()
                for i, value, is_greedy in zip(batch, logprobs, greedy):
                    values[i] = (value, is_greedy)
                bar.update(len(batch))
        return values

    def loglikelihoods(self, requests: Sequence[Request], desc: str) -> list[float]:
        return [value for value, _ in self.scores(requests, desc)]

    def greedy(self, prompts: Sequence[list[int]], max_new_tokens: int, desc: str) -> list[list[int]]:
        outputs: list[list[int]] = []
        with self._bar(len(prompts), desc, "prompt") as bar:
            for start in range(0, len(prompts), self.batch_size):
                batch = list(prompts[start:start + self.batch_size])
                outputs += generate(self.model, batch, max_new_tokens, Sampling(greedy=True), self.eod_id,
                                    vocab_size=self.vocab_size)
                bar.update(len(batch))
        return outputs
