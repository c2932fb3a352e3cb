"""Scoring: what a task's items become (token sequences), what the model is asked, and the metrics.

Multiple choice (as lm-evaluation-harness's ``acc`` / ``acc_norm``): each choice's
log-likelihood is the sum of its tokens' log-probabilities after the context; ``acc`` picks the
largest, ``acc_norm`` the largest per character of the choice (``len(choice)`` in Unicode
characters, lm-evaluation-harness's normalisation), which removes the bias towards short answers.
Generation: greedy decoding, the completion cut before the first stop string, then exact match.
Perplexity (as the harness's rolling log-likelihood): every token of a text scored once, in
windows that give each as much context as fits; word and byte perplexity, bits per byte.

Every sequence starts with the end-of-document token — what precedes each document in
training — and is cut from the left to the run's training length (``window``). Context and
continuation are tokenized separately, so a choice's tokens are the same after any context.
The model side is a :class:`Backend`: one process (megamoe.evaluation.model), or the training
run's pipeline stages (megamoe.train.downstream); both feed the same helpers, so they agree.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from megamoe.data.tokenizer import Tokenizer
from megamoe.errors import TaskError
from megamoe.evaluation.tasks import GENERATION, MULTIPLE_CHOICE, ChoiceItem, GenerationItem, Task, TextItem
from megamoe.nn.casts import compute_dtype
from megamoe.nn.loss import IGNORE_INDEX, ChunkedCrossEntropy, chunk_tokens


@dataclass(frozen=True)
class Request:
    """One sequence to score: its token ids, of which the last ``scored`` are the continuation."""

    tokens: tuple[int, ...]
    scored: int


class Backend(Protocol):
    """Runs the model: log-likelihoods of continuations, and greedy continuations of prompts
    (``desc`` names the task, for a progress bar)."""

    def loglikelihoods(self, requests: Sequence[Request], desc: str) -> list[float]:
        """Per request, the sum of its continuation tokens' log-probabilities."""

    def greedy(self, prompts: Sequence[list[int]], max_new_tokens: int, desc: str) -> list[list[int]]:
        """Per prompt, up to ``max_new_tokens`` greedily chosen ids (what follows an eod id is ignored)."""


def continuation_request(context: list[int], continuation: list[int], window: int, where: str) -> Request:
    """``context`` + ``continuation`` ids, cut from the left to a ``window``-token sequence (plus
    its last label), the continuation scored; TaskError when the continuation cannot fit."""
    if not 0 < len(continuation) <= window:
        raise TaskError(f"{where}: a continuation of {len(continuation)} tokens does not fit a {window}-token "
                        f"sequence; every choice needs 1 to {window} tokens")
    return Request(tuple((context + continuation)[-(window + 1):]), len(continuation))


def choice_requests(task: Task, tokenizer: Tokenizer, window: int) -> list[Request]:
    """One request per (item, choice), item by item."""
    requests = []
    for index, item in enumerate(task.items_of(ChoiceItem)):
        context = [tokenizer.eod_id, *tokenizer.encode(item.context)]
        requests += [continuation_request(context, tokenizer.encode(choice), window, f"{task.name}: item {index}")
                     for choice in item.choices]
    return requests


def prompt_ids(text: str, tokenizer: Tokenizer, window: int, max_new_tokens: int) -> list[int]:
    """A prompt's ids after the eod, cut from the left to leave room for ``max_new_tokens``."""
    return [tokenizer.eod_id, *tokenizer.encode(text)][-(window - max_new_tokens):]


def generation_prompts(task: Task, tokenizer: Tokenizer, window: int, max_new_tokens: int) -> list[list[int]]:
    """Each item's prompt ids, cut from the left to leave room for ``max_new_tokens``."""
    return [prompt_ids(item.prompt, tokenizer, window, max_new_tokens) for item in task.items_of(GenerationItem)]


def rolling_requests(ids: Sequence[int], eod_id: int, window: int) -> list[Request]:
    """A text's ids, each scored once: windows of up to ``window`` scored tokens, each after as
    many of the tokens before it as fit (the eod first), so the last window has full context too
    (lm-evaluation-harness's rolling windows)."""
    sequence = [eod_id, *ids]
    return [Request(tuple(sequence[max(0, end - window):end + 1]), end - start)
            for start in range(0, len(ids), window) for end in [min(start + window, len(ids))]]


def text_loglikelihoods(texts: Sequence[str], tokenizer: Tokenizer, backend: Backend, window: int,
                        desc: str) -> list[float]:
    """Each text's log-likelihood after the eod: the sum over its rolling windows, in order."""
    per_text = [rolling_requests(tokenizer.encode(text), tokenizer.eod_id, window) for text in texts]
    values = iter(backend.loglikelihoods([request for requests in per_text for request in requests], desc))
    return [sum(next(values) for _ in requests) for requests in per_text]


def perplexity_metrics(texts: Sequence[str], logliks: Sequence[float]) -> dict[str, float]:
    """The harness's word_perplexity, byte_perplexity and bits_per_byte: the log-likelihood summed
    over all texts, per word (whitespace-separated pieces, as the harness counts them) or per
    UTF-8 byte."""
    total = sum(logliks)
    words = sum(len(re.split(r"\s+", text)) for text in texts)
    nbytes = sum(len(text.encode("utf-8")) for text in texts)
    return {"word_perplexity": math.exp(-total / words), "byte_perplexity": math.exp(-total / nbytes),
            "bits_per_byte": -total / nbytes / math.log(2)}


