"""Task names → tasks: what ``--tasks`` and ``eval.downstream_tasks`` accept.

A name is a built-in task (made on the fly: megamoe.evaluation.demo), a .jsonl task file, or a
directory of them (megamoe.evaluation.tasks reads the files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from megamoe.errors import TaskError
from megamoe.evaluation.demo import demo_en, demo_math, demo_zh
from megamoe.evaluation.tasks import Task, read_task_file

BUILTIN: dict[str, Callable[[], Task]] = {"demo-zh": demo_zh, "demo-en": demo_en, "demo-math": demo_math}


def load_tasks(specs: Sequence[str]) -> list[Task]:
    """The tasks ``specs`` name: built-in names, .jsonl files, directories of .jsonl files."""
    tasks: list[Task] = []
    for spec in specs:
        path = Path(spec)
        if spec in BUILTIN:
            tasks.append(BUILTIN[spec]())
        elif path.is_file():
            tasks.append(read_task_file(path))
        elif path.is_dir():
            files = sorted(path.glob("*.jsonl"))
            if not files:
                raise TaskError(f"{path}: no *.jsonl task files in this directory")
            tasks += [read_task_file(f, f"{path.name}/{f.stem}") for f in files]
        else:
            raise TaskError(f"unknown task {spec!r}: not a built-in task ({', '.join(BUILTIN)}), nor a .jsonl "
                            "file or a directory of them")
    names = [task.name for task in tasks]
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice is not None:
        raise TaskError(f"task {twice!r} is named twice; give each task file a different name")
    return tasks
