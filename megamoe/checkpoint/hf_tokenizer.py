"""The run's tokenizer as Hugging Face files, so an export loads with ``AutoTokenizer`` and
``generate`` stops where ours does.

- the vocabulary (each backend's own: ``tokenizer.json`` for our BPE and byte tokenizers,
  ``tokenizer.model`` for sentencepiece — megamoe.data.tokenizer.Tokenizer.hf_vocabulary);
- ``tokenizer_config.json`` and ``special_tokens_map.json``: the transformers class, the
  end-of-document token as bos, eos and pad (what precedes every document in training, ends a
  generation, pads a batch), no automatic bos / eos (training added none), no clean-up of
  spaces in decoding (ours keeps them);
- ``generation_config.json``: the same ids, and the embedding's padding rows (ids past the
  tokenizer's) suppressed, as our decoding never samples them.
"""

from __future__ import annotations

import json
from typing import Any

from megamoe.data.tokenizer import Tokenizer
from megamoe.models.hf_mapping import TokenIds

TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"


def token_ids(tokenizer: Tokenizer) -> TokenIds:
    """The special ids config.json records."""
    return TokenIds(eod=tokenizer.eod_id, sep=tokenizer.special_id("sep"))


def _json(value: dict[str, Any]) -> bytes:
    return (json.dumps(value, ensure_ascii=False, indent=2) + "\n").encode()


def tokenizer_files(tokenizer: Tokenizer, max_length: int) -> dict[str, bytes]:
    """The vocabulary, tokenizer_config.json and special_tokens_map.json, by file name;
    ``max_length`` is the model's positions."""
    tokenizer_class, files = tokenizer.hf_vocabulary()
    eod = tokenizer.spelling(tokenizer.eod_id)
    specials = {"bos_token": eod, "eos_token": eod, "pad_token": eod}
    config = {"tokenizer_class": tokenizer_class, **specials, "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": max_length}
    return {**files, TOKENIZER_CONFIG: _json(config), SPECIAL_TOKENS_MAP: _json(specials)}


def generation_config(tokenizer: Tokenizer, model_vocab_size: int) -> bytes:
    """generation_config.json: the special ids, and the padding rows of a ``model_vocab_size``
    embedding suppressed."""
    padding_rows = list(range(tokenizer.vocab_size, model_vocab_size))
    return _json({**token_ids(tokenizer).llama_ids(), **({"suppress_tokens": padding_rows} if padding_rows else {})})
