"""Look inside a ``.bin``/``.idx`` dataset: counts, a document-length histogram, a few decoded documents.

    python -m data_tools.inspect_data data/zh_text_document \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer.json --docs 3

Without a tokenizer the documents are shown as token ids.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import numpy as np

from megamoe.cli import exit_on_user_error
from megamoe.data.indexed import IndexedDataset
from megamoe.data.tokenizer import TOKENIZER_TYPES, Tokenizer, build_tokenizer

BAR_WIDTH = 40
PREVIEW_CHARS = 600
PREVIEW_IDS = 64


def length_histogram(lengths: np.ndarray) -> list[str]:
    """One text row per power-of-two bucket of document length: range, count, bar."""
    if len(lengths) == 0:
        return []
    buckets = np.bincount(np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64))
    rows = []
    for b, n in enumerate(buckets):
        if n:
            lo, hi = (0 if b == 0 else 2 ** b), 2 ** (b + 1) - 1
            bar = "█" * max(1, round(BAR_WIDTH * n / buckets.max()))
            rows.append(f"  {lo:>9,}–{hi:<9,} {n:>10,}  {bar}")
    return rows


def describe(ds: IndexedDataset) -> list[str]:
    lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    lines = [f"{ds.prefix}: {len(ds):,} documents, {ds.num_tokens:,} tokens ({ds.dtype})"]
    if len(lengths):
        lines.append(f"document length: min {lengths.min():,}, median {int(np.median(lengths)):,}, "
                     f"mean {lengths.mean():,.1f}, max {lengths.max():,}")
        lines += ["length histogram (tokens → documents):", *length_histogram(lengths)]
    return lines


def preview(ds: IndexedDataset, i: int, tokenizer: Optional[Tokenizer]) -> str:
    tokens = ds[i]
    if tokenizer is None:
        shown = " ".join(map(str, tokens[:PREVIEW_IDS].tolist()))
        return f"[{i}] {len(tokens):,} tokens: {shown}{' …' if len(tokens) > PREVIEW_IDS else ''}"
    text = tokenizer.decode(tokens.tolist())
    cut = text[:PREVIEW_CHARS] + (" …" if len(text) > PREVIEW_CHARS else "")
    return f"[{i}] {len(tokens):,} tokens:\n{cut}"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prefix", help="dataset prefix (the path without .bin/.idx)")
    p.add_argument("--tokenizer-type", default=None, help=f"decode with one of {', '.join(TOKENIZER_TYPES)}")
    p.add_argument("--tokenizer-model", default=None, help="tokenizer.json or .model file")
    p.add_argument("--eod-token", default=None, help="end-of-document token, if the tokenizer's own is not found")
    p.add_argument("--docs", type=int, default=3, help="how many documents to show from the start (default 3)")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    ds = IndexedDataset(args.prefix)
    tokenizer = (build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.eod_token)
                 if args.tokenizer_type else None)
    print("\n".join(describe(ds)))
    for i in range(min(args.docs, len(ds))):
        print()
        print(preview(ds, i, tokenizer))


if __name__ == "__main__":
    main(sys.argv[1:])
