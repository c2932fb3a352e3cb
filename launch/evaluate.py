"""Score a checkpoint on downstream tasks, in one process (CPU or one GPU), no network:

  python launch/evaluate.py --checkpoint runs/demo/checkpoints --tasks demo-zh demo-en demo-math
  python launch/evaluate.py --checkpoint CKPT --tasks evals/arc_easy.jsonl evals/mmlu/ --num-fewshot 5 --limit 500

--checkpoint takes a ``step_N/`` directory or a checkpoints directory (its latest), saved by any
training layout. --tasks names built-in tasks (demo-zh, demo-en, demo-math), task files (jsonl,
docs/evaluation.md) or directories of them. Multiple-choice tasks report acc and acc_norm,
generation tasks exact_match (greedy). A line per task as it finishes, then a summary; the last
line is one JSON object: task → metric → value. Mistakes end with one ``error:`` line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from megamoe.checkpoint.store import checkpoint_dir, step_of
from megamoe.cli import exit_on_user_error
from megamoe.errors import UserError
from megamoe.evaluation.model import ModelBackend
from megamoe.evaluation.scoring import evaluate_task
from megamoe.evaluation.tasks import MULTIPLE_CHOICE, Task, load_tasks, prepare
from megamoe.inference import load_checkpoint


def chance(task: Task) -> str:
    """What guessing scores on a multiple-choice task (printed next to its accuracy)."""
    if task.kind != MULTIPLE_CHOICE:
        return ""
    return f"  (chance {sum(1 / len(item.choices) for item in task.items) / len(task.items):.3f})"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="step_N/ or a checkpoints directory (its latest)")
    p.add_argument("--tasks", nargs="+", required=True,
                   help="built-in names (demo-zh demo-en demo-math), .jsonl task files, directories of them; "
                        "space- or comma-separated")
    p.add_argument("--limit", type=int, help="score the first N items of each task (default: all)")
    p.add_argument("--num-fewshot", type=int, default=0, help="solved examples before each item (default 0)")
    p.add_argument("--seed", type=int, help="draws the few-shot examples (default: the checkpoint's seed)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="greedy tokens for generation items that set no max_new_tokens (default 256)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: one GPU if there is one)")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    for flag, value, least in (("--limit", args.limit, 1), ("--num-fewshot", args.num_fewshot, 0),
                               ("--batch-size", args.batch_size, 1), ("--max-new-tokens", args.max_new_tokens, 1)):
        if value is not None and value < least:
            raise UserError(f"{flag} {value}: must be >= {least}")
    tasks = load_tasks([spec for arg in args.tasks for spec in arg.split(",") if spec])  # before the model loads
    source = checkpoint_dir(args.checkpoint)
    model, tokenizer, cfg = load_checkpoint(source, args.device)
    seed = cfg.seed if args.seed is None else args.seed
    tasks = [prepare(task, args.limit, args.num_fewshot, seed) for task in tasks]
    print(f"{source} (step {step_of(source)}): {len(tasks)} task(s), {args.num_fewshot}-shot, seed {seed}, "
          f"sequences of {cfg.train.seq_len} tokens", flush=True)
    backend = ModelBackend(model, tokenizer.eod_id, tokenizer.vocab_size, args.batch_size)
    results, started = {}, time.perf_counter()
    for task in tasks:
        start = time.perf_counter()
        results[task.name] = evaluate_task(task, tokenizer, backend, cfg.train.seq_len, args.max_new_tokens,
                                           "--max-new-tokens")
        metrics = "  ".join(f"{metric} {value:.4f}" for metric, value in results[task.name].items())
        print(f"{task.name:<24} {len(task.items):>6} items  {metrics}{chance(task)}  "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
    print(f"{len(tasks)} task(s), {sum(len(task.items) for task in tasks)} items in "
          f"{time.perf_counter() - started:.1f} s")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
