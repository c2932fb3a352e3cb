"""Tokenizers behind one small interface: text ↔ ids, vocabulary size, end-of-document id.

Three backends: a Hugging Face ``tokenizers`` JSON file (real runs), a sentencepiece ``.model``
(Yuan 2.0's own tokenizer is one), and a byte tokenizer that needs no file (tests, the demo).
Special tokens are found by *role* ("eod", "pad", "fim_prefix", ...) among each tokenizer's
own spellings, so data tools and FIM augmentation never hard-code ids. Each backend can also
give its vocabulary in the Hugging Face layout (:meth:`Tokenizer.hf_vocabulary`), which
``to-hf`` exports with the model.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Optional

from megamoe.config.choices import TokenizerType
from megamoe.errors import UserError

TOKENIZER_TYPES = ("HuggingFaceTokenizer", "SentencePieceTokenizer", "ByteTokenizer")
VOCAB_PAD_MULTIPLE = 128  # embedding rows are padded so GEMMs tile well (Megatron's --make-vocab-size-divisible-by)
FAST_TOKENIZER = "PreTrainedTokenizerFast"  # transformers' class for a tokenizer.json

# Each role's spellings across common tokenizers, in the order they are tried.
SPECIAL_SPELLINGS: dict[str, tuple[str, ...]] = {
    "eod": ("<eod>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|im_end|>"),
    "pad": ("<pad>", "<|pad|>", "[PAD]"),
    "sep": ("<sep>", "[SEP]"),
    "fim_prefix": ("<fim_prefix>", "<FIM_PREFIX>", "<|fim_prefix|>"),
    "fim_middle": ("<fim_middle>", "<FIM_MIDDLE>", "<|fim_middle|>"),
    "fim_suffix": ("<fim_suffix>", "<FIM_SUFFIX>", "<|fim_suffix|>"),
    "fim_pad": ("<fim_pad>", "<FIM_PAD>", "<|fim_pad|>"),
}


def pad_vocab_size(vocab_size: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    """Smallest multiple of ``multiple`` that holds ``vocab_size`` ids."""
    return -(-vocab_size // multiple) * multiple


class Tokenizer(ABC):
    """Common interface. Subclasses load their backend, then call ``super().__init__``."""

    def __init__(self, name: str, eod_token: Optional[str]) -> None:
        self.name = name  # shown in error messages: the model path, or the type for ByteTokenizer
        self.eod_id = self._resolve_eod(eod_token)

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (before padding)."""

    @abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without BOS/EOS: documents are joined by the data tools."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens are spelled out so document boundaries stay visible."""

    @abstractmethod
    def spelling(self, token_id: int) -> str:
        """How the vocabulary writes ``token_id`` (a special token's name, e.g. ``<eod>``)."""

    @abstractmethod
    def hf_vocabulary(self) -> tuple[str, dict[str, bytes]]:
        """The vocabulary as Hugging Face files: the transformers tokenizer class that reads them,
        and the files by name. Encoding with that class gives this tokenizer's ids (text that
        spells a special token out is the exception: transformers matches it as that token)."""

    @abstractmethod
    def _special_token_id(self, spelling: str) -> Optional[int]:
        """Id of ``spelling`` if it is one of the tokenizer's special (added/control) tokens."""

    @abstractmethod
    def _vocab_id(self, spelling: str) -> Optional[int]:
        """Id of ``spelling`` anywhere in the vocabulary (for an eod token the user names)."""

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    @property
    def padded_vocab_size(self) -> int:
        return pad_vocab_size(self.vocab_size)

    def special_id(self, role: str) -> Optional[int]:
        """Id of the special token playing ``role`` (a key of SPECIAL_SPELLINGS), or None if absent."""
        if role == "eod":
            return self.eod_id
        return self._find_special(role)

    def _find_special(self, role: str) -> Optional[int]:
        for spelling in SPECIAL_SPELLINGS[role]:
            token_id = self._special_token_id(spelling)
            if token_id is not None:
                return token_id
        return None

    def _resolve_eod(self, eod_token: Optional[str]) -> int:
        if eod_token is not None:
            token_id = self._vocab_id(eod_token)
            if token_id is None:
                raise UserError(f"{self.name}: eod token {eod_token!r} is not in the vocabulary")
            return token_id
        token_id = self._find_special("eod")
        if token_id is None:
            raise UserError(f"{self.name}: no end-of-document token among its special tokens "
                            f"(looked for {', '.join(SPECIAL_SPELLINGS['eod'])}); "
                            f"name one with --eod-token or data.tokenizer.eod_token")
        return token_id


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then the special tokens; needs no file."""

    SPECIALS = ("<eod>", "<pad>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>")

    def __init__(self, eod_token: Optional[str] = None) -> None:
        self._special_ids = {spelling: 256 + i for i, spelling in enumerate(self.SPECIALS)}
        self._spellings = dict(enumerate(self.SPECIALS, start=256))
        super().__init__("ByteTokenizer", eod_token)

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.SPECIALS)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        out, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run.clear()
            out.append(self._spellings[int(i)])
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def spelling(self, token_id: int) -> str:
        return self._spellings.get(token_id) or bytes([token_id]).decode("latin-1")

    def hf_vocabulary(self) -> tuple[str, dict[str, bytes]]:
        """A byte-level BPE without merges: each UTF-8 byte is one token whose id is the byte (the
        vocabulary spells byte b as GPT-2's printable stand-in character for it), then the
        special tokens."""
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        tok = HFTokenizer(models.BPE(vocab={char: byte for byte, char in _byte_chars().items()}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in self.SPECIALS])
        return FAST_TOKENIZER, {"tokenizer.json": tok.to_str(pretty=True).encode()}

    def _special_token_id(self, spelling: str) -> Optional[int]:
        return self._special_ids.get(spelling)

    _vocab_id = _special_token_id


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character — itself when printable
    Latin-1, else the next code point from 256 on, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    stand_ins = iter(range(256, 512))
    return {byte: chr(byte if byte in printable else next(stand_ins)) for byte in range(256)}


class HuggingFaceTokenizer(Tokenizer):
    """A ``tokenizers`` JSON file (``tokenizer.json``)."""

    def __init__(self, path: str, eod_token: Optional[str] = None) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(path)
        except Exception as exc:  # the Rust loader raises plain Exception subclasses
            raise UserError(f"cannot load Hugging Face tokenizer {path}: {exc}") from exc
        self._specials = {tok.content: i for i, tok in self._tok.get_added_tokens_decoder().items() if tok.special}
        # encode_batch_fast skips offset bookkeeping we never use (tokenizers >= 0.20).
        self._encode_batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        super().__init__(path, eod_token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self._encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def spelling(self, token_id: int) -> str:
        spelling = self._tok.id_to_token(token_id)
        assert spelling is not None, f"token id {token_id} is outside the vocabulary"
        return spelling

    def hf_vocabulary(self) -> tuple[str, dict[str, bytes]]:
        """The tokenizer.json, without a post-processor that adds tokens (a BOS, say): training
        never saw those, and transformers would add them to every ``encode``."""
        config = json.loads(self._tok.to_str())
        probe = "a b"
        if self._tok.encode(probe, add_special_tokens=True).ids != self.encode(probe):
            config["post_processor"] = None
        return FAST_TOKENIZER, {"tokenizer.json": json.dumps(config, ensure_ascii=False, indent=2).encode()}

    def _special_token_id(self, spelling: str) -> Optional[int]:
        return self._specials.get(spelling)

    def _vocab_id(self, spelling: str) -> Optional[int]:
        return self._tok.token_to_id(spelling)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model`` file."""

    def __init__(self, path: str, eod_token: Optional[str] = None) -> None:
        import sentencepiece

        try:
            # One thread: preprocessing parallelises over worker processes, which a pool would oversubscribe.
            self._sp = sentencepiece.SentencePieceProcessor(model_file=path, num_threads=1)
        except Exception as exc:  # sentencepiece raises OSError or RuntimeError depending on the failure
            raise UserError(f"cannot load sentencepiece model {path}: {exc}") from exc
        super().__init__(path, eod_token)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        # Decode between special pieces and spell those out: sentencepiece would drop control pieces.
        out: list[str] = []
        run: list[int] = []
        for i in map(int, ids):
            if self._sp.is_control(i):
                out.append(self._sp.decode(run))
                run = []
                out.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)

    def spelling(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def hf_vocabulary(self) -> tuple[str, dict[str, bytes]]:
        """The model file as ``tokenizer.model``, read by transformers' sentencepiece class (no
        conversion to another format, which would tokenize some whitespace differently)."""
        return "SentencePieceBackend", {"tokenizer.model": self._sp.serialized_model_proto()}

    def _special_token_id(self, spelling: str) -> Optional[int]:
        # User-defined symbols look like normal pieces in the Python API, so any exact piece counts.
        return self._vocab_id(spelling)

    def _vocab_id(self, spelling: str) -> Optional[int]:
        token_id = self._sp.piece_to_id(spelling)
        if token_id == self._sp.unk_id() and spelling != self._sp.id_to_piece(token_id):
            return None
        return token_id


def build_tokenizer(type: str, model: Optional[str] = None, eod_token: Optional[str] = None) -> Tokenizer:
    """The tokenizer named by ``type`` (one of TOKENIZER_TYPES); every user mistake is one UserError line."""
    if type not in TOKENIZER_TYPES:
        raise UserError(f"unknown tokenizer type {type!r}; choose one of {', '.join(TOKENIZER_TYPES)}")
    if type == TokenizerType.BYTE:
        if model is not None:
            raise UserError(f"ByteTokenizer needs no model file, but got {model!r}; drop --tokenizer-model "
                            f"(data.tokenizer.model) or choose another tokenizer type")
        return ByteTokenizer(eod_token)
    if model is None:
        raise UserError(f"{type} needs a model file: pass --tokenizer-model (data.tokenizer.model)")
    if not os.path.isfile(model):
        raise UserError(f"tokenizer model not found: {model}")
    cls = HuggingFaceTokenizer if type == TokenizerType.HUGGING_FACE else SentencePieceTokenizer
    return cls(model, eod_token)


def tokenizer_from_config(cfg: Any) -> Tokenizer:
    """The tokenizer of a ``cfg.data.tokenizer`` node (DictConfig or TokenizerConfig)."""
    return build_tokenizer(cfg.type, cfg.model, cfg.eod_token)