def pack(requests: Sequence[Request], rows: int, length: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """Model inputs [rows, length] (right-padded with ``pad_id``; rows past the requests are all
    padding) and labels holding the continuation tokens and IGNORE_INDEX elsewhere. Right
    padding leaves every real position's causal context as it is."""
    tokens = torch.full((rows, length), pad_id, dtype=torch.long)
    labels = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)
    for row, request in enumerate(requests):
        ids = torch.tensor(request.tokens)
        n = len(ids) - 1
        tokens[row, :n] = ids[:-1]
        labels[row, n - request.scored:n] = ids[-request.scored:]
    return tokens, labels


def sequence_logprobs(hidden: Tensor, head_weight: Tensor, labels: Tensor) -> Tensor:
    """Per row of ``labels`` [b, s], the summed log-probabilities of its labelled tokens (fp64),
    from the final-normed hidden states [b, s, H] — a chunk of logits at a time, as the loss."""
    token_losses = ChunkedCrossEntropy.apply(hidden.flatten(0, -2), head_weight, labels.flatten(),
                                             compute_dtype(hidden), chunk_tokens(head_weight.shape[0]))
    return -token_losses.view(labels.shape).double().sum(dim=1)


def greedy_rows(hidden: Tensor, head_weight: Tensor, labels: Tensor, vocab_size: int) -> Tensor:
    """Per row of ``labels`` [b, s], whether each labelled token is the argmax among the
    tokenizer's ``vocab_size`` ids (what greedy decoding would choose); logits only at those positions."""
    rows, positions = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
    chosen = F.linear(hidden[rows, positions], head_weight[:vocab_size]).argmax(dim=-1)
    misses = torch.zeros(labels.shape[0], dtype=torch.long, device=labels.device)
    return misses.index_add_(0, rows, (chosen != labels[rows, positions]).long()) == 0


def completion(ids: Sequence[int], tokenizer: Tokenizer, until: Sequence[str], max_new_tokens: int) -> str:
    """The text a greedy continuation is judged on: its first ``max_new_tokens`` ids up to the
    eod, decoded, cut before the first of the stop strings ``until``."""
    ids = list(ids[:max_new_tokens])
    text = tokenizer.decode(ids[:ids.index(tokenizer.eod_id)] if tokenizer.eod_id in ids else ids)
    return text[:min((text.find(stop) for stop in until if stop in text), default=len(text))]


def choice_metrics(items: Sequence[ChoiceItem], logliks: Sequence[float]) -> dict[str, float]:
    """acc and acc_norm over the items, from the log-likelihoods of all their choices, in order."""
    correct = {"acc": 0, "acc_norm": 0}
    start = 0
    for item in items:
        scores = logliks[start:start + len(item.choices)]
        start += len(item.choices)
        normed = [score / len(choice) for score, choice in zip(scores, item.choices)]
        correct["acc"] += _argmax(scores) == item.answer
        correct["acc_norm"] += _argmax(normed) == item.answer
    return {metric: count / len(items) for metric, count in correct.items()}


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first of equal values


def check_room(name: str, max_new_tokens: int, window: int, change: str) -> None:
    """TaskError unless ``max_new_tokens`` leave a ``window``-token sequence room for a prompt;
    ``change`` names what to lower (a flag, a config key, the task file's own values)."""
    if max_new_tokens >= window:
        raise TaskError(f"{name}: {max_new_tokens} new tokens leave no room for a prompt in a {window}-token "
                        f"sequence (train.seq_len); lower {change} below {window}")


def new_tokens(task: Task, max_new_tokens: int, window: int, setting: str) -> list[int]:
    """Each generation item's budget: its own ``max_new_tokens``, else the default
    ``max_new_tokens`` (from ``setting``: the flag or config key that sets it, named when it must
    change); all must leave a ``window``-token sequence room for a prompt."""
    items = task.items_of(GenerationItem)
    budgets = [item.max_new_tokens or max_new_tokens for item in items]
    own = max(item.max_new_tokens or 0 for item in items) == max(budgets)
    check_room(task.name, max(budgets), window, 'the items\' own "max_new_tokens" in the task file' if own else setting)
    return budgets


def evaluate_task(task: Task, tokenizer: Tokenizer, backend: Backend, window: int,
                  max_new_tokens: int, setting: str) -> dict[str, float]:
    """The task's metrics: {"acc", "acc_norm"}, {"exact_match"} or the perplexities. Generation
    items without their own ``max_new_tokens`` get ``max_new_tokens`` (set by ``setting``, a flag
    or config key); the batch decodes to the largest."""
    if task.kind == MULTIPLE_CHOICE:
        return choice_metrics(task.items_of(ChoiceItem),
                              backend.loglikelihoods(choice_requests(task, tokenizer, window), task.name))
    if task.kind == GENERATION:
        budgets = new_tokens(task, max_new_tokens, window, setting)
        outputs = backend.greedy(generation_prompts(task, tokenizer, window, max(budgets)), max(budgets), task.name)
        correct = sum(item.is_correct(completion(ids, tokenizer, item.until, budget))
                      for item, ids, budget in zip(task.items_of(GenerationItem), outputs, budgets))
        return {"exact_match": correct / len(task.items)}
    texts = [item.text for item in task.items_of(TextItem)]
    return perplexity_metrics(texts, text_loglikelihoods(texts, tokenizer, backend, window, task.name))
