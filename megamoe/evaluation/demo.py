"""Built-in tasks about the world of the demo corpus (megamoe.data.demo_world, written out by
data_tools/make_demo_corpus.py), made on the fly.

The corpus states fixed facts — each person's home, job and breakfast — and true products, so
a model trained by ``make demo`` should beat chance on them; the tasks need no file and are the
same on every machine:

- ``demo-en``: "Alice lives in" → " Paris" among the 8 cities, the job among 8, the breakfast
  among 8, for the 16 English people (48 items, chance 1/8);
- ``demo-zh``: the same about the 16 Chinese people ("小明住在" → "北京");
- ``demo-math``: "7 times 8 is" → "56", the 144 products up to 12 × 12 (greedy generation,
  last-number exact match).
"""

from __future__ import annotations

import random
from typing import Sequence

from megamoe.data.demo_world import (
    EN_CITIES,
    EN_FOODS,
    EN_JOBS,
    ZH_CITIES,
    ZH_FOODS,
    ZH_JOBS,
    Person,
    demo_people,
)
from megamoe.evaluation.tasks import GENERATION, MULTIPLE_CHOICE, ChoiceItem, GenerationItem, Task

CORPUS_SEED = 0  # launch/demo.py writes the corpus with make_demo_corpus's default seed

# (question, the options, the Person field that answers it), as the corpus words the fact.
Question = tuple[str, Sequence[str], str]
EN_QUESTIONS: list[Question] = [("{} lives in", EN_CITIES, "city"), ("{} works as a", EN_JOBS, "job"),
                                ("For breakfast {} eats", EN_FOODS, "food")]
ZH_QUESTIONS: list[Question] = [("{}住在", ZH_CITIES, "city"), ("{}是一名", ZH_JOBS, "job"),
                                ("{}每天早上吃", ZH_FOODS, "food")]


def fact_task(name: str, people: Sequence[Person], questions: Sequence[Question], space: str) -> Task:
    """One multiple-choice item per person and question, person by person (so the first items of
    a limited run ask every question)."""
    items = tuple(ChoiceItem(question.format(person.name), tuple(space + option for option in options),
                             list(options).index(getattr(person, field)))
                  for person in people for question, options, field in questions)
    return Task(name, MULTIPLE_CHOICE, items)


def demo_en() -> Task:
    return fact_task("demo-en", demo_people(CORPUS_SEED)[0], EN_QUESTIONS, " ")


def demo_zh() -> Task:
    return fact_task("demo-zh", demo_people(CORPUS_SEED)[1], ZH_QUESTIONS, "")


def demo_math() -> Task:
    """The corpus writes "{a} times {b} is {a·b}." with 1 ≤ a, b ≤ 12; in a fixed shuffled order."""
    pairs = [(a, b) for a in range(1, 13) for b in range(1, 13)]
    random.Random("demo-math").shuffle(pairs)
    items = tuple(GenerationItem(f"{a} times {b} is", str(a * b), until=(".",), max_new_tokens=8) for a, b in pairs)
    return Task("demo-math", GENERATION, items)

