"""From items to requests and rows, log-likelihoods and greedy checks from hidden states, rolling
windows, completions, metrics."""

from __future__ import annotations

import math
from typing import Sequence

import pytest
import torch
import torch.nn.functional as F

from megamoe.data.tokenizer import ByteTokenizer
from megamoe.errors import TaskError
from megamoe.evaluation.scoring import (
    Request,
    choice_metrics,
    choice_requests,
    completion,
    evaluate_task,
    generation_prompts,
    greedy_rows,
    pack,
    perplexity_metrics,
    rolling_requests,
    sequence_logprobs,
)
from megamoe.evaluation.tasks import GENERATION, MULTIPLE_CHOICE, PERPLEXITY, ChoiceItem, GenerationItem, Task, TextItem
from megamoe.nn.loss import IGNORE_INDEX

TOKENIZER = ByteTokenizer()
EOD = TOKENIZER.eod_id


def test_choice_requests_start_at_a_document_boundary_and_keep_the_choice_whole() -> None:
    task = Task("t", MULTIPLE_CHOICE, (ChoiceItem("abcdef", (" x", " yz"), 0),))
    assert choice_requests(task, TOKENIZER, window=64) == [
        Request((EOD, *b"abcdef x"), 2), Request((EOD, *b"abcdef yz"), 3)]
    cut = choice_requests(task, TOKENIZER, window=5)  # 5 inputs + the last label: the context loses its start
    assert cut == [Request(tuple(b"cdef x"), 2), Request(tuple(b"def yz"), 3)]
    with pytest.raises(TaskError, match="t: item 0: a continuation of 3 tokens does not fit a 2-token sequence"):
        choice_requests(task, TOKENIZER, window=2)


def test_generation_prompts_leave_room_for_the_answer() -> None:
    task = Task("t", GENERATION, (GenerationItem("abcdef", "1"),))
    assert generation_prompts(task, TOKENIZER, window=64, max_new_tokens=8) == [[EOD, *b"abcdef"]]
    assert generation_prompts(task, TOKENIZER, window=8, max_new_tokens=4) == [list(b"cdef")]


def test_pack_right_pads_and_labels_only_the_continuation() -> None:
    tokens, labels = pack([Request((9, 1, 2, 3), 2), Request((9, 4), 1)], rows=3, length=5, pad_id=EOD)
    assert tokens.tolist() == [[9, 1, 2, EOD, EOD], [9, EOD, EOD, EOD, EOD], [EOD] * 5]
    ignore = IGNORE_INDEX
    assert labels.tolist() == [[ignore, 2, 3, ignore, ignore], [4, ignore, ignore, ignore, ignore], [ignore] * 5]


def test_sequence_logprobs_sum_the_labelled_tokens_log_softmax() -> None:
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 6, 8), torch.randn(40, 8)
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[0, 2:5] = torch.tensor([3, 7, 39])
    labels[1, 0] = 11
    logprobs = F.log_softmax(hidden @ weight.t(), dim=-1)
    expected = [logprobs[0, 2, 3] + logprobs[0, 3, 7] + logprobs[0, 4, 39], logprobs[1, 0, 11]]
    torch.testing.assert_close(sequence_logprobs(hidden, weight, labels), torch.stack(expected).double())


def test_completion_stops_at_eod_stop_string_and_budget() -> None:
    until = (".", "\n")
    assert completion([*b" 56. 7", EOD], TOKENIZER, until, 8) == " 56"
    assert completion([*b" 5\n6.", EOD], TOKENIZER, until, 8) == " 5"
    assert completion([*b" 56", EOD, *b"7"], TOKENIZER, until, 8) == " 56"
    assert completion(list(b" 5678"), TOKENIZER, until, 3) == " 56"


def test_greedy_rows_check_every_labelled_token_among_the_tokenizer_ids() -> None:
    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 5, 8), torch.randn(40, 8)
    argmax = (hidden @ weight[:30].t()).argmax(dim=-1)  # ids 30..39 are embedding padding: never greedy
    labels = torch.full((3, 5), IGNORE_INDEX)
    labels[0, 1:3] = argmax[0, 1:3]  # both greedy
    labels[1, 1:3] = argmax[1, 1:3]
    labels[1, 2] = (argmax[1, 2] + 1) % 30  # the second is not
    labels[2, 4] = argmax[2, 4]
    assert greedy_rows(hidden, weight, labels, vocab_size=30).tolist() == [True, False, True]


