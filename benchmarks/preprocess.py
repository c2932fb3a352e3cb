"""Preprocessing throughput against the bare tokenizer on the same text and worker count.

Claim: data_tools/preprocess_data.py reaches ≥ 0.9× the tokens/s of the tokenizer's
own batch encode. The baseline gets the document texts already in memory, cut into the same
chunks and spread over the same worker processes (one tokenizer thread each); it does nothing
but ``encode_batch``. The preprocessing run does everything: read and parse the jsonl, validate,
encode, flatten to numpy, write ``.bin``/``.idx`` and rename. Both count text tokens only.

The corpus is the demo corpus; the tokenizer a byte-level BPE trained on a separate small
sample of it, unless --tokenizer-model names one.

    python -m benchmarks.preprocess                      # 64 MB, all cores
    python -m benchmarks.preprocess --size-mb 1 --quick  # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

from data_tools import make_demo_corpus, preprocess_data, train_tokenizer
from data_tools.preprocess import encoder, pipeline, pool
from data_tools.preprocess.parsers import parse_chunk
from data_tools.preprocess.readers import read_chunks
from megamoe.config.choices import TokenizerType
from megamoe.data.tokenizer import build_tokenizer


def read_chunks_of_texts(path: Path) -> list[list[str]]:
    """The documents of a jsonl file as the preprocessor chunks them, already parsed."""
    return [parse_chunk(chunk, ["text"]).columns[0] for chunk in read_chunks([path], ["text"])]


def _count_tokens(texts: list[str]) -> int:
    # The worker's tokenizer, set up by the preprocessor's own initializer: same process and thread layout.
    return sum(map(len, encoder.worker_encoder().tokenizer.encode_batch(texts)))


def time_bare(chunks: list[list[str]], tokenizer_args: tuple, workers: int) -> tuple[float, int]:
    """Seconds and tokens for encode_batch alone, in the same process layout the preprocessor uses."""
    start = time.perf_counter()
    tokens = sum(pool.ordered_map(_count_tokens, chunks, workers, encoder.init_worker_encoder,
                                  (["text"], tokenizer_args, False)))
    return time.perf_counter() - start, tokens


def tokenizer_flags(tokenizer_args: tuple[str, Optional[str], Optional[str]]) -> list[str]:
    """preprocess_data.py's flags for (type, model, eod token)."""
    kind, model, eod = tokenizer_args
    return ["--tokenizer-type", kind, *(["--tokenizer-model", model] if model else []),
            *(["--eod-token", eod] if eod else [])]


def time_preprocess(path: Path, out_prefix: str, tokenizer_args: tuple, workers: int) -> tuple[float, int]:
    """Seconds and text tokens (eod excluded) for the full preprocessing run."""
    argv = ["--input", str(path), "--output-prefix", out_prefix, *tokenizer_flags(tokenizer_args),
            "--append-eod", "--workers", str(workers), "--log-interval", "10000"]
    start = time.perf_counter()
    summary = pipeline.preprocess(preprocess_data.parse_args(argv))
    return time.perf_counter() - start, summary.tokens - summary.documents


def corpus_arguments(p: argparse.ArgumentParser, default_mb: float) -> None:
    """The flags that choose the corpus and tokenizer (shared with benchmarks/preprocess_shards.py)."""
    p.add_argument("--size-mb", type=float, default=default_mb, help=f"corpus size (default {default_mb:g})")
    p.add_argument("--tokenizer-type", default="HuggingFaceTokenizer")
    p.add_argument("--tokenizer-model", default=None, help="default: train a BPE on a 4 MB sample (seed 1)")
    p.add_argument("--vocab-size", type=int, default=16000, help="of the trained tokenizer (default 16000)")
    p.add_argument("--repeats", type=int, default=3, help="best of N runs of each (default 3)")
    p.add_argument("--quick", action="store_true", help="one repeat, small tokenizer: a smoke run")


def prepare_corpus(args: argparse.Namespace, tmp: str) -> tuple[Path, tuple[str, Optional[str], None]]:
    """The demo corpus as one jsonl file, and (type, model, eod) of the tokenizer, under ``tmp``."""
    corpus = Path(tmp, "corpus")
    make_demo_corpus.make_corpus(str(corpus), args.size_mb, seed=0)
    text = corpus / "all.jsonl"
    with open(text, "wb") as out:
        for name in make_demo_corpus.SHARES:
            out.write((corpus / f"{name}.jsonl").read_bytes())
    model = args.tokenizer_model
    if model is None and args.tokenizer_type == TokenizerType.HUGGING_FACE:
        sample = Path(tmp, "sample")
        make_demo_corpus.make_corpus(str(sample), 0.2 if args.quick else 4.0, seed=1)
        model = str(Path(tmp, "tokenizer.json"))
        train_tokenizer.train([str(sample)], 1000 if args.quick else args.vocab_size, model, show_progress=False)
    tokenizer_args = (args.tokenizer_type, model, None)
    build_tokenizer(*tokenizer_args)  # fail on a bad tokenizer before timing anything
    return text, tokenizer_args


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    corpus_arguments(p, default_mb=64.0)
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="worker processes (default: all cores)")
    args = p.parse_args()
    repeats = 1 if args.quick else args.repeats

    with tempfile.TemporaryDirectory() as tmp:
        text, tokenizer_args = prepare_corpus(args, tmp)
        chunks = read_chunks_of_texts(text)

        bare, pre = [], []
        for _ in range(repeats):  # interleaved so drift in machine load hits both alike
            bare.append(time_bare(chunks, tokenizer_args, args.workers))
            pre.append(time_preprocess(text, str(Path(tmp, "out", "bench")), tokenizer_args, args.workers))
        (bare_s, bare_tokens), (pre_s, pre_tokens) = min(bare), min(pre)
        if bare_tokens != pre_tokens:
            raise SystemExit(f"token counts differ: bare {bare_tokens:,} vs preprocess {pre_tokens:,}; not comparing")
        size_mb = text.stat().st_size / 1e6

    ratio = bare_s / pre_s
    print(f"preprocess {size_mb:.1f} MB, {pre_tokens:,} tokens, {args.workers} worker(s), {args.tokenizer_type}, "
          f"best of {repeats}")
    print(f"  bare encode_batch  {bare_s:8.2f} s  {bare_tokens / bare_s:>12,.0f} tokens/s")
    print(f"  preprocess_data    {pre_s:8.2f} s  {pre_tokens / pre_s:>12,.0f} tokens/s")
    print(f"  preprocess ÷ bare = {ratio:.3f} (target ≥ 0.9)")
    print(json.dumps({
        "preprocess_vs_bare": round(ratio, 3),
        "preprocess_tokens_per_s": round(pre_tokens / pre_s),
        "bare_tokens_per_s": round(bare_tokens / bare_s),
        "tokens": pre_tokens, "size_mb": round(size_mb, 1), "workers": args.workers,
        "tokenizer": args.tokenizer_type, "repeats": repeats,
    }))


if __name__ == "__main__":
    main()
