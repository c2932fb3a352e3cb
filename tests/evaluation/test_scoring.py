"""From items to requests and rows, log-likelihoods from hidden states, completions, metrics."""

from __future__ import annotations

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
    pack,
    sequence_logprobs,
)
from megamoe.evaluation.tasks import GENERATION, MULTIPLE_CHOICE, ChoiceItem, GenerationItem, Task
from megamoe.nn.loss import IGNORE_INDEX

TOKENIZER = ByteTokenizer()
EOD = TOKENIZER.eod_id


def test_choice_requests_start_at_a_document_boundary_and_keep_the_choice_whole() -> None:
    task = Task("t", MULTIPLE_CHOICE, (ChoiceItem("abcdef", (" x", " yz"), 0),))
    assert choice_requests(task, TOKENIZER, window=64) == [
        Request((EOD, *b"abcdef x"), 2), Request((EOD, *b"abcdef yz"), 3)]
    cut = choice_requests(task, TOKENIZER, window=5)  # 5 inputs + the last label: the context loses its start
    assert cut == [Request(tuple(b"cdef x"), 2), Request(tuple(b"def yz"), 3)]
    with pytest.raises(TaskError, match="t: item 0: a choice of 3 tokens does not fit a 2-token sequence"):
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
    item = GenerationItem("p", "1", until=(".", "\n"))
    assert completion([*b" 56. 7", EOD], TOKENIZER, item, 8) == " 56"
    assert completion([*b" 5\n6.", EOD], TOKENIZER, item, 8) == " 5"
    assert completion([*b" 56", EOD, *b"7"], TOKENIZER, item, 8) == " 56"
    assert completion(list(b" 5678"), TOKENIZER, item, 3) == " 56"


def test_acc_norm_divides_by_the_choice_length_in_characters() -> None:
    items = [ChoiceItem("c", ("短短", " ab"), 1), ChoiceItem("c", (" a", " b"), 0)]
    logliks = [-1.0, -1.2, -1.0, -3.0]  # item 0 per character: -0.5 and -0.4 (per UTF-8 byte: -0.17, -0.4)
    assert choice_metrics(items, logliks) == {"acc": 0.5, "acc_norm": 1.0}


class Oracle:
    """A backend that knows the answers: the right choice is likely, the answer is generated."""

    def __init__(self, task: Task) -> None:
        self.task = task

    def loglikelihoods(self, requests: Sequence[Request], desc: str) -> list[float]:
        rights = [i * len(item.choices) + item.answer for i, item in enumerate(self.task.items)]
        return [-1.0 if index in rights else -5.0 for index in range(len(requests))]

    def greedy(self, prompts: Sequence[list[int]], max_new_tokens: int, desc: str) -> list[list[int]]:
        return [TOKENIZER.encode(f" {item.answer}.")[:max_new_tokens] for item in self.task.items]


def test_evaluate_task_scores_both_kinds() -> None:
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