def test_rolling_windows_score_every_token_once_with_the_most_context() -> None:
    ids = list(range(10, 20))  # 10 tokens, windows of 4
    assert rolling_requests(ids, EOD, window=4) == [
        Request((EOD, 10, 11, 12, 13), 4),
        Request((13, 14, 15, 16, 17), 4),
        Request((15, 16, 17, 18, 19), 2),  # the last window keeps a full context
    ]
    assert rolling_requests(ids[:3], EOD, window=4) == [Request((EOD, 10, 11, 12), 3)]
    assert rolling_requests(ids[:4], EOD, window=4) == [Request((EOD, 10, 11, 12, 13), 4)]


def test_perplexities_are_the_harness_weighted_means() -> None:
    texts, logliks = ["two words", " a\tb  c ", "汉字"], [-3.0, -5.0, -2.5]
    words, nbytes = 2 + 5 + 1, 9 + 8 + 6  # the harness splits on whitespace runs: " a\tb  c " is '', a, b, c, ''
    assert perplexity_metrics(texts, logliks) == {
        "word_perplexity": math.exp(10.5 / words), "byte_perplexity": math.exp(10.5 / nbytes),
        "bits_per_byte": 10.5 / nbytes / math.log(2)}


def test_acc_norm_divides_by_the_choice_length_in_characters() -> None:
    items = [ChoiceItem("c", ("短短", " ab"), 1), ChoiceItem("c", (" a", " b"), 0)]
    logliks = [-1.0, -1.2, -1.0, -3.0]  # item 0 per character: -0.5 and -0.4 (per UTF-8 byte: -0.17, -0.4)
    assert choice_metrics(items, logliks) == {"acc": 0.5, "acc_norm": 1.0}


class Oracle:
    """A backend that knows the answers: the right choice is likely, the answer is generated; a
    scored token costs 0.5 nats."""

    def __init__(self, task: Task) -> None:
        self.task = task

    def loglikelihoods(self, requests: Sequence[Request], desc: str) -> list[float]:
        if self.task.kind == PERPLEXITY:
            return [-0.5 * request.scored for request in requests]
        rights = [i * len(item.choices) + item.answer for i, item in enumerate(self.task.items)]
        return [-1.0 if index in rights else -5.0 for index in range(len(requests))]

    def greedy(self, prompts: Sequence[list[int]], max_new_tokens: int, desc: str) -> list[list[int]]:
        return [TOKENIZER.encode(f" {item.answer}.")[:max_new_tokens] for item in self.task.items]


def test_evaluate_task_scores_the_three_kinds() -> None:
    mc = Task("mc", MULTIPLE_CHOICE, (ChoiceItem("q", (" a", " b", " c"), 2), ChoiceItem("q", (" a", " b"), 0)))
    assert evaluate_task(mc, TOKENIZER, Oracle(mc), window=32, max_new_tokens=4, setting="--max-new-tokens") == {
        "acc": 1.0, "acc_norm": 1.0}
    gen = Task("gen", GENERATION, (GenerationItem("q", "12"), GenerationItem("q", "345", max_new_tokens=2)))
    assert evaluate_task(gen, TOKENIZER, Oracle(gen), window=32, max_new_tokens=8, setting="--max-new-tokens") == {
        "exact_match": 0.5}
    with pytest.raises(TaskError, match=r"^gen: 32 new tokens leave no room for a prompt in a 32-token sequence "
                                        r"\(train.seq_len\); lower --max-new-tokens below 32$"):
        evaluate_task(gen, TOKENIZER, Oracle(gen), window=32, max_new_tokens=32, setting="--max-new-tokens")
    own = Task("gen", GENERATION, (GenerationItem("q", "12", max_new_tokens=40), GenerationItem("q", "3")))
    with pytest.raises(TaskError, match=r"40 new tokens .* lower the items' own \"max_new_tokens\" in the task file"):
        evaluate_task(own, TOKENIZER, Oracle(own), window=32, max_new_tokens=8, setting="--max-new-tokens")
    text = Task("text", PERPLEXITY, (TextItem("x" * 70), TextItem("two words")))  # 70 bytes: 3 windows of 32
    nats = 0.5 * (70 + 9)
    assert evaluate_task(text, TOKENIZER, Oracle(text), window=32, max_new_tokens=8, setting="--max-new-tokens") == \
        perplexity_metrics(["x" * 70, "two words"], [-0.5 * 70, -0.5 * 9]) == {
            "word_perplexity": math.exp(nats / 3), "byte_perplexity": math.exp(nats / 79),
            "bits_per_byte": nats / 79 / math.log(2)}
