"""Write a small bilingual demo corpus (Chinese, English, code) from templates: no download.

The text comes from tiny grammars over a fixed world — people with fixed homes, jobs and foods,
weekdays that follow each other, true arithmetic, code whose comments match what it does — so
a tiny model can learn real structure and its loss falls well below the unigram entropy within
a few hundred steps. The same seed gives the same bytes on every machine (Python's ``random``
is stable across versions for the calls used here).

    python -m data_tools.make_demo_corpus --output-dir demo_data/raw --size-mb 4

Writes ``zh.jsonl``, ``en.jsonl``, ``code.jsonl`` (one ``{"text": ...}`` per line) and
``stats.json`` with the byte-level unigram entropy that training loss is compared against.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from megamoe.cli import exit_on_user_error
from megamoe.data.demo_world import (
    Person,
    demo_people,
)
from megamoe.errors import UserError

# Share of the corpus bytes written to each file.
SHARES = {"zh": 0.4, "en": 0.4, "code": 0.2}
BYTES_PER_MB = 1_000_000

EN_ADJS = ["red", "small", "old", "new", "heavy", "blue", "round", "green"]
EN_THINGS = ["book", "ball", "cup", "box", "chair", "lamp", "bag", "key"]
EN_PLACES = ["kitchen", "garden", "school", "park", "library", "station", "market", "office"]
EN_VERBS = [("finds", "find"), ("carries", "carry"), ("washes", "wash"), ("paints", "paint"),
            ("opens", "open"), ("moves", "move"), ("cleans", "clean"), ("sells", "sell")]
EN_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
EN_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
            "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
            "seventeen", "eighteen", "nineteen"]
EN_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

ZH_DRINKS = ["茶", "水", "牛奶", "咖啡"]
ZH_PLACES = ["学校", "公园", "商店", "医院", "图书馆", "家里", "饭店", "车站"]
ZH_THINGS = [("本", "书"), ("个", "杯子"), ("把", "椅子"), ("只", "猫"), ("条", "鱼"), ("张", "桌子")]
ZH_DAYS = ["一", "二", "三", "四", "五", "六", "日"]
ZH_DIGITS = "零一二三四五六七八九"

CODE_FIELDS = ["name", "size", "color", "price", "count", "owner", "speed", "level"]
CODE_CLASSES = ["Box", "Car", "Book", "Shop", "Tree", "Robot", "Plane", "Lamp"]


def en_number(n: int) -> str:
    """English words for 0 ≤ n < 100."""
    if n < 20:
        return EN_UNITS[n]
    tens, unit = divmod(n, 10)
    return EN_TENS[tens] + ("" if unit == 0 else "-" + EN_UNITS[unit])


def zh_number(n: int) -> str:
    """Chinese numerals for 0 ≤ n < 100 (十二, 二十, 三十五)."""
    if n < 10:
        return ZH_DIGITS[n]
    tens, unit = divmod(n, 10)
    return ("" if tens == 1 else ZH_DIGITS[tens]) + "十" + ("" if unit == 0 else ZH_DIGITS[unit])


def en_document(rng: random.Random, people: list[Person]) -> str:
    """A short story about one person: fixed facts, agreeing verbs, weekdays in order, sums."""
    p, friend = rng.sample(people, 2)
    sentences = [f"{p.name} lives in {p.city}.", f"{p.name} works as a {p.job}."]
    day = rng.randrange(7)
    for _ in range(rng.randint(3, 8)):
        kind = rng.randrange(5)
        verb_s, verb = rng.choice(EN_VERBS)
        thing = f"the {rng.choice(EN_ADJS)} {rng.choice(EN_THINGS)}"
        if kind == 0:
            sentences.append(f"On {EN_DAYS[day]}, {p.name} {verb_s} {thing} in the {rng.choice(EN_PLACES)}.")
            day = (day + 1) % 7
        elif kind == 1:
            sentences.append(f"{p.name} and {friend.name} {verb} {thing} together.")
        elif kind == 2:
            sentences.append(f"For breakfast {p.name} eats {p.food}, but {friend.name} eats {friend.food}.")
        elif kind == 3:
            a, b = rng.randrange(50), rng.randrange(50)
            sentences.append(f"{p.name} has {en_number(a)} coins and finds {en_number(b)} more, "
                             f"so now {p.name} has {en_number(a + b)} coins.")
        else:
            a, b = rng.randrange(1, 13), rng.randrange(1, 13)
            sentences.append(f"{a} times {b} is {a * b}.")
    return " ".join(sentences)


def zh_document(rng: random.Random, people: list[Person]) -> str:
    """The Chinese counterpart: fixed facts, measure words that match nouns, weekdays, sums."""
    p, friend = rng.sample(people, 2)
    sentences = [f"{p.name}住在{p.city}。", f"{p.name}是一名{p.job}。"]
    day = rng.randrange(7)
    for _ in range(rng.randint(3, 8)):
        kind = rng.randrange(5)
        if kind == 0:
            measure, thing = rng.choice(ZH_THINGS)
            n = rng.randrange(1, 10)
            sentences.append(f"星期{ZH_DAYS[day]}，{p.name}在{rng.choice(ZH_PLACES)}买了{zh_number(n)}{measure}{thing}。")
            day = (day + 1) % 7
        elif kind == 1:
            sentences.append(f"{p.name}和{friend.name}一起在{rng.choice(ZH_PLACES)}喝{rng.choice(ZH_DRINKS)}。")
        elif kind == 2:
            sentences.append(f"{p.name}每天早上吃{p.food}，{friend.name}每天早上吃{friend.food}。")
        elif kind == 3:
            a, b = rng.randrange(50), rng.randrange(50)
            sentences.append(f"{zh_number(a)}加{zh_number(b)}等于{zh_number(a + b)}。")
        else:
            a = rng.randrange(10, 99)
            b = rng.randrange(a + 1)
            sentences.append(f"{p.name}有{zh_number(a)}元，花了{zh_number(b)}元，还剩{zh_number(a - b)}元。")
    return "".join(sentences)


def code_document(rng: random.Random) -> str:
    """A few small Python definitions whose names, comments and asserts agree with the code."""
    parts = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(4)
        if kind == 0:
            k = rng.randrange(1, 20)
            parts.append(f"def add_{k}(x):\n    # 返回 x 加 {k}\n    return x + {k}\n\n"
                         f"assert add_{k}({k}) == {2 * k}\n")
        elif kind == 1:
            n = rng.randrange(2, 15)
            parts.append(f"def sum_below_{n}():\n    total = 0\n    for i in range({n}):\n"
                         f"        total += i\n    return total\n\nassert sum_below_{n}() == {n * (n - 1) // 2}\n")
        elif kind == 2:
            cls, field = rng.choice(CODE_CLASSES), rng.choice(CODE_FIELDS)
            parts.append(f"class {cls}:\n    \"\"\"A {cls.lower()} with a {field}.\"\"\"\n\n"
                         f"    def __init__(self, {field}):\n        self.{field} = {field}\n\n"
                         f"    def get_{field}(self):\n        return self.{field}\n")
        else:
            values = [rng.randrange(100) for _ in range(rng.randint(3, 7))]
            parts.append(f"values = {values}\nprint(max(values))  # {max(values)}\n"
                         f"print(min(values))  # {min(values)}\n")
    return "\n".join(parts)


@dataclass(frozen=True)
class FileStats:
    documents: int
    bytes: int
    unigram_entropy_bits: float  # per ByteTokenizer token: UTF-8 bytes plus one <eod> per document


def unigram_entropy_bits(counts: np.ndarray) -> float:
    """Entropy in bits of the empirical distribution ``counts``."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def write_jsonl(path: Path, make_doc: Callable[[], str], target_bytes: int) -> np.ndarray:
    """Write documents until the text reaches ``target_bytes``; returns byte counts (index 256 = eod)."""
    counts = np.zeros(257, dtype=np.int64)
    with open(path, "w", encoding="utf-8") as f:
        while counts[:256].sum() < target_bytes:
            text = make_doc()
            counts[:256] += np.bincount(np.frombuffer(text.encode("utf-8"), dtype=np.uint8), minlength=256)
            counts[256] += 1
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return counts


