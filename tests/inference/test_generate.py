"""The decoding loop: cached greedy decoding equals recomputing the prefix, a padded batch
equals one prompt at a time, and the sampling knobs do what they say."""

from __future__ import annotations

import pytest
import torch

from megamoe.config import compose
from megamoe.errors import UserError
from megamoe.inference import Sampling, generate, stream
from megamoe.inference.generate import sample
from megamoe.nn.decoder import Decoder
from tests.inference.helpers import FAMILIES, lively_model, prompts
from tests.models.helpers import random_model

GREEDY = Sampling(greedy=True)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request: pytest.FixtureRequest) -> Decoder:
    return lively_model([request.param])


@torch.no_grad()
def recomputed_greedy(model: Decoder, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding by its definition: the training forward on the whole prefix, every step."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_cached_greedy_equals_recomputing_the_prefix(model: Decoder) -> None:
    prompt = prompts()[0]
    expected = recomputed_greedy(model, prompt, 16)
    assert len(set(expected)) > 4  # the model does not just repeat itself
    assert generate(model, [prompt], 16, GREEDY, eod_id=None) == [expected]
    assert generate(model, [prompt], 16, GREEDY, eod_id=None, use_cache=False) == [expected]


@pytest.mark.parametrize("sampling", [GREEDY, Sampling(temperature=0.8, top_k=40, top_p=0.9, seed=3)])
def test_a_padded_batch_equals_one_prompt_at_a_time(model: Decoder, sampling: Sampling) -> None:
    batch = prompts()
    together = generate(model, batch, 12, sampling, eod_id=None)
    if sampling.is_greedy:  # a draw depends on the batch's earlier draws, greedy on nothing
        assert together == [generate(model, [prompt], 12, sampling, eod_id=None)[0] for prompt in batch]
    assert together == generate(model, batch, 12, sampling, eod_id=None, use_cache=False)


def test_a_sequence_stops_at_eod_and_the_others_go_on(model: Decoder) -> None:
    batch = prompts()
    free = generate(model, batch, 8, GREEDY, eod_id=None)
    eod = free[0][3]
    stopped = generate(model, batch, 8, GREEDY, eod_id=eod)
    for row, ids in enumerate(free):
        assert stopped[row] == (ids[:ids.index(eod)] if eod in ids else ids)
    steps = list(stream(model, batch[:1], 8, GREEDY, eod_id=eod))
    assert len(steps) == 4 and steps[-1] == [None]  # the loop ends once every sequence has stopped


def test_vocab_size_keeps_padding_rows_out(model: Decoder) -> None:
    out = generate(model, prompts(), 12, Sampling(temperature=2.0, seed=1), eod_id=None, vocab_size=100)
    assert max(max(ids) for ids in out) < 100


def test_seed_decides_the_draws(model: Decoder) -> None:
    batch, hot = prompts(), Sampling(temperature=1.5, seed=0)
    first = generate(model, batch, 12, hot, eod_id=None)
    assert generate(model, batch, 12, hot, eod_id=None) == first
    assert generate(model, batch, 12, Sampling(temperature=1.5, seed=1), eod_id=None) != first
    greedy = generate(model, batch, 12, GREEDY, eod_id=None)
    assert generate(model, batch, 12, Sampling(temperature=0.0), eod_id=None) == greedy
    assert generate(model, batch, 12, Sampling(top_k=1, seed=5), eod_id=None) == greedy


def test_top_k_and_top_p_cut_the_distribution() -> None:
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0]]).log_softmax(-1).expand(2000, -1)
    generator = torch.Generator().manual_seed(0)
    assert set(sample(logits, Sampling(top_k=2), generator).tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # 0.43, 0.26, 0.16, ...: the nucleus of 0.6 needs two tokens
    assert probs[0] < 0.6 < probs[:2].sum()
    assert set(sample(logits, Sampling(top_p=0.6), generator).tolist()) == {0, 1}
    assert set(sample(logits, Sampling(), generator).tolist()) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize(("kwargs", "flag"), [({"temperature": -1.0}, "--temperature"), ({"top_k": -2}, "--top-k"),
                                             ({"top_p": 0.0}, "--top-p"), ({"top_p": 1.5}, "--top-p")])
def test_bad_sampling_settings_name_their_flag(kwargs: dict, flag: str) -> None:
    with pytest.raises(UserError, match=flag):
        Sampling(**kwargs)


def test_refuses_what_cached_decoding_cannot_reproduce() -> None:
    with pytest.raises(ValueError, match="eval"):
        generate(random_model(compose(["+exp=tiny"])).train(), [[1]], 1, GREEDY, None)
    for override in ("moe.router_mode=expert_choice", "moe.capacity_factor=1.0"):
        with pytest.raises(ValueError, match="dropless token-choice"):
            generate(random_model(compose(["+exp=tiny", override])), [[1]], 1, GREEDY, None)
    with pytest.raises(UserError, match="at least one token"):
        generate(random_model(compose(["+exp=tiny"])), [[1], []], 1, GREEDY, None)
