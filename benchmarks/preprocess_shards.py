"""Sharded preprocessing: tokens/s of 1 vs 2 shard tasks at once, and the time model for a 2T-token corpus.

Each shard runs as an array task does: its own ``python -m data_tools.preprocess_data
--shard-index I --num-shards 2 --workers 1`` process (start-up included: keep the corpus large
enough that it is small), into a fresh directory. "1 shard at a time" runs the two shards one
after the other; "2 at once" starts both together. Tokens come from the shards' done markers
(eod included). Then ``--merge-shards`` merges them (checksums checked, shards copied) and its
output bytes per second are measured.

The time model: a corpus of D tokens on N nodes of C cores, one shard task per node with
``--workers C``, takes

    T(N, C) = D / (N · C · r · η)  +  D · b / m

where r is the tokens/s of one shard alone (one core), η the efficiency of running two at once
(their tokens/s ÷ 2r: how well it scales when cores share memory and disk), b the bytes per
token of the merged dataset (4 for a vocabulary ≥ 65,500, such as Yuan 2.0's) and m the merge's
output bytes/s on one node. It assumes tokenizing is CPU-bound and the filesystem keeps up
(it must read N · C · r · η tokens' worth of text per second: see "input MB/s" below).

    python -m benchmarks.preprocess_shards                       # 32 MB, best of 3
    python -m benchmarks.preprocess_shards --size-mb 1 --quick   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.preprocess import corpus_arguments, prepare_corpus, tokenizer_flags
from data_tools import preprocess_data
from data_tools.preprocess.shards import Shard, merge_shards

REPO = Path(__file__).resolve().parents[1]


def _tool(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "data_tools.preprocess_data", *argv], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait(proc: subprocess.Popen) -> None:
    _, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"preprocess_data failed ({proc.returncode}): {err.strip().splitlines()[-1]}")


def time_shards(base: list[str], prefix: str, together: bool) -> tuple[float, int]:
    """Seconds and tokens for both shards of a 2-shard split, one after the other or at once."""
    argv = [[*base, "--output-prefix", prefix, "--num-shards", "2", "--shard-index", str(i)] for i in range(2)]
    start = time.perf_counter()
    if together:
        for proc in [_tool(a) for a in argv]:
            _wait(proc)
    else:
        for a in argv:
            _wait(_tool(a))
    seconds = time.perf_counter() - start
    return seconds, sum(json.loads(Path(Shard(prefix, i, 2).marker).read_text())["tokens"] for i in range(2))


def time_merge(base: list[str], prefix: str) -> tuple[float, int]:
    """Seconds and bytes written for merging the two shards of ``prefix`` (in this process: a
    merge of terabytes does not wait for an interpreter to start)."""
    args = preprocess_data.parse_args([*base, "--output-prefix", prefix, "--num-shards", "2", "--merge-shards"])
    start = time.perf_counter()
    merged = merge_shards(args)
    return time.perf_counter() - start, merged.bytes_written


def model_hours(tokens: float, nodes: int, cores: int, rate: float, efficiency: float, token_bytes: int,
                merge_bytes_per_s: float) -> tuple[float, float]:
    """(tokenize, merge) hours of the time model in the module docstring."""
    return tokens / (nodes * cores * rate * efficiency) / 3600, tokens * token_bytes / merge_bytes_per_s / 3600


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    corpus_arguments(p, default_mb=32.0)
    p.add_argument("--corpus-tokens", type=float, default=2e12, help="D of the time model (default 2e12)")
    p.add_argument("--token-bytes", type=int, default=4, help="b of the time model (default 4: int32 tokens)")
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 8, 32, 128], help="N of the time model")
    p.add_argument("--cores", type=int, nargs="+", default=[32, 128], help="C of the time model")
    args = p.parse_args()
    repeats = 1 if args.quick else args.repeats

    with tempfile.TemporaryDirectory() as tmp:
        text, tokenizer_args = prepare_corpus(args, tmp)
        base = ["--input", str(text), *tokenizer_flags(tokenizer_args), "--append-eod", "--workers", "1",
                "--log-interval", "10000"]
        alone, together, merged = [], [], []
        for r in range(repeats):  # interleaved so drift in machine load hits both alike
            alone.append(time_shards(base, str(Path(tmp, f"alone{r}", "out")), together=False))
            together.append(time_shards(base, str(Path(tmp, f"together{r}", "out")), together=True))
            merged.append(time_merge(base, str(Path(tmp, f"together{r}", "out"))))
        (alone_s, tokens), (together_s, tokens2), (merge_s, merge_bytes) = min(alone), min(together), min(merged)
        if tokens != tokens2:
            raise SystemExit(f"token counts differ: {tokens:,} vs {tokens2:,}; not comparing")
        input_mb = text.stat().st_size / 1e6

    rate = tokens / alone_s  # one shard task on one core
    rate2 = tokens / together_s
    efficiency = rate2 / (2 * rate)
    merge_rate = merge_bytes / merge_s
    input_bytes_per_token = input_mb * 1e6 / tokens
    print(f"preprocess in 2 shards: {input_mb:.1f} MB, {tokens:,} tokens, {args.tokenizer_type}, best of {repeats}")
    print(f"  1 shard at a time  {alone_s:8.2f} s  {rate:>12,.0f} tokens/s")
    print(f"  2 shards at once   {together_s:8.2f} s  {rate2:>12,.0f} tokens/s")
    print(f"  2 at once ÷ 1 at a time = {rate2 / rate:.3f} (η = {efficiency:.3f} of 2)")
    print(f"  merge              {merge_s:8.2f} s  {merge_rate / 1e6:>12,.1f} MB/s written")
    print(f"time model for {args.corpus_tokens:.3g} tokens: T = D/(N·C·r·η) + D·b/m, r = {rate:,.0f} tokens/s/core, "
          f"η = {efficiency:.3f}, b = {args.token_bytes}, m = {merge_rate / 1e6:,.1f} MB/s")
    model: dict[str, dict[str, float]] = {}
    print(f"  {'nodes':>5} {'cores':>5} {'tokenize h':>11} {'merge h':>8} {'total h':>8} {'input MB/s':>11}")
    for cores in args.cores:
        for nodes in args.nodes:
            tok_h, merge_h = model_hours(args.corpus_tokens, nodes, cores, rate, efficiency, args.token_bytes,
                                         merge_rate)
            read = nodes * cores * rate * efficiency * input_bytes_per_token / 1e6
            print(f"  {nodes:>5} {cores:>5} {tok_h:>11,.1f} {merge_h:>8,.1f} {tok_h + merge_h:>8,.1f} {read:>11,.0f}")
            model[f"{nodes}x{cores}"] = {"tokenize_h": round(tok_h, 2), "merge_h": round(merge_h, 2)}
    print(json.dumps({
        "tokens_per_s_1_shard": round(rate), "tokens_per_s_2_shards": round(rate2),
        "ratio_2_vs_1": round(rate2 / rate, 3), "efficiency": round(efficiency, 3),
        "merge_mb_per_s": round(merge_rate / 1e6, 3), "input_bytes_per_token": round(input_bytes_per_token, 2),
        "tokens": tokens, "size_mb": round(input_mb, 1), "tokenizer": args.tokenizer_type, "repeats": repeats,
        "model_hours": model,
    }))


if __name__ == "__main__":
    main()
