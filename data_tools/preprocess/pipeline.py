"""The whole run: inputs → chunks → workers (parse, tokenize) → outputs in input order."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from data_tools.preprocess.encoder import encode_chunk, init_worker_encoder
from data_tools.preprocess.parsers import Reject
from data_tools.preprocess.pool import ordered_map
from data_tools.preprocess.readers import Piece, expand_inputs, input_format, lines_before, read_chunks
from data_tools.preprocess.summary import Summary
from data_tools.preprocess.writer import Outputs, WriteFailed, output_prefix, rejects_file_path
from megamoe.data.indexed import best_dtype
from megamoe.data.tokenizer import build_tokenizer
from megamoe.errors import UserError


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a run; raised once its temporary files are gone, with the line to show."""


def input_paths(args: argparse.Namespace) -> list[Path]:
    """The input files, checked against the --json-keys they must hold."""
    paths = expand_inputs(args.input)
    if len(args.json_keys) > 1 and any(input_format(p) == "txt" for p in paths):
        raise UserError("a .txt input holds one document per line with no fields; give a single --json-keys key")
    return paths


def no_documents(pieces: Sequence[Piece]) -> str:
    if len(pieces) == 1:
        return f"{pieces[0]} holds no documents; nothing was written"
    names = ", ".join(map(str, pieces[:3])) + (", ..." if len(pieces) > 3 else "")
    return f"none of the {len(pieces)} inputs ({names}) holds a document; nothing was written"


def preprocess(args: argparse.Namespace) -> Summary:
    """Run the whole pipeline. Raises UserError (one line) for a user mistake, and for a bad
    document unless --skip-bad-docs; Interrupted for Ctrl-C, once nothing is left behind."""
    return tokenize_pieces(args, [Piece(path) for path in input_paths(args)], args.output_prefix)


def tokenize_pieces(args: argparse.Namespace, pieces: Sequence[Piece], prefix: str,
                    require_documents: bool = True) -> Summary:
    """:func:`preprocess` of ``pieces`` into datasets named after ``prefix`` (one shard's, say).
    Without ``require_documents``, pieces with no document at all give empty datasets."""
    summary = Summary([output_prefix(prefix, key) for key in args.json_keys], rejects_file_path(prefix))
    try:
        _tokenize(args, summary, pieces, require_documents)
    except KeyboardInterrupt:
        raise Interrupted(summary.unfinished()) from None
    except WriteFailed as failed:
        raise UserError(failed.message()) from failed.error
    return summary


def _tokenize(args: argparse.Namespace, summary: Summary, pieces: Sequence[Piece], require_documents: bool) -> None:
    """Tokenize the pieces into the outputs, filling in ``summary``."""
    tokenizer_args = (args.tokenizer_type, args.tokenizer_model, args.eod_token)
    tokenizer = build_tokenizer(*tokenizer_args)  # fail fast here, not in a worker
    summary.inputs = list(pieces)
    summary.input_size = sum(piece.size() for piece in pieces)
    line_numbers = FileLineNumbers(pieces)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:  # on any error: workers stopped, temporaries removed
        outputs = stack.enter_context(Outputs(summary, best_dtype(tokenizer.vocab_size)))
        bar = stack.enter_context(tqdm(total=summary.input_size, unit="B", unit_scale=True,
                                       desc="tokenizing", dynamic_ncols=True))
        encoded = stack.enter_context(contextlib.closing(ordered_map(
            encode_chunk, read_chunks(pieces, args.json_keys), args.workers,
            init_worker_encoder, (args.json_keys, tokenizer_args, args.append_eod))))
        shown_docs, shown_bytes = 0, 0
        for enc in encoded:
            if enc.rejects:
                enc.rejects = line_numbers.of(enc.rejects)
                if not args.skip_bad_docs:
                    raise UserError(f"{enc.rejects[0]} (pass --skip-bad-docs to skip and count such documents)")
            outputs.write(enc)
            summary.add(enc)
            if summary.documents - shown_docs >= args.log_interval:
                summary.elapsed = time.perf_counter() - start
                bar.set_postfix_str(summary.rates(), refresh=False)
                bar.update(summary.input_bytes - shown_bytes)
                shown_docs, shown_bytes = summary.documents, summary.input_bytes
        bar.update(summary.input_bytes - shown_bytes)
        if require_documents and len(summary.empty_inputs()) == len(pieces):
            raise UserError(no_documents(pieces))
    summary.elapsed = time.perf_counter() - start
    summary.bytes_written = sum(os.path.getsize(f"{p}{ext}") for p in summary.outputs for ext in (".bin", ".idx"))


class FileLineNumbers:
    """Renumbers the rejects of text ranges (counted from the range's first line) by the file's
    lines. The lines before a range are counted at its first reject only: it means reading the
    file up to there."""

    def __init__(self, pieces: Sequence[Piece]) -> None:
        self._starts = {str(p.path): p.start for p in pieces if p.start and input_format(p.path) != "parquet"}
        self._before: dict[str, int] = {}

    def of(self, rejects: list[Reject]) -> list[Reject]:
        path = rejects[0].path  # a chunk's rejects come from one file
        if path not in self._starts:
            return rejects
        if path not in self._before:
            self._before[path] = lines_before(Path(path), self._starts[path])
        return [dataclasses.replace(r, line=r.line + self._before[path]) for r in rejects]
