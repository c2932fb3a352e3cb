"""Tokenize jsonl / parquet / txt corpora into Megatron-compatible ``.bin``/``.idx`` datasets.

Flags follow Megatron-LM's ``tools/preprocess_data.py`` so existing scripts carry over::

    python -m data_tools.preprocess_data --input 'raw/zh/*.jsonl.gz' --output-prefix data/zh \\
        --json-keys text --tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer.json \\
        --append-eod --workers 16

writes ``data/zh_text_document.bin`` / ``.idx`` (one pair per ``--json-keys`` key).

The pipeline keeps Python work per document tiny so throughput stays close to the tokenizer's
own: the main process reads raw chunks (~1 MB of lines, or a parquet record batch) in file order;
workers decode, validate and batch-encode a whole chunk and return flat numpy arrays; the main
process writes them in input order, so the bytes are identical for any ``--workers``.
Outputs appear under their final names only when complete. Ctrl-C or SIGTERM stops a run at
once and removes its temporary files; so does a failed write (read-only place, full disk).

On a cluster, split the run: ``--shard-index I --num-shards N`` tokenizes share I of the inputs
(contiguous, balanced by size) into ``{prefix}.shards/``, and ``--merge-shards`` then merges the
N shards into the same bytes one run writes (launch/slurm/preprocess.sbatch does both).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from data_tools.preprocess.pipeline import Interrupted, preprocess
from data_tools.preprocess.shards import Merged, ShardRun, merge_shards, run_shard
from data_tools.preprocess.signals import StopSignals
from data_tools.preprocess.summary import Summary
from megamoe.cli import exit_on_user_error
from megamoe.data.tokenizer import TOKENIZER_TYPES
from megamoe.errors import UserError


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="files, globs or directories of .jsonl[.gz], .parquet, .txt[.gz] (one document per line)")
    p.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help="JSON fields / parquet columns to tokenize (default: text)")
    p.add_argument("--tokenizer-type", required=True, help=f"one of {', '.join(TOKENIZER_TYPES)}")
    p.add_argument("--tokenizer-model", default=None,
                   help="tokenizer.json (HuggingFaceTokenizer) or .model (SentencePieceTokenizer)")
    p.add_argument("--eod-token", default=None, help="end-of-document token, if the tokenizer's own is not found")
    p.add_argument("--append-eod", action="store_true", help="end every document with the eod token")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--skip-bad-docs", action="store_true", help="skip malformed documents, count them, "
                   "and write them to {prefix}.rejects.jsonl (default: stop)")
    p.add_argument("--log-interval", type=int, default=100, help="update progress every N documents (default 100)")
    shards = p.add_argument_group("sharding (one SLURM array task per shard: launch/slurm/preprocess.sbatch)")
    shards.add_argument("--num-shards", type=int, default=None, metavar="N",
                        help="cut the inputs into N contiguous shares, balanced by size (whole files, or byte "
                        "ranges of plain-text and parquet files)")
    shards.add_argument("--shard-index", type=int, default=None, metavar="I",
                        help="tokenize share I into {prefix}.shards/, then write its done marker; "
                        "a no-op if that shard is already complete")
    shards.add_argument("--merge-shards", action="store_true",
                        help="merge the N complete shards into {prefix}_{key}_document (the bytes one run "
                        "writes); refuses while any is missing or was made differently")
    args = p.parse_args(argv)
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if len(set(args.json_keys)) != len(args.json_keys):
        raise UserError(f"--json-keys repeats a key: {' '.join(args.json_keys)}")
    _check_sharding(args)
    return args


def _check_sharding(args: argparse.Namespace) -> None:
    sharded = args.shard_index is not None or args.merge_shards
    if args.num_shards is None:
        if sharded:
            flag = "--merge-shards" if args.merge_shards else "--shard-index"
            raise UserError(f"{flag} needs --num-shards N (how many shards the inputs are split into)")
        return
    if args.num_shards < 1:
        raise UserError(f"--num-shards must be at least 1, got {args.num_shards}")
    if not sharded:
        raise UserError("--num-shards needs --shard-index I (tokenize one shard) or --merge-shards (merge them all)")
    if args.merge_shards and args.shard_index is not None:
        raise UserError("--merge-shards merges every shard: drop --shard-index")
    if args.shard_index is not None and not 0 <= args.shard_index < args.num_shards:
        raise UserError(f"--shard-index {args.shard_index} is out of range for --num-shards {args.num_shards} "
                        f"(0 to {args.num_shards - 1})")


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> Summary | ShardRun | Merged:
    args = parse_args(argv)
    with StopSignals() as stop:
        try:
            if args.merge_shards:
                result: Summary | ShardRun | Merged = merge_shards(args)
            elif args.shard_index is not None:
                result = run_shard(args)
            else:
                result = preprocess(args)
        except Interrupted as exc:
            print(exc, file=sys.stderr)
            sys.exit(stop.exit_code)
    summary = result.summary if isinstance(result, ShardRun) else result
    for path in summary.empty_inputs() if isinstance(summary, Summary) else ():
        print(f"warning: {path} holds no documents", file=sys.stderr)
    print(result.report())
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
