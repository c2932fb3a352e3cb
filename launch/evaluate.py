"""Score a checkpoint on downstream tasks, in one process (CPU or one GPU), no network:

  python launch/evaluate.py --checkpoint runs/demo/checkpoints --tasks demo-zh demo-en demo-math
  python launch/evaluate.py --checkpoint CKPT --tasks evals/arc_easy.jsonl evals/mmlu/ --num-fewshot 5 --limit 500
  python launch/evaluate.py --checkpoint CKPT --harness-tasks arc_easy,hellaswag [--harness-include-path DIR]
      [--harness-limit N] [--batch-size B]

--checkpoint takes a ``step_N/`` directory or a checkpoints directory (its latest), saved by any
training layout. --tasks names built-in tasks (demo-zh, demo-en, demo-math), task files (jsonl,
docs/evaluation.md) or directories of them. Multiple-choice tasks report acc and acc_norm,
generation tasks exact_match (greedy), perplexity tasks word / byte perplexity and bits per byte.
--harness-tasks runs lm-evaluation-harness's tasks (and those of --harness-include-path) on the
same model, in this process (the ``eval`` extra; its own tasks download their datasets). A line
per task as it finishes, then a summary; the last line is one JSON object: task → metric →
value. Mistakes end with one ``error:`` line, exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

from omegaconf import DictConfig

from megamoe.checkpoint.store import checkpoint_dir, step_of
from megamoe.cli import exit_on_user_error
from megamoe.data.tokenizer import Tokenizer
from megamoe.errors import UserError
from megamoe.evaluation.model import ModelBackend
from megamoe.evaluation.resolve import load_tasks
from megamoe.evaluation.scoring import evaluate_task
from megamoe.evaluation.tasks import MULTIPLE_CHOICE, Task, prepare
from megamoe.inference import load_for_inference

Scores = dict[str, dict[str, float]]  # task → metric → value


def chance(task: Task) -> str:
    """What guessing scores on a multiple-choice task (printed next to its accuracy)."""
    if task.kind != MULTIPLE_CHOICE:
        return ""
    return f"  (chance {sum(1 / len(item.choices) for item in task.items) / len(task.items):.3f})"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="step_N/ or a checkpoints directory (its latest)")
    p.add_argument("--tasks", nargs="+", default=[],
                   help="built-in names (demo-zh demo-en demo-math), .jsonl task files, directories of them; "
                        "space- or comma-separated")
    p.add_argument("--harness-tasks", nargs="+", default=[],
                   help="lm-evaluation-harness task, group or tag names (arc_easy, mmlu, ...); space- or "
                        "comma-separated")
    p.add_argument("--harness-include-path", type=Path, help="a directory of your own harness task YAML files")
    p.add_argument("--harness-limit", type=int, help="score the first N documents of each harness task (default: all)")
    p.add_argument("--confirm-run-unsafe-code", action="store_true",
                   help="let harness tasks marked unsafe run the model's code (humaneval, mbpp): in a sandbox only")
    p.add_argument("--limit", type=int, help="score the first N items of each --tasks task (default: all)")
    p.add_argument("--num-fewshot", type=int,
                   help="solved examples before each item (default: 0; a harness task's own setting)")
    p.add_argument("--seed", type=int, help="draws the few-shot examples (default: the checkpoint's seed; the "
                                            "harness's own seeds for harness tasks)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="greedy tokens for generation items that set no budget (default 256)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: one GPU if there is one)")
    return p


def harness_module() -> ModuleType:
    """megamoe.evaluation.harness, or one UserError line saying how to install the harness."""
    try:
        return importlib.import_module("megamoe.evaluation.harness")
    except ImportError as exc:
        raise UserError(f"--harness-tasks needs lm-evaluation-harness, which cannot be imported ({exc}); "
                        "pip install -e '.[eval]'") from None


def report(name: str, items: Optional[int], metrics: dict[str, float], seconds: Optional[float] = None,
           note: str = "") -> None:
    """One line per task: its name, items, metrics (and stderrs after ±)."""
    shown = "  ".join(f"{metric} {_number(value)}" + (f" ± {_number(metrics[stderr])}" if stderr in metrics else "")
                      for metric, value in metrics.items() for stderr in [_stderr_key(metric)]
                      if "_stderr" not in metric)
    count = f"{items:>6} items" if items is not None else " " * 12
    timing = f"  ({seconds:.1f} s)" if seconds is not None else ""
    print(f"{name:<24} {count}  {shown}{note}{timing}", flush=True)


def _number(value: float) -> str:
    """Four decimals; a large perplexity in scientific notation."""
    return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"


def _stderr_key(metric: str) -> str:
    """The harness's name of a metric's stderr: acc → acc_stderr, exact_match,flexible → exact_match_stderr,flexible."""
    name, comma, filter_name = metric.partition(",")
    return f"{name}_stderr{comma}{filter_name}"


def builtin_scores(tasks: list[Task], args: argparse.Namespace, where: str, cfg: DictConfig, tokenizer: Tokenizer,
                   backend: ModelBackend) -> tuple[Scores, int]:
    """Our own tasks' metrics, a line each as it finishes, and the number of items scored."""
    fewshot, seed = args.num_fewshot or 0, cfg.seed if args.seed is None else args.seed
    tasks = [prepare(task, args.limit, fewshot, seed) for task in tasks]
    print(f"{where}: {len(tasks)} task(s), {fewshot}-shot, seed {seed}, sequences of {cfg.train.seq_len} tokens",
          flush=True)
    results = {}
    for task in tasks:
        start = time.perf_counter()
        results[task.name] = evaluate_task(task, tokenizer, backend, cfg.train.seq_len, args.max_new_tokens,
                                           "--max-new-tokens")
        report(task.name, len(task.items), results[task.name], time.perf_counter() - start, chance(task))
    return results, sum(len(task.items) for task in tasks)


