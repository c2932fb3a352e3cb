"""Generated tokens/s with the KV cache against recomputing the whole prefix, at several prefix
lengths, in the same process.

With the cache a new token costs one position through every layer plus attention over the
cached keys; without it every step reruns the whole prefix, so its per-token cost grows with
the prefix. Each case generates ``--new-tokens`` greedy tokens after a random prompt of
``--prefix`` tokens (batch ``--batch``) with megamoe.inference.stream, a random model of the
config (default ``+exp=tiny``; model.max_position_embeddings is raised to fit the longest case).
Reported per case: generated tokens/s (prefill included) and ms per decoded token after the
first (the per-token cost); the ratios are uncached ÷ cached, and each mode's ms/token at the
longest prefix ÷ at the shortest. Last line: one JSON object.

    python benchmarks/generate.py --threads 4                                   # 64, 256, 1024
    python benchmarks/generate.py +exp=qwen_moe_tiny --prefixes 64,256,1024
    python benchmarks/generate.py --prefixes 8,16 --new-tokens 4 --repeats 1    # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from megamoe.cli import exit_on_user_error
from megamoe.config import compose
from megamoe.errors import UserError
from megamoe.inference import Sampling, stream
from megamoe.models import build_stage
from megamoe.nn.decoder import Decoder


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", default=["+exp=tiny"], help="config overrides (default +exp=tiny)")
    p.add_argument("--prefixes", default="64,256,1024", help="prompt lengths, comma-separated")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="runs per case (median), after one warm-up run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch CPU threads; set it to the cores that are free")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def benchmark_model(overrides: list[str], positions: int, device: torch.device, seed: int) -> Decoder:
    cfg = compose(overrides)
    if cfg.model.max_position_embeddings < positions:
        cfg = compose([*overrides, f"model.max_position_embeddings={positions}"])
    model = build_stage(cfg).to(device)
    model.reset_parameters(seed)
    return model.eval()


def timed_run(model: Decoder, prompts: list[list[int]], new_tokens: int, use_cache: bool) -> tuple[list[float], list]:
    """Seconds of each step (the first includes the prompt) and the ids chosen."""
    steps, ids = [], []
    start = time.perf_counter()
    for chosen in stream(model, prompts, new_tokens, Sampling(greedy=True), eod_id=None, use_cache=use_cache):
        now = time.perf_counter()  # stream moved the tokens to the CPU: the device is done
        steps.append(now - start)
        ids.append(chosen)
        start = now
    return steps, ids


def measure(model: Decoder, prompts: list[list[int]], args: argparse.Namespace, use_cache: bool) -> dict:
    runs = [timed_run(model, prompts, args.new_tokens, use_cache) for _ in range(1 + args.repeats)][1:]
    total = statistics.median(sum(steps) for steps, _ in runs)
    decode = statistics.median(statistics.mean(steps[1:]) for steps, _ in runs) if args.new_tokens > 1 else total
    return {"tokens_per_s": args.batch * args.new_tokens / total, "ms_per_token": decode * 1e3, "ids": runs[0][1]}


@exit_on_user_error
def main() -> None:
    args = parse_args()
    try:
        prefixes = [int(p) for p in args.prefixes.split(",")]
    except ValueError:
        raise UserError(f"--prefixes {args.prefixes}: give prompt lengths like 64,256,1024") from None
    if min(prefixes) < 1 or args.new_tokens < 1 or args.batch < 1 or args.repeats < 1:
        raise UserError("--prefixes, --new-tokens, --batch and --repeats must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device is visible; use --device cpu")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = benchmark_model(args.overrides, max(prefixes) + args.new_tokens, device, args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    results: dict[int, dict[str, dict]] = {}
    for prefix in prefixes:
        prompts = torch.randint(0, 256, (args.batch, prefix), generator=generator).tolist()
        results[prefix] = {mode: measure(model, prompts, args, mode == "cached") for mode in ("cached", "uncached")}
        if results[prefix]["cached"]["ids"] != results[prefix]["uncached"]["ids"]:
            print(f"note: at prefix {prefix} the greedy ids differ with and without the cache (a near-tie of a "
                  "random model's logits; tests/inference checks the agreement)", file=sys.stderr)

    print(f"generation: {' '.join(args.overrides)}, {args.new_tokens} new tokens, batch {args.batch}, "
          f"on {device} ({args.threads} threads)")
    print(f"{'prefix':>7}{'cached tok/s':>14}{'uncached tok/s':>16}"
          f"{'cached ms/tok':>15}{'uncached ms/tok':>17}{'speedup':>9}")
    for prefix, r in results.items():
        cached, uncached = r["cached"], r["uncached"]
        print(f"{prefix:>7}{cached['tokens_per_s']:>14.1f}{uncached['tokens_per_s']:>16.1f}{cached['ms_per_token']:>15.2f}"
              f"{uncached['ms_per_token']:>17.2f}{uncached['ms_per_token'] / cached['ms_per_token']:>9.2f}")
    short, long = min(prefixes), max(prefixes)
    summary = {
        **{f"{mode}_tokens_per_s": {str(p): round(r[mode]["tokens_per_s"], 1) for p, r in results.items()}
           for mode in ("cached", "uncached")},
        **{f"{mode}_ms_per_token": {str(p): round(r[mode]["ms_per_token"], 3) for p, r in results.items()}
           for mode in ("cached", "uncached")},
        "speedup": {str(p): round(r["uncached"]["ms_per_token"] / r["cached"]["ms_per_token"], 2)
                    for p, r in results.items()},
        **{f"{mode}_growth_{short}_to_{long}":
           round(results[long][mode]["ms_per_token"] / results[short][mode]["ms_per_token"], 2)
           for mode in ("cached", "uncached")},
        "same_ids": all(r["cached"]["ids"] == r["uncached"]["ids"] for r in results.values()),
        "new_tokens": args.new_tokens, "batch": args.batch, "device": str(device), "threads": args.threads,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
