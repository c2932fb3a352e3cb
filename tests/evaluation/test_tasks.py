"""Task files: the three kinds read with their optional fields, every mistake one line naming the file,
the line and the fix; task names; few-shot prompts; GSM8K-style number matching."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from megamoe.errors import TaskError
from megamoe.evaluation.resolve import load_tasks
from megamoe.evaluation.tasks import (
    GENERATION,
    MULTIPLE_CHOICE,
    PERPLEXITY,
    ChoiceItem,
    GenerationItem,
    Task,
    TextItem,
    last_number,
    prepare,
    read_task_file,
)

MC = {"context": "Question: 2 + 2 =", "choices": [" 3", " 4"], "answer": 1}
GEN = {"prompt": "Q: 6 * 7?\nA:", "answer": "6 * 7 = 42\n#### 42"}


def write(path: Path, *lines: object) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_reads_the_three_kinds_with_optional_fields(tmp_path: Path) -> None:
    mc = read_task_file(write(tmp_path / "arc.jsonl", MC, "", {**MC, "answer": 0, "id": "x-1"}))
    assert mc == Task("arc", MULTIPLE_CHOICE, (ChoiceItem("Question: 2 + 2 =", (" 3", " 4"), 1),
                                               ChoiceItem("Question: 2 + 2 =", (" 3", " 4"), 0)))
    gen = read_task_file(write(tmp_path / "gsm.jsonl", GEN, {"prompt": "p", "answer": 7, "until": ["\n"],
                                                              "max_new_tokens": 5, "match": "exact"}))
    assert gen.kind == GENERATION
    assert gen.items == (GenerationItem(GEN["prompt"], GEN["answer"]),
                         GenerationItem("p", "7", until=("\n",), max_new_tokens=5, match="exact"))
    text = read_task_file(write(tmp_path / "wiki.jsonl", {"text": "One.\n\nTwo.", "title": "x"}, {"text": "三"}))
    assert text == Task("wiki", PERPLEXITY, (TextItem("One.\n\nTwo."), TextItem("三")))


@pytest.mark.parametrize(("lines", "where", "message"), [
    (["{not json"], 1, "not a JSON object"),
    ([MC, "[1, 2]"], 2, "not a JSON object"),
    ([{"question": "q"}], 1, 'none of "choices" (multiple choice: {"context"'),
    ([{"text": ""}], 1, '"text" is ""; it must be a non-empty string'),
    ([{"text": "a"}, MC], 2, "a multiple_choice item in a perplexity task"),
    ([{k: v for k, v in MC.items() if k != "answer"}], 1, 'no "answer"; an item of this task is {"context"'),
    ([{**MC, "answer": 2}], 1, '"answer" is 2; it must be the 0-based index of the right choice (0 to 1)'),
    ([{**MC, "answer": True}], 1, '"answer" is true'),
    ([{**MC, "choices": [" 4"]}], 1, "a list of two or more non-empty strings"),
    ([{**MC, "choices": [" 4", ""]}], 1, "a list of two or more non-empty strings"),
    ([MC, GEN], 2, "a generation item in a multiple_choice task"),
    ([GEN, {**GEN, "answer": "forty-two"}], 2, 'add "match": "exact"'),
    ([{**GEN, "match": "fuzzy"}], 1, '"match" is "fuzzy"; it must be "number" or "exact"'),
    ([{**GEN, "until": "\n"}], 1, "a list of non-empty stop strings"),
    ([{**GEN, "until": []}], 1, "a list of non-empty stop strings"),
    ([{**GEN, "until": ["\n", ""]}], 1, '"until" is ["\\n", ""]; it must be a list of non-empty stop strings'),
    ([{**GEN, "max_new_tokens": 0}], 1, "a positive integer"),
])
def test_each_mistake_is_one_line_naming_file_and_line(tmp_path: Path, lines: list, where: int, message: str) -> None:
    path = write(tmp_path / "task.jsonl", *lines)
    with pytest.raises(TaskError) as error:
        read_task_file(path)
    assert str(error.value).startswith(f"{path}:{where}: ") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_empty_file_and_undecodable_file(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="no items"):
        read_task_file(write(tmp_path / "empty.jsonl", ""))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(TaskError, match="UTF-8 jsonl"):
        read_task_file(tmp_path / "latin1.jsonl")


def test_task_names_builtin_file_and_directory(tmp_path: Path) -> None:
    write(tmp_path / "single.jsonl", MC)
    (tmp_path / "mmlu").mkdir()
    for subject in ("physics", "anatomy"):
        write(tmp_path / "mmlu" / f"{subject}.jsonl", MC)
    tasks = load_tasks(["demo-en", str(tmp_path / "single.jsonl"), str(tmp_path / "mmlu")])
    assert [task.name for task in tasks] == ["demo-en", "single", "mmlu/anatomy", "mmlu/physics"]


def test_unknown_empty_directory_and_duplicate_names(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match=r"unknown task 'demo-fr': not a built-in task \(demo-zh, demo-en, demo-math\)"):
        load_tasks(["demo-fr"])
    (tmp_path / "none").mkdir()
    with pytest.raises(TaskError, match="no \\*.jsonl task files"):
        load_tasks([str(tmp_path / "none")])
    with pytest.raises(TaskError, match="'demo-en' is named twice"):
        load_tasks(["demo-en", "demo-en"])


def numbered(count: int) -> Task:
    return Task("t", GENERATION, tuple(GenerationItem(f"Q{i}:", f"A{i}", match="exact") for i in range(count)))


def test_fewshot_examples_are_other_items_drawn_by_seed() -> None:
    task = numbered(10)
    shots = prepare(task, limit=None, fewshot=3, seed=1)
    for index, item in enumerate(shots.items):
        examples = item.prompt.split("\n\n")
        assert len(examples) == 4 and examples[-1] == f"Q{index}:"
        assert f"Q{index}:A{index}" not in examples
        assert all(e in {f"Q{i}:A{i}" for i in range(10)} for e in examples[:3])
    assert prepare(task, None, 3, seed=1) == shots
    assert prepare(task, None, 3, seed=2) != shots
    assert prepare(task, limit=4, fewshot=3, seed=1).items == shots.items[:4]  # an item's prompt ignores the limit
    assert prepare(task, limit=4, fewshot=0, seed=1).items == task.items[:4]
    with pytest.raises(TaskError, match="10 few-shot examples need more than the task's 10 items"):
        prepare(task, None, 10, seed=1)


def test_perplexity_texts_are_never_fewshot() -> None:
    task = Task("wiki", PERPLEXITY, (TextItem("a"), TextItem("b"), TextItem("c")))
    assert prepare(task, limit=2, fewshot=5, seed=1) == Task("wiki", PERPLEXITY, task.items[:2])


@pytest.mark.parametrize(("text", "number"), [
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", Decimal(72)), ("It costs $1,234.50.", Decimal("1234.50")),
    ("-3 degrees", Decimal(-3)), ("no digits", None), ("72.", Decimal(72)),
])
def test_last_number(text: str, number: Decimal | None) -> None:
    assert last_number(text) == number


def test_exact_match_by_number_or_text() -> None:
    item = GenerationItem("Q", "Natalia sold 72 clips.\n#### 72")
    assert item.is_correct(" She sold 72.0 clips in all")
    assert not item.is_correct(" 72 clips, then 3 more")  # the last number counts
    assert not item.is_correct(" I do not know")
    exact = GenerationItem("def f():", "    return 1", match="exact")
    assert exact.is_correct("    return 1\n") and not exact.is_correct("    return 2")