def harness_scores(harness: ModuleType, manager: Any, names: list[str], args: argparse.Namespace, where: str,
                   cfg: DictConfig, tokenizer: Tokenizer, backend: ModelBackend) -> tuple[Scores, int]:
    """lm-evaluation-harness's metrics of its tasks, a line each (groups too), and the items scored."""
    fewshot = "each task's own few-shot" if args.num_fewshot is None else f"{args.num_fewshot}-shot"
    print(f"{where}: lm-evaluation-harness {', '.join(names)}, {fewshot}, sequences of {cfg.train.seq_len} tokens",
          flush=True)
    lm = harness.MegamoeLM(backend, tokenizer, cfg.train.seq_len, args.max_new_tokens)
    results, items = harness.evaluate(lm, manager, names, args.harness_limit, args.num_fewshot, args.seed,
                                      args.confirm_run_unsafe_code)
    for name, metrics in results.items():
        report(name, items.get(name), metrics)
    return results, sum(items.values())


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    for flag, value, least in (("--limit", args.limit, 1), ("--num-fewshot", args.num_fewshot, 0),
                               ("--batch-size", args.batch_size, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                               ("--harness-limit", args.harness_limit, 1)):
        if value is not None and value < least:
            raise UserError(f"{flag} {value}: must be >= {least}")
    specs = [spec for arg in args.tasks for spec in arg.split(",") if spec]
    harness_names = [name for arg in args.harness_tasks for name in arg.split(",") if name]
    if not specs and not harness_names:
        raise UserError("no task: name --tasks (built-in tasks, task files) and/or --harness-tasks "
                        "(lm-evaluation-harness tasks)")
    tasks = load_tasks(specs)  # before the model loads, as are the harness's names
    twice = next((name for name in harness_names if name in {task.name for task in tasks}), None)
    if twice is not None:
        raise UserError(f"task {twice!r} is named by --tasks and --harness-tasks; rename the task file")
    harness = harness_module() if harness_names else None
    manager = harness.task_manager(args.harness_include_path) if harness else None
    if harness:
        harness.check_tasks(manager, harness_names)
    source = checkpoint_dir(args.checkpoint)
    model, tokenizer, cfg = load_for_inference(source, args.device)
    backend = ModelBackend(model, tokenizer.eod_id, tokenizer.vocab_size, args.batch_size)
    where, started = f"{source} (step {step_of(source)})", time.perf_counter()
    results, counted = builtin_scores(tasks, args, where, cfg, tokenizer, backend) if tasks else ({}, 0)
    if harness:
        scores, items = harness_scores(harness, manager, harness_names, args, where, cfg, tokenizer, backend)
        results, counted = {**results, **scores}, counted + items
    print(f"{len(results)} task(s), {counted} items in {time.perf_counter() - started:.1f} s")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
