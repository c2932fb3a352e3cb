"""Merge several ``.bin``/``.idx`` datasets into one, in the order given (e.g. shards preprocessed on many machines).

    python -m data_tools.merge_datasets --input data/shards --output-prefix data/zh_text_document
    python -m data_tools.merge_datasets --input data/a_text_document data/b_text_document --output-prefix data/ab

``--input`` takes dataset prefixes, or a directory whose ``*.idx``/``*.bin`` pairs are merged in
name order (as Megatron-LM's tools/merge_datasets.py does). All inputs must hold the same token
type (the same tokenizer). The output appears under its final name only when complete.
Shards of ``preprocess_data.py --shard-index`` are merged by ``preprocess_data.py --merge-shards``,
which checks them against their done markers first and then calls :func:`merge`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from tqdm import tqdm

from megamoe.cli import exit_on_user_error
from megamoe.data.indexed import IndexedDataset, IndexedDatasetBuilder, data_file_path
from megamoe.errors import UserError


def expand_prefixes(specs: Sequence[str], output_prefix: str) -> list[str]:
    """Dataset prefixes named by ``specs``; a directory contributes its .idx/.bin pairs in name order."""
    out = os.path.abspath(output_prefix)
    prefixes: list[str] = []
    for spec in specs:
        if os.path.isdir(spec):
            found = [str(p.with_suffix("")) for p in sorted(Path(spec).glob("*.idx"))
                     if p.with_suffix(".bin").is_file()]
            found = [p for p in found if os.path.abspath(p) != out]  # a previous merge output in the same folder
            if not found:
                raise UserError(f"{spec}: directory holds no .bin/.idx dataset pairs")
            prefixes += found
        else:
            prefixes.append(spec)
    return prefixes


def merge(prefixes: Sequence[str], output_prefix: str) -> tuple[int, int]:
    """Write the concatenation of ``prefixes`` to ``output_prefix``; returns (documents, tokens)."""
    datasets = [IndexedDataset(p) for p in prefixes]  # validates every input before anything is written
    first = datasets[0]
    for ds in datasets[1:]:
        if ds.dtype != first.dtype:
            raise UserError(f"{ds.prefix} holds {ds.dtype} tokens but {first.prefix} holds {first.dtype}; "
                            f"merged datasets must come from the same tokenizer")
    total = sum(os.path.getsize(data_file_path(ds.prefix)) for ds in datasets)
    with IndexedDatasetBuilder(output_prefix, first.dtype) as builder, tqdm(
            total=total, unit="B", unit_scale=True, desc="merging", dynamic_ncols=True) as bar:
        for ds in datasets:
            builder.add_index(ds.prefix)
            bar.update(os.path.getsize(data_file_path(ds.prefix)))
    return sum(len(ds) for ds in datasets), sum(ds.num_tokens for ds in datasets)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes, or directories of .bin/.idx pairs")
    p.add_argument("--output-prefix", required=True, help="writes {prefix}.bin/.idx")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    prefixes = expand_prefixes(args.input, args.output_prefix)
    documents, tokens = merge(prefixes, args.output_prefix)
    size = sum(os.path.getsize(args.output_prefix + ext) for ext in (".bin", ".idx"))
    print(f"merged {len(prefixes)} dataset(s) → {args.output_prefix}.bin/.idx: {documents:,} documents, "
          f"{tokens:,} tokens, {size / 1e6:,.2f} MB in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
