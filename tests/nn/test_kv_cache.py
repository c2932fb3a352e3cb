"""The KV cache: a sequence fed in pieces through the cache computes the logits of one full
forward pass (both families: Yuan's LFA convolution state, Qwen-MoE's grouped K/V), and a
left-padded row computes what the sequence computes alone."""

from __future__ import annotations

import pytest
import torch

from megamoe.config import compose
from megamoe.nn.decoder import Decoder
from megamoe.nn.kv_cache import KVCache
from tests.models.helpers import random_model

FAMILIES = ["+exp=tiny", "+exp=qwen_moe_tiny"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request: pytest.FixtureRequest) -> Decoder:
    return random_model(compose([request.param]))


def cached_logits(model: Decoder, tokens: torch.Tensor, real: torch.Tensor, pieces: list[int]) -> torch.Tensor:
    """Logits of ``tokens`` [b, s] fed through one cache ``pieces[i]`` positions at a time."""
    cache, out, start = KVCache(), [], 0
    for size in pieces:
        piece = slice(start, start + size)
        out.append(model(tokens[:, piece], cache.advance(real[:, piece]), cache))
        start += size
    return torch.cat(out, dim=1)


@torch.no_grad()
def test_pieces_through_the_cache_match_one_forward(model: Decoder) -> None:
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    full = model(tokens)
    pieces = cached_logits(model, tokens, torch.ones_like(tokens, dtype=torch.bool), [5, 1, 3, 1, 2])
    torch.testing.assert_close(pieces, full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_left_padding_computes_what_the_sequence_computes_alone(model: Decoder) -> None:
    tokens = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(1))
    alone = model(tokens)
    padded = torch.cat([torch.full((1, 4), 7), tokens], dim=1)
    real = torch.arange(13) >= 4
    logits = cached_logits(model, padded, real.expand(1, -1), [6, 1, 4, 1, 1])
    assert logits.isfinite().all()  # padding queries attend to themselves: no NaN row
    torch.testing.assert_close(logits[:, 4:], alone, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_cache_holds_kv_at_kv_head_count_and_lfa_inputs() -> None:
    yuan, qwen = (random_model(compose([exp])) for exp in FAMILIES)
    tokens = torch.randint(0, 512, (2, 5))
    for model in (yuan, qwen):
        cache = KVCache()
        model(tokens, cache.advance(torch.ones_like(tokens, dtype=torch.bool)), cache)
        layer = cache.layer(0)
        heads = 2 if model is qwen else 4  # qwen_moe_tiny: 4 query heads over 2 K/V heads
        assert layer.keys.shape == layer.values.shape == (2, heads, 5, 16)
    cache = KVCache()
    yuan(tokens, cache.advance(torch.ones_like(tokens, dtype=torch.bool)), cache)
    inputs = cache.layer(3).last_inputs  # conv1 reads H = 64, conv2 H / 2 = 32, at the last position
    assert {name: tuple(x.shape) for name, x in inputs.items()} == {"conv1": (2, 1, 64), "conv2": (2, 1, 32)}


def test_positions_and_mask_follow_each_sequence() -> None:
    cache = KVCache()
    real = torch.tensor([[False, False, True], [True, True, True]])
    assert cache.advance(real).tolist() == [[0, 0, 0], [0, 1, 2]]
    assert cache.advance(torch.ones(2, 1, dtype=torch.bool)).tolist() == [[1], [3]]
    assert len(cache) == 4
    # the new query (position 3 in the cache) sees the real keys before it and itself
    assert cache.mask[:, 0, -1].tolist() == [[False, False, True, True], [True, True, True, True]]
    first = KVCache()
    first.advance(real)
    # padding queries see themselves only; real ones the real keys up to themselves
    assert first.mask[0, 0].tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    assert first.mask[1, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
