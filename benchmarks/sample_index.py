"""How long building the sample indices takes, and how much memory, as the corpus grows to 2T tokens.

Claim: for a blended 2T-token corpus (100 prefixes × 20B tokens) at seq_len 4096,
the document / sample / shuffle indices of every prefix plus the blend index build in
≤ 3 minutes with ≤ 6 GiB peak RSS on a 2-core machine.

Only the indices are built — from synthetic document-length arrays, the one thing they depend
on — so no 2T tokens are written. Document lengths are log-normal (median ~490 tokens, mean
~1,150, a long tail clipped at 1M), like web text; each prefix takes a different window of
one drawn pool. Prefixes are 40% "zh" (weight 0.5), 45% "en" (0.4) and 15% "code" (0.1), so
some are read for more than one epoch and some for less. The train set is the nominal token
count / seq_len samples. Prefixes are built in parallel threads, as megamoe.data.loader does
(one per core, up to 8), then the blend. Each size runs in a fresh process so its peak RSS is
its own; drawing the lengths is timed apart from the build. The baseline for the growth
ratios is the smallest size.

    python benchmarks/sample_index.py               # 20B, 200B, 2T tokens (1, 10, 100 prefixes)
    python benchmarks/sample_index.py --scale 0.001 # smoke run: prefixes of 20M tokens
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import resource
import shutil
import tempfile
import time

import numpy as np

from megamoe.data.blend import blend_counts, build_blend_index
from megamoe.data.samples import build_sample_index, build_workers, cached_arrays

PREFIX_TOKENS = 20e9
LANGS = (("zh", 0.40, 0.5), ("en", 0.45, 0.4), ("code", 0.15, 0.1))  # name, share of prefixes, blend weight
LOG_MEAN, LOG_SIGMA = 6.2, 1.3  # median e^6.2 ≈ 490 tokens, mean ≈ 1,150


def lengths_pool(prefix_tokens: float) -> np.ndarray:
    """Log-normal document lengths (int32) for two prefixes' worth of tokens."""
    mean = np.exp(LOG_MEAN + LOG_SIGMA**2 / 2)
    x = np.random.default_rng(0).standard_normal(int(2 * prefix_tokens / mean), dtype=np.float32)
    x *= LOG_SIGMA
    x += LOG_MEAN
    np.exp(x, out=x)
    return np.clip(x, 1, 1 << 20).astype(np.int32)


def prefix_weights(n_prefixes: int) -> np.ndarray:
    """Blend weight per prefix: each language's weight shared among its prefixes."""
    bounds = np.round(np.cumsum([0.0] + [share for _, share, _ in LANGS]) * n_prefixes).astype(int)
    w = np.zeros(n_prefixes)
    for lo, hi, (_, _, weight) in zip(bounds[:-1], bounds[1:], LANGS):
        w[lo:hi] = weight / max(hi - lo, 1)
    return w / w.sum()


def run_size(n_prefixes: int, prefix_tokens: float, seq_len: int, workdir: str) -> dict:
    """Build every index of one corpus size (in a fresh process); returns timings and peak RSS.

    Each prefix's documents are a different window of one pool of drawn lengths (drawing 2B
    log-normals would take longer than the build); a window is a view, so it costs nothing.
    """
    t0 = time.perf_counter()
    pool = lengths_pool(prefix_tokens)
    draw_s = time.perf_counter() - t0
    n_docs = len(pool) // 2
    starts = np.random.default_rng(1).integers(0, len(pool) - n_docs, n_prefixes)
    weights = prefix_weights(n_prefixes)
    num_samples = int(n_prefixes * prefix_tokens) // seq_len

    def build_prefix(p: int) -> int:
        lengths = pool[starts[p]:starts[p] + n_docs]
        desc = {"prefix": p, "seq_len": seq_len, "samples": int(counts[p])}
        cached_arrays(desc, workdir, f"p{p}", ("doc", "sample", "shuffle"),
                      lambda paths: build_sample_index(lengths, seq_len, int(counts[p]), p, paths), True)
        return int(lengths.sum(dtype=np.int64))

    t0 = time.perf_counter()
    counts = blend_counts(weights, num_samples)
    with concurrent.futures.ThreadPoolExecutor(build_workers()) as pool_ex:
        tokens = sum(pool_ex.map(build_prefix, range(n_prefixes)))
    cached_arrays({"weights": weights.tolist(), "samples": num_samples}, workdir, "blend", ("dataset", "sample"),
                  lambda paths: build_blend_index(weights, num_samples, paths), True)
    build_s = time.perf_counter() - t0
    written = sum(e.stat().st_size for e in os.scandir(workdir))
    return {"prefixes": n_prefixes, "tokens": tokens, "docs": n_docs * n_prefixes, "samples": num_samples,
            "build_s": build_s, "lengths_s": draw_s, "threads": build_workers(), "index_gib": written / 2**30,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of 20B tokens per prefix (0.001 = smoke run)")
    ap.add_argument("--prefixes", type=int, nargs=3, default=[1, 10, 100], help="prefix counts of the three sizes")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--dir", default=None, help="where indices are written (default: a temporary directory)")
    args = ap.parse_args()

    results = []
    ctx = multiprocessing.get_context("spawn")
    for n in args.prefixes:
        workdir = tempfile.mkdtemp(prefix="sample_index_", dir=args.dir)
        try:
            # A fresh process per size: its ru_maxrss is then this size's own peak.
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                r = pool.submit(run_size, n, PREFIX_TOKENS * args.scale, args.seq_len, workdir).result()
        finally:
            shutil.rmtree(workdir)
        results.append(r)
        print(f"{r['tokens'] / 1e9:8.1f}B tokens  {n:4d} prefixes  {r['docs'] / 1e6:8.1f}M docs  "
              f"{r['samples'] / 1e6:7.1f}M samples  build {r['build_s']:7.1f}s  peak RSS {r['peak_rss_gib']:5.2f} GiB  "
              f"indices {r['index_gib']:6.2f} GiB  {r['threads']} threads "
              f"(drawing lengths {r['lengths_s']:.1f}s, not counted)", flush=True)
    (a, b, c) = results
    growth = {"tokens_x_1_to_2": b["tokens"] / a["tokens"], "time_x_1_to_2": b["build_s"] / a["build_s"],
              "tokens_x_2_to_3": c["tokens"] / b["tokens"], "time_x_2_to_3": c["build_s"] / b["build_s"]}
    print(f"time grows {growth['time_x_1_to_2']:.1f}× for {growth['tokens_x_1_to_2']:.1f}× tokens, "
          f"then {growth['time_x_2_to_3']:.1f}× for {growth['tokens_x_2_to_3']:.1f}×")
    print(json.dumps({"tokens": c["tokens"], "build_s": round(c["build_s"], 2),
                      "meets_target": c["build_s"] <= 180 and c["peak_rss_gib"] <= 6 if args.scale == 1 else None,
                      "peak_rss_gib": round(c["peak_rss_gib"], 3), "index_gib": round(c["index_gib"], 2),
                      "seq_len": args.seq_len, "scale": args.scale,
                      **{k: round(v, 2) for k, v in growth.items()},
                      "sizes": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                                for r in results]}))


if __name__ == "__main__":
    main()
