"""The built-in tasks ask what the demo corpus states: every right answer appears in a corpus made
with the demo's seed, worded as the item asks it, and every wrong one does not."""

from __future__ import annotations

import json
from typing import Callable

import pytest

from data_tools.make_demo_corpus import make_corpus
from megamoe.evaluation.demo import CORPUS_SEED, demo_en, demo_math, demo_zh
from megamoe.evaluation.tasks import GENERATION, MULTIPLE_CHOICE, Task


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("corpus")
    make_corpus(str(out), size_mb=0.3, seed=CORPUS_SEED)
    return {lang: "\n".join(json.loads(line)["text"] for line in (out / f"{lang}.jsonl").read_text().splitlines())
            for lang in ("zh", "en")}


@pytest.mark.parametrize(("make", "lang"), [(demo_en, "en"), (demo_zh, "zh")])
def test_fact_items_are_the_corpus_facts(corpus: dict[str, str], make: Callable[[], Task], lang: str) -> None:
    task = make()
    assert task.kind == MULTIPLE_CHOICE and len(task.items) == 48
    assert {len(item.choices) for item in task.items} == {8}
    for item in task.items:
        right = item.context + item.choices[item.answer]
        assert right in corpus[lang], right
        wrong = [item.context + choice for i, choice in enumerate(item.choices) if i != item.answer]
        assert not any(w + end in corpus[lang] for w in wrong for end in ".,。，"), item.context  # a whole word


def test_math_items_are_true_products_as_the_corpus_writes_them(corpus: dict[str, str]) -> None:
    task = demo_math()
    assert task.kind == GENERATION and len(task.items) == 144
    for item in task.items:
        a, _, b, _ = item.prompt.split()
        assert int(item.answer) == int(a) * int(b) and item.until == (".",)
    assert sum(item.prompt + " " + item.answer + "." in corpus["en"] for item in task.items) > 100


def test_builtin_tasks_are_deterministic() -> None:
    assert demo_en() == demo_en() and demo_zh() == demo_zh() and demo_math() == demo_math()
    assert demo_math().items[0] != demo_math().items[1]
