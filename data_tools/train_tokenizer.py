"""Train a byte-level BPE tokenizer (Hugging Face ``tokenizers``) on a corpus; writes tokenizer.json.

Suited to mixed Chinese / English / code: byte-level, so any UTF-8 text encodes with no unknown
token and decodes to the same bytes (no normalizer, no lowercasing); digits are split one by one
so numbers tokenize consistently. Special tokens: <eod> <pad> and the FIM sentinels.

    python -m data_tools.train_tokenizer --input demo_data/raw --vocab-size 4096 --output tokenizer.json

Reads the same inputs as preprocess_data.py (.jsonl[.gz], .parquet, .txt[.gz]; files, globs, directories).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from typing import Iterator, Optional, Sequence

from data_tools.preprocess.parsers import parse_chunk
from data_tools.preprocess.readers import expand_inputs, read_chunks
from megamoe.cli import exit_on_user_error
from megamoe.data.tokenizer import ByteTokenizer, pad_vocab_size
from megamoe.errors import UserError

SPECIAL_TOKENS = list(ByteTokenizer.SPECIALS)  # the same roles as the byte tokenizer: <eod> <pad> <fim_*>


def corpus_batches(paths: Sequence[str], keys: Sequence[str], skip_bad_docs: bool,
                   rejected: Counter) -> Iterator[list[str]]:
    """Texts of every usable document, a chunk at a time; bad documents stop the run or are counted."""
    for chunk in read_chunks(expand_inputs(paths), keys):
        parsed = parse_chunk(chunk, keys)
        if parsed.rejects and not skip_bad_docs:
            raise UserError(f"{parsed.rejects[0]} (pass --skip-bad-docs to skip such documents)")
        rejected.update(r.kind for r in parsed.rejects)
        for column in parsed.columns:
            yield column


def train(paths: Sequence[str], vocab_size: int, output: str, keys: Sequence[str] = ("text",),
          min_frequency: int = 2, skip_bad_docs: bool = False, show_progress: bool = True) -> tuple[int, Counter]:
    """Train and save to ``output`` (a temporary name, then renamed); returns (vocab size reached, rejected counts).

    The vocabulary can end below ``vocab_size`` when the corpus has fewer mergeable pairs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    floor = 256 + len(SPECIAL_TOKENS)
    if vocab_size <= floor:
        raise UserError(f"--vocab-size must exceed {floor} (256 bytes + {len(SPECIAL_TOKENS)} special tokens), "
                        f"got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    rejected: Counter = Counter()
    tokenizer.train_from_iterator(corpus_batches(paths, keys, skip_bad_docs, rejected), trainer)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = output + ".tmp"
    tokenizer.save(tmp)
    os.replace(tmp, output)
    return tokenizer.get_vocab_size(), rejected


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files, globs or directories (as preprocess_data.py)")
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help="JSON fields / parquet columns to train on (default: text)")
    p.add_argument("--vocab-size", type=int, required=True, help="size of the vocabulary, special tokens included")
    p.add_argument("--output", required=True, help="where to write tokenizer.json")
    p.add_argument("--min-frequency", type=int, default=2, help="merges seen fewer times are not learned (default 2)")
    p.add_argument("--skip-bad-docs", action="store_true", help="skip malformed documents instead of stopping")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    vocab, rejected = train(args.input, args.vocab_size, args.output, args.json_keys, args.min_frequency,
                            args.skip_bad_docs)
    skipped = f", skipped {sum(rejected.values()):,} bad documents" if rejected else ""
    print(f"trained byte-level BPE, vocab {vocab:,} (model.vocab_size ≥ {pad_vocab_size(vocab):,}) → {args.output} "
          f"in {time.perf_counter() - start:.1f} s{skipped}")


if __name__ == "__main__":
    main(sys.argv[1:])
