"""Scoring: what a task's items become (token sequences), what the model is asked, and the metrics.

Multiple choice (as lm-evaluation-harness's ``acc`` / ``acc_norm``): each choice's
log-likelihood is the sum of its tokens' log-probabilities after the context; ``acc`` picks the
largest, ``acc_norm`` the largest per character of the choice (``len(choice)`` in Unicode
characters, lm-evaluation-harness's normalisation), which removes the bias towards short answers.
Generation: greedy decoding, the completion cut before the first stop string, then exact match.

Every sequence starts with the end-of-document token — what precedes each document in
training — and is cut from the left to the run's training length (``window``). Context and
continuation are tokenized separately, so a choice's tokens are the same after any context.
The model side is a :class:`Backend`: one process (megamoe.evaluation.model), or the training
run's pipeline stages (megamoe.train.downstream); both feed the same helpers, so they agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from torch import Tensor

from megamoe.data.tokenizer import Tokenizer
from megamoe.errors import TaskError
from megamoe.evaluation.tasks import MULTIPLE_CHOICE, ChoiceItem, GenerationItem, Task
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


def choice_requests(task: Task, tokenizer: Tokenizer, window: int) -> list[Request]:
    """One request per (item, choice), item by item."""
    requests = []
    for index, item in enumerate(task.items):
        context = [tokenizer.eod_id, *tokenizer.encode(item.context)]
        for choice in item.choices:
            continuation = tokenizer.encode(choice)
            if not 0 < len(continuation) <= window:
                raise TaskError(f"{task.name}: item {index}: a choice of {len(continuation)} tokens does not fit a "
                                f"{window}-token sequence; every choice needs 1 to {window} tokens")
            requests.append(Request(tuple((context + continuation)[-(window + 1):]), len(continuation)))
    return requests


def generation_prompts(task: Task, tokenizer: Tokenizer, window: int, max_new_tokens: int) -> list[list[int]]:
    """Each item's prompt ids, cut from the left to leave room for ``max_new_tokens``."""
    return [[tokenizer.eod_id, *tokenizer.encode(item.prompt)][-(window - max_new_tokens):] for item in task.items]


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


def completion(ids: Sequence[int], tokenizer: Tokenizer, item: GenerationItem, max_new_tokens: int) -> str:
    """The text an item is judged on: its first ``max_new_tokens`` ids up to the eod, decoded, cut
    before the first stop string."""
    ids = list(ids[:max_new_tokens])
    text = tokenizer.decode(ids[:ids.index(tokenizer.eod_id)] if tokenizer.eod_id in ids else ids)
    return text[:min((text.find(stop) for stop in item.until if stop in text), default=len(text))]


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


def new_tokens(task: Task, max_new_tokens: int, window: int, setting: str) -> list[int]:
    """Each generation item's budget: its own ``max_new_tokens``, else the default
    ``max_new_tokens`` (from ``setting``: the flag or config key that sets it, named when it must
    change); all must leave a ``window``-token sequence room for a prompt."""
    budgets = [item.max_new_tokens or max_new_tokens for item in task.items]
    if max(budgets) >= window:
        own = max(item.max_new_tokens or 0 for item in task.items) == max(budgets)
        change = 'the items\' own "max_new_tokens" in the task file' if own else setting
        raise TaskError(f"{task.name}: {max(budgets)} new tokens leave no room for a prompt in a {window}-token "
                        f"sequence (train.seq_len); lower {change} below {window}")
    return budgets


def evaluate_task(task: Task, tokenizer: Tokenizer, backend: Backend, window: int,
                  max_new_tokens: int, setting: str) -> dict[str, float]:
    """The task's metrics: {"acc", "acc_norm"} or {"exact_match"}. Generation items without
    their own ``max_new_tokens`` get ``max_new_tokens`` (set by ``setting``, a flag or config key);
    the batch decodes to the largest."""
    if task.kind == MULTIPLE_CHOICE:
        return choice_metrics(task.items, backend.loglikelihoods(choice_requests(task, tokenizer, window), task.name))
    budgets = new_tokens(task, max_new_tokens, window, setting)
    outputs = backend.greedy(generation_prompts(task, tokenizer, window, max(budgets)), max(budgets), task.name)
    correct = sum(item.is_correct(completion(ids, tokenizer, item, budget))
                  for item, ids, budget in zip(task.items, outputs, budgets))
    return {"exact_match": correct / len(task.items)}