def make_corpus(output_dir: str, size_mb: float = 4.0, seed: int = 0) -> dict[str, FileStats]:
    """Write the corpus and stats.json; returns stats per file and for the whole corpus ("all")."""
    if size_mb <= 0:
        raise UserError(f"--size-mb must be positive, got {size_mb}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    en_people, zh_people = demo_people(seed)
    rngs = {name: random.Random(f"{seed}:{name}") for name in SHARES}
    makers: dict[str, Callable[[], str]] = {
        "zh": lambda: zh_document(rngs["zh"], zh_people),
        "en": lambda: en_document(rngs["en"], en_people),
        "code": lambda: code_document(rngs["code"]),
    }
    stats, total = {}, np.zeros(257, dtype=np.int64)
    for name, share in SHARES.items():
        counts = write_jsonl(out / f"{name}.jsonl", makers[name], math.ceil(share * size_mb * BYTES_PER_MB))
        total += counts
        stats[name] = FileStats(int(counts[256]), int(counts[:256].sum()), unigram_entropy_bits(counts))
    stats["all"] = FileStats(int(total[256]), int(total[:256].sum()), unigram_entropy_bits(total))
    (out / "stats.json").write_text(json.dumps({k: asdict(v) for k, v in stats.items()}, indent=2) + "\n")
    return stats


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="directory for zh.jsonl, en.jsonl, code.jsonl, stats.json")
    parser.add_argument("--size-mb", type=float, default=4.0, help="total text size in MB (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    stats = make_corpus(args.output_dir, args.size_mb, args.seed)
    print(f"demo corpus in {args.output_dir} (seed {args.seed})")
    for name, s in stats.items():
        label = "total" if name == "all" else f"{name}.jsonl"
        print(f"  {label:<11} {s.documents:>8,} docs {s.bytes / BYTES_PER_MB:>7.2f} MB  "
              f"unigram entropy {s.unigram_entropy_bits:.3f} bits/token "
              f"({s.unigram_entropy_bits * math.log(2):.3f} nats) under ByteTokenizer")


if __name__ == "__main__":
    main(sys.argv[1:])
