"""Evaluation throughput: multiple-choice choices scored per second by launch/evaluate.py's backend.

The model is the demo's architecture (``+exp=demo``: 4 layers, hidden 64, 8 experts, byte-level
vocabulary) with random weights, or a checkpoint (--checkpoint). It scores every choice of the
built-in tasks demo-en and demo-zh (768 sequences of 17-33 tokens, each starting at a
document boundary) at each batch size, in the same run: a warm-up pass, then --repeats timed
passes, whose median counts. Prints a line per batch size and, as its last line, one JSON
object (``choices_per_s`` per batch size, ``best``).

    python benchmarks/evaluate.py                                          # CPU, under a minute on 2 cores
    python benchmarks/evaluate.py --checkpoint runs/demo/checkpoints --batch-sizes 16 64
    python benchmarks/evaluate.py --limit 4 --batch-sizes 8 --repeats 1 +exp=tiny   # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from megamoe.cli import exit_on_user_error
from megamoe.config import compose
from megamoe.data.tokenizer import tokenizer_from_config
from megamoe.evaluation.model import ModelBackend
from megamoe.evaluation.resolve import load_tasks
from megamoe.evaluation.scoring import choice_requests
from megamoe.evaluation.tasks import prepare
from megamoe.inference import load_for_inference
from megamoe.models import build_stage


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="score with this checkpoint's model (default: random weights)")
    parser.add_argument("--tasks", nargs="+", default=["demo-en", "demo-zh"], help="multiple-choice tasks to score")
    parser.add_argument("--limit", type=int, help="items per task (default: all)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per batch size (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("overrides", nargs="*", default=["+exp=demo"],
                        help="config of the random model (default +exp=demo)")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.checkpoint:
        model, tokenizer, cfg = load_for_inference(args.checkpoint, args.device)
    else:
        cfg = compose([*args.overrides, "data=mock", "parallel.pp=1", "parallel.ep=1"])
        tokenizer = tokenizer_from_config(cfg.data.tokenizer)
        with torch.device(args.device):
            model = build_stage(cfg)
        model.reset_parameters(cfg.seed)
        model.eval()
    tasks = [prepare(task, args.limit, 0, cfg.seed) for task in load_tasks(args.tasks)]
    requests = [r for task in tasks for r in choice_requests(task, tokenizer, cfg.train.seq_len)]
    tokens = sum(len(r.tokens) - 1 for r in requests)
    params = sum(p.numel() for p in model.parameters())
    print(f"{len(requests)} choices ({tokens:,} tokens) of {', '.join(args.tasks)}; model {params / 1e6:.2f}M "
          f"parameters on {args.device}, {torch.get_num_threads()} thread(s)")
    rates = {}
    for batch_size in args.batch_sizes:
        backend = ModelBackend(model, tokenizer.eod_id, tokenizer.vocab_size, batch_size)
        backend.loglikelihoods(requests[:batch_size], "warm-up")
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            backend.loglikelihoods(requests, f"batch {batch_size}")
            times.append(time.perf_counter() - start)
        rates[batch_size] = len(requests) / statistics.median(times)
        print(f"batch {batch_size:>4}: {rates[batch_size]:>9,.0f} choices/s  "
              f"{rates[batch_size] * tokens / len(requests):>11,.0f} tokens/s  (median of {args.repeats})")
    best = max(rates, key=rates.__getitem__)
    print(json.dumps({"choices": len(requests), "tokens": tokens, "parameters": params, "device": args.device,
                      "choices_per_s": {str(b): round(r, 1) for b, r in rates.items()},
                      "best": {"batch_size": best, "choices_per_s": round(rates[best], 1)}}))


if __name__ == "__main__":
    main()
