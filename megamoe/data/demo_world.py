"""The world of the demo corpus: people with a fixed home, job and breakfast.

data_tools/make_demo_corpus.py writes documents that state these facts, and the built-in
evaluation tasks (megamoe.evaluation.demo) ask about the same people, so a model trained by
``make demo`` can be seen to have learned them. Plain Python (the data tools import no torch).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

EN_NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry",
            "Iris", "Jack", "Kate", "Leo", "Mia", "Noah", "Olivia", "Peter"]
EN_CITIES = ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Cairo", "Lima"]
EN_JOBS = ["doctor", "teacher", "farmer", "driver", "cook", "nurse", "pilot", "writer"]
EN_FOODS = ["bread", "rice", "apples", "soup", "noodles", "eggs", "cheese", "fish"]
ZH_NAMES = ["小明", "小红", "小刚", "小丽", "老王", "老李", "张伟", "王芳",
            "李娜", "刘洋", "陈静", "杨帆", "赵磊", "孙悦", "周杰", "吴敏"]
ZH_CITIES = ["北京", "上海", "广州", "深圳", "杭州", "成都", "武汉", "西安"]
ZH_JOBS = ["老师", "医生", "工人", "农民", "司机", "厨师", "护士", "作家"]
ZH_FOODS = ["米饭", "面条", "饺子", "包子", "苹果", "鸡蛋", "豆腐", "青菜"]


@dataclass(frozen=True)
class Person:
    """A fixed fact sheet: the same name always has the same home, job and food."""

    name: str
    city: str
    job: str
    food: str


def make_people(rng: random.Random, names: list[str], cities: list[str], jobs: list[str],
                foods: list[str]) -> list[Person]:
    return [Person(n, rng.choice(cities), rng.choice(jobs), rng.choice(foods)) for n in names]


def demo_people(seed: int) -> tuple[list[Person], list[Person]]:
    """The English and the Chinese people of the world ``seed`` draws (the built-in evaluation
    tasks, megamoe.evaluation.demo, ask about the same people)."""
    world = random.Random(seed)
    return (make_people(world, EN_NAMES, EN_CITIES, EN_JOBS, EN_FOODS),
            make_people(world, ZH_NAMES, ZH_CITIES, ZH_JOBS, ZH_FOODS))
