"""Evaluation tasks: local jsonl files in one documented format (docs/evaluation.md), or built-in.

A task file holds one JSON object per line, all of one kind:

- multiple choice: ``{"context": str, "choices": [str, ...], "answer": int}`` — ``answer`` is the
  0-based index of the right choice; each choice is appended to the context verbatim, so it
  carries its own leading space where the language puts one (" Paris", but "北京");
- generation: ``{"prompt": str, "answer": str | number}`` plus optional ``"until"`` (stop
  strings, default ``["\\n\\n"]``), ``"max_new_tokens"`` and ``"match"`` (``"number"``: the last
  number of the completion equals the answer's last number, GSM8K style, the default; or
  ``"exact"``: the stripped texts are equal);
- perplexity: ``{"text": str}`` — every token of the text scored (word / byte perplexity, bits
  per byte, as lm-evaluation-harness's rolling log-likelihood tasks); never few-shot.

Other fields (an id, a subject) are ignored. A task is named by a built-in name, a ``.jsonl``
file (the task is its stem) or a directory (each ``*.jsonl`` in it is a task ``DIR/STEM``). Every
mistake in a file is one :class:`TaskError` line naming the file, the line and the fix.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar, Union

from megamoe.errors import TaskError

MULTIPLE_CHOICE, GENERATION, PERPLEXITY = "multiple_choice", "generation", "perplexity"
FEWSHOT_SEPARATOR = "\n\n"  # between solved examples and before the item (lm-evaluation-harness's default)
DEFAULT_UNTIL = ("\n\n",)
MATCHES = ("number", "exact")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class ChoiceItem:
    context: str
    choices: tuple[str, ...]
    answer: int  # index into choices

    def solved(self) -> str:
        """The item with its right answer: a few-shot example."""
        return self.context + self.choices[self.answer]

    def with_prefix(self, prefix: str) -> "ChoiceItem":
        return replace(self, context=prefix + self.context)


@dataclass(frozen=True)
class GenerationItem:
    prompt: str
    answer: str
    until: tuple[str, ...] = DEFAULT_UNTIL  # the completion ends before the first of these
    max_new_tokens: Optional[int] = None  # None: the run's default
    match: str = "number"  # "number" | "exact"

    def solved(self) -> str:
        return self.prompt + self.answer

    def with_prefix(self, prefix: str) -> "GenerationItem":
        return replace(self, prompt=prefix + self.prompt)

    def is_correct(self, completion: str) -> bool:
        """Exact match: of the last numbers (GSM8K style), or of the stripped texts."""
        if self.match == "exact":
            return completion.strip() == self.answer.strip()
        got = last_number(completion)
        return got is not None and got == last_number(self.answer)


@dataclass(frozen=True)
class TextItem:
    text: str  # scored whole


Item = Union[ChoiceItem, GenerationItem, TextItem]
SolvableItem = Union[ChoiceItem, GenerationItem]  # the kinds that make few-shot examples
ItemT = TypeVar("ItemT", ChoiceItem, GenerationItem, TextItem)


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # MULTIPLE_CHOICE | GENERATION | PERPLEXITY
    items: tuple[Item, ...]

    def items_of(self, cls: type[ItemT]) -> tuple[ItemT, ...]:
        """The items, as the one kind of item the task holds (``cls``, which its ``kind`` tells)."""
        items = tuple(item for item in self.items if isinstance(item, cls))
        assert len(items) == len(self.items), f"{self.name}: a {self.kind} task holds other items than {cls.__name__}"
        return items


def last_number(text: str) -> Optional[Decimal]:
    """The last number written in ``text`` ("1,234.50" → 1234.50, so "72" equals "72.0"); None if none."""
    numbers = _NUMBER.findall(text)
    return Decimal(numbers[-1].replace(",", "")) if numbers else None


# ---- reading files ---------------------------------------------------------------------------

MC_FORMAT = '{"context": str, "choices": [str, ...], "answer": index of the right choice}'
GEN_FORMAT = '{"prompt": str, "answer": str, optional "until": [str], "max_new_tokens": int, "match": "number"|"exact"}'
TEXT_FORMAT = '{"text": str}'


def _field(record: dict[str, Any], key: str, ok: Callable[[Any], bool], want: str, where: str, fmt: str) -> Any:
    if key not in record:
        raise TaskError(f"{where}: no \"{key}\"; an item of this task is {fmt}")
    value = record[key]
    if not ok(value):
        raise TaskError(f"{where}: \"{key}\" is {json.dumps(value, ensure_ascii=False)[:60]}; it must be {want}")
    return value


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(v, str) for v in value)


def _choice_item(record: dict[str, Any], where: str) -> ChoiceItem:
    context = _field(record, "context", lambda v: isinstance(v, str), "a string", where, MC_FORMAT)
    choices = _field(record, "choices", lambda v: _is_str_list(v) and len(v) >= 2 and all(v),
                     "a list of two or more non-empty strings", where, MC_FORMAT)
    answer = _field(record, "answer", lambda v: type(v) is int and 0 <= v < len(choices),
                    f"the 0-based index of the right choice (0 to {len(choices) - 1})", where, MC_FORMAT)
    return ChoiceItem(context, tuple(choices), answer)


def _generation_item(record: dict[str, Any], where: str) -> GenerationItem:
    prompt = _field(record, "prompt", lambda v: isinstance(v, str), "a string", where, GEN_FORMAT)
    answer = _field(record, "answer", lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool),
                    "a string or a number", where, GEN_FORMAT)
    item = GenerationItem(prompt, str(answer))
    if "until" in record:
        item = replace(item, until=tuple(_field(record, "until", lambda v: _is_str_list(v) and all(v),
                                                "a list of non-empty stop strings", where, GEN_FORMAT)))
    if "max_new_tokens" in record:
        item = replace(item, max_new_tokens=_field(record, "max_new_tokens", lambda v: type(v) is int and v > 0,
                                                   "a positive integer", where, GEN_FORMAT))
    if "match" in record:
        item = replace(item, match=_field(record, "match", lambda v: v in MATCHES, '"number" or "exact"', where,
                                          GEN_FORMAT))
    if item.match == "number" and last_number(item.answer) is None:
        raise TaskError(f"{where}: \"answer\" has no number to match; add \"match\": \"exact\" to compare whole texts")
    return item


def _text_item(record: dict[str, Any], where: str) -> TextItem:
    return TextItem(_field(record, "text", lambda v: isinstance(v, str) and v != "", "a non-empty string", where,
                           TEXT_FORMAT))


KINDS: dict[str, tuple[str, Callable[[dict[str, Any], str], Item]]] = {  # the field that tells a kind, its reader
    MULTIPLE_CHOICE: ("choices", _choice_item),
    GENERATION: ("prompt", _generation_item),
    PERPLEXITY: ("text", _text_item),
}


def read_task_file(path: Path, name: Optional[str] = None) -> Task:
    """The task in ``path`` (named ``name``, default the file's stem)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError(f"{path}: cannot read it ({exc}); a task file is UTF-8 jsonl") from None
    kind, items = None, []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise TaskError(f"{where}: not a JSON object ({exc}); write one item per line") from None
        if not isinstance(record, dict):
            raise TaskError(f"{where}: not a JSON object; write one item per line, e.g. {MC_FORMAT}")
        line_kind = next((kind for kind, (key, _) in KINDS.items() if key in record), None)
        if line_kind is None:
            raise TaskError(f"{where}: none of \"choices\" (multiple choice: {MC_FORMAT}), \"prompt\" "
                            f"(generation: {GEN_FORMAT}) or \"text\" (perplexity: {TEXT_FORMAT})")
        if kind is not None and line_kind != kind:
            raise TaskError(f"{where}: a {line_kind} item in a {kind} task (see its first item); one kind per file")
        kind = line_kind
        items.append(KINDS[kind][1](record, where))
    if kind is None:
        raise TaskError(f"{path}: no items; write one JSON object per line, e.g. {MC_FORMAT}")
    return Task(name or path.stem, kind, tuple(items))


# ---- what is scored -------------------------------------------------------------------------


def prepare(task: Task, limit: Optional[int], fewshot: int, seed: int) -> Task:
    """The first ``limit`` items (all if None), each after ``fewshot`` solved examples drawn from
    the task's other items (by ``seed`` and the item's index, so an item's prompt does not depend
    on ``limit``). Perplexity texts are scored alone: ``fewshot`` does not apply to them."""
    if task.kind == PERPLEXITY:
        return replace(task, items=task.items[:limit])
    if fewshot >= len(task.items):
        raise TaskError(f"{task.name}: {fewshot} few-shot examples need more than the task's {len(task.items)} "
                        "items; use fewer")
    items = task.items[:limit]
    if fewshot:
        items = tuple(_solvable(item).with_prefix(_examples(task.items, index, fewshot, seed))
                      for index, item in enumerate(items))
    return replace(task, items=items)


def _solvable(item: Item) -> SolvableItem:
    assert not isinstance(item, TextItem), "perplexity texts are scored alone, without few-shot examples"
    return item


def _examples(items: Sequence[Item], index: int, count: int, seed: int) -> str:
    drawn = random.Random(f"{seed}:{index}").sample(range(len(items) - 1), count)  # among the others:
    # skip the item itself
    return "".join(_solvable(items[i + (i >= index)]).solved() + FEWSHOT_SEPARATOR for i in drawn)
