"""The decoding loop: a batch of prompts, left-padded, one new token per sequence per step.

With the KV cache (megamoe.nn.kv_cache) the first step runs the prompts and every later step
only the tokens just chosen; without it every step recomputes the whole prefix (the baseline
the cache must agree with). The next token is the argmax (greedy) or a draw from the
temperature-scaled softmax, cut to the top-k tokens and to the top-p nucleus, with a seeded
generator on the CPU so a seed gives the same text on any device.

A token's output must not depend on which other tokens share its forward pass, or cached
decoding (one token per step) and recomputation (the whole batch) would disagree: the MoE
layers must route each token by itself — token choice without a capacity limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from megamoe.config.choices import RouterMode
from megamoe.errors import UserError
from megamoe.nn.decoder import Decoder
from megamoe.nn.kv_cache import KVCache


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: argmax when ``greedy`` (or temperature 0), else a draw
    from softmax(logits / temperature) over the ``top_k`` most likely tokens (0: all) whose
    probabilities, largest first, reach ``top_p`` (1: all), from a generator seeded with ``seed``."""

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise UserError(f"--temperature {self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise UserError(f"--top-k {self.top_k}: must be >= 0 (0 = no top-k cut)")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p {self.top_p}: must be in (0, 1] (1 = no nucleus cut)")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """The next token [b] from fp32 logits [b, V] on the CPU."""
    if sampling.is_greedy:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        beyond = probs.cumsum(dim=-1) - probs > sampling.top_p  # the nucleus was full before this token
        logits = logits.scatter(-1, order, ordered.masked_fill(beyond, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def left_pad(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [b, s] with each prompt at the right end, and which of them are real [b, s]."""
    width = max(map(len, prompts))
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    real = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, ids in enumerate(prompts):
        tokens[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        real[row, width - len(ids):] = True
    return tokens.to(device), real.to(device)


def check_decodable(model: Decoder, prompts: list[list[int]]) -> None:
    """Refuse what would make cached and recomputed decoding differ, or cannot be decoded at all."""
    if model.training:
        raise ValueError("generation needs model.eval(): training mode adds router noise")
    if not model.pre_process or not model.post_process:
        raise ValueError("generation needs the whole model (one stage with the embedding and the head)")
    for layer in model.moe_layers():
        if layer.moe.router_mode != RouterMode.TOKEN_CHOICE or layer.moe.capacity_factor is not None:
            raise ValueError("generation needs dropless token-choice routing (megamoe.inference.load_checkpoint "
                             "builds the model that way)")
    if not prompts or not all(prompts):
        raise UserError("every prompt needs at least one token")


def next_logits(model: Decoder, tokens: torch.Tensor, real: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """fp32 logits [b, V] of the token after ``tokens`` [b, s], which continue the cached positions."""
    hidden = model.hidden_states(tokens, cache.advance(real), cache)[:, -1]
    return F.linear(hidden, model.head_weight).float()


@torch.inference_mode()
def stream(model: Decoder, prompt_ids: list[list[int]], max_new_tokens: int, sampling: Sampling,
           eod_id: Optional[int], use_cache: bool = True, vocab_size: Optional[int] = None
           ) -> Iterator[list[Optional[int]]]:
    """Yield, at each step, the new token of every prompt (None once its sequence has stopped).

    A sequence stops at ``eod_id`` (not yielded) or after ``max_new_tokens``. ``vocab_size``
    (the tokenizer's) keeps the embedding's padding rows from being sampled.
    """
    check_decodable(model, prompt_ids)
    device = model.head_weight.device
    tokens, real = left_pad(prompt_ids, device)
    generator = torch.Generator().manual_seed(sampling.seed)
    running = torch.ones(len(prompt_ids), dtype=torch.bool)
    cache, step_tokens, step_real = KVCache(), tokens, real
    for _ in range(max_new_tokens):
        if not use_cache:
            cache, step_tokens, step_real = KVCache(), tokens, real
        logits = next_logits(model, step_tokens, step_real, cache)[:, :vocab_size].cpu()
        chosen = sample(logits, sampling, generator)
        if eod_id is not None:
            running &= chosen != eod_id
        yield [int(token) if alive else None for token, alive in zip(chosen, running)]
        if not running.any():
            return
        step_tokens = chosen[:, None].to(device)
        step_real = torch.ones_like(step_tokens, dtype=torch.bool)
        tokens, real = torch.cat([tokens, step_tokens], dim=1), torch.cat([real, step_real], dim=1)


def generate(model: Decoder, prompt_ids: list[list[int]], max_new_tokens: int, sampling: Sampling,
             eod_id: Optional[int], use_cache: bool = True, vocab_size: Optional[int] = None) -> list[list[int]]:
    """The new ids of each prompt (see :func:`stream`), computed as a batch."""
    completions: list[list[int]] = [[] for _ in prompt_ids]
    for step in stream(model, prompt_ids, max_new_tokens, sampling, eod_id, use_cache, vocab_size):
        for ids, token in zip(completions, step):
            if token is not None:
                ids.append(token)
    return completions
