"""The single-process backend: batching, sorting and padding change no score or completion; the
greedy check agrees with greedy decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megamoe.config import compose
from megamoe.evaluation.model import ModelBackend
from megamoe.evaluation.scoring import Request
from megamoe.inference import Sampling, generate
from megamoe.nn.decoder import Decoder
from tests.models.helpers import random_model

EOD, VOCAB = 256, 262  # ByteTokenizer's


@pytest.fixture(scope="module")
def model() -> Decoder:
    return random_model(compose(["+exp=tiny"]))


@torch.no_grad()
def reference_loglikelihood(model: Decoder, request: Request) -> float:
    """One request alone, from the full logits."""
    ids = torch.tensor([request.tokens])
    logprobs = F.log_softmax(model(ids[:, :-1]).double(), dim=-1)[0]
    targets = ids[0, 1:]
    picked = logprobs[torch.arange(len(targets)), targets]
    return float(picked[-request.scored:].sum())


def test_loglikelihoods_match_each_request_alone(model: Decoder) -> None:
    torch.manual_seed(1)
    requests = [Request(tuple(torch.randint(0, VOCAB, (n,)).tolist()), scored)
                for n, scored in [(5, 2), (30, 7), (12, 1), (30, 30 - 1), (2, 1), (17, 4), (9, 3)]]
    values = ModelBackend(model, EOD, VOCAB, batch_size=3).loglikelihoods(requests, "test")
    expected = [reference_loglikelihood(model, request) for request in requests]
    torch.testing.assert_close(torch.tensor(values), torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_greedy_batches_like_one_prompt_at_a_time(model: Decoder) -> None:
    prompts = [[EOD, *b"7 times 8 is"], [EOD, *b"Alice"], [EOD, 3], [EOD, *b"For breakfast Kate eats"]]
    outputs = ModelBackend(model, EOD, VOCAB, batch_size=3).greedy(prompts, 6, "test")
    assert outputs == [generate(model, [p], 6, Sampling(greedy=True), EOD, vocab_size=VOCAB)[0] for p in prompts]
    assert all(0 < len(ids) <= 6 and max(ids) < VOCAB for ids in outputs)


def test_scores_say_whether_greedy_decoding_gives_the_continuation(model: Decoder) -> None:
    prompts = [[EOD, *b"Alice lives in"], [EOD, *b"7 times"], [EOD, 3]]
    greedy = [generate(model, [p], 4, Sampling(greedy=True), EOD, vocab_size=VOCAB)[0] for p in prompts]
    assert all(len(ids) == 4 for ids in greedy)  # no early eod: the requests below score 4 tokens
    requests = [Request((*prompt, *ids), 4) for prompt, ids in zip(prompts, greedy)]
    requests += [Request((*prompt, *ids[:3], (ids[3] + 1) % VOCAB), 4) for prompt, ids in zip(prompts, greedy)]
    scores = ModelBackend(model, EOD, VOCAB, batch_size=4).scores(requests, "test")
    assert [is_greedy for _, is_greedy in scores] == [True] * 3 + [False] * 3
    assert [value for value, _ in scores] == ModelBackend(model, EOD, VOCAB, batch_size=4).loglikelihoods(requests, "t")
