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
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from data_tools.preprocess.pipeline import Interrupted, preprocess
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
    args = p.parse_args(argv)
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if len(set(args.json_keys)) != len(args.json_keys):
        raise UserError(f"--json-keys repeats a key: {' '.join(args.json_keys)}")
    return args


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> Summary:
    args = parse_args(argv)
    with StopSignals() as stop:
        try:
            summary = preprocess(args)
        except Interrupted as exc:
            print(exc, file=sys.stderr)
            sys.exit(stop.exit_code)
    for path in summary.empty_inputs():
        print(f"warning: {path} holds no documents", file=sys.stderr)
    print(summary.report())
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
