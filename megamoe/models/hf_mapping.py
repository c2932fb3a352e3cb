"""What the families' Hugging Face adapters share: name tables, pairing, config.json checks and
the special token ids.

Hugging Face decoders descended from Llama (Yuan, Qwen2-MoE, …) name the parts of megamoe's
shared decoder skeleton alike (:data:`LLAMA_NAMES`); each family adds its attention and FFN
names. A :class:`NameTable` maps our layout-independent names to an architecture's and back,
from templates where ``{i}`` is the layer index and ``{e}`` the expert. A :class:`PairBuffer`
keeps the first of two tensors that convert together (Yuan's q and k, Qwen-MoE's gate and up
projections) until its partner arrives: the only tensors a streaming conversion holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, NoReturn, Optional

import torch

from megamoe.errors import ConfigError, UserError

# Our name → the Llama-style HF name, for the parts every family's decoder has.
LLAMA_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "layers.{i}.input_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.post_attn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    **{f"layers.{{i}}.attn.{p}.weight": f"model.layers.{{i}}.self_attn.{p}.weight"
       for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
}

_INDEX = re.compile(r"\b(layers|experts)\.(\d+)\b")
_PLACEHOLDER = {"layers": "i", "experts": "e"}


def _template(name: str) -> tuple[str, dict[str, str]]:
    """``model.layers.3.mlp.experts.5.w`` → (``model.layers.{i}.mlp.experts.{e}.w``, {i: 3, e: 5})."""
    index: dict[str, str] = {}

    def placeholder(match: re.Match) -> str:
        index[_PLACEHOLDER[match[1]]] = match[2]
        return f"{match[1]}.{{{_PLACEHOLDER[match[1]]}}}"

    return _INDEX.sub(placeholder, name), index


class NameTable:
    """Our names ↔ one HF architecture's, from ``{ours template: HF template}``."""

    def __init__(self, architecture: str, names: dict[str, str]) -> None:
        self.architecture = architecture
        self._hf = names
        self._ours = {hf: ours for ours, hf in names.items()}

    @staticmethod
    def _map(name: str, table: dict[str, str]) -> Optional[str]:
        template, index = _template(name)
        return table[template].format(**index) if template in table else None

    def get_hf(self, name: str) -> Optional[str]:
        return self._map(name, self._hf)

    def get_ours(self, name: str) -> Optional[str]:
        return self._map(name, self._ours)

    def hf(self, name: str) -> str:
        """Our name → the HF name; UserError when the architecture has no such tensor."""
        if (hf := self.get_hf(name)) is None:
            raise UserError(f"{name}: this tensor has no counterpart in the {self.architecture} Hugging Face layout")
        return hf

    def ours(self, name: str) -> str:
        """The HF name → ours; UserError when it is not one of the architecture's tensors."""
        if (ours := self.get_ours(name)) is None:
            raise UserError(f"{name}: not a {self.architecture} Hugging Face tensor name")
        return ours


class PairBuffer:
    """Holds the first tensor of each pair, by key, until the second arrives.

    ``names`` says what the two slots are called, for the error of a pair left incomplete.
    """

    def __init__(self, names: tuple[str, str]) -> None:
        self.names = names
        self.pending: dict[str, dict[int, torch.Tensor]] = {}

    def add(self, key: str, slot: int, tensor: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Keep ``tensor`` as slot 0 or 1 of pair ``key``; return the pair once both are in."""
        pair = self.pending.setdefault(key, {})
        pair[slot] = tensor
        if len(pair) < 2:
            return None
        del self.pending[key]
        return pair[0], pair[1]

    def check_empty(self) -> None:
        """At the end of the stream: every pair completed, or UserError naming the first that is not."""
        for key, pair in self.pending.items():
            have, missing = self.names if 0 in pair else self.names[::-1]
            raise UserError(f"{key}: found {have} but not {missing}; the checkpoint is incomplete")


def refuse_unexportable(architecture: str, problems: list[tuple[bool, str, str, str]]) -> None:
    """Raise ConfigError for the first (bad, key, value, why) that is bad: the setting ``key``
    (which has ``value``) cannot be written in the architecture's format, because ``why``."""
    for bad, key, value, why in problems:
        if bad:
            raise ConfigError(f"{key}: {value} cannot be exported to the {architecture} Hugging Face format: {why}")


@dataclass(frozen=True)
class TokenIds:
    """The special ids a config.json records, from the run's tokenizer: its end-of-document id is
    bos, eos and pad — what precedes every document in training, what ends a generation, what
    pads a batch — and ``sep`` its separator token, if it has one."""

    eod: int
    sep: Optional[int] = None

    def llama_ids(self) -> dict[str, int]:
        """``bos_token_id``, ``eos_token_id`` and ``pad_token_id``, as Llama-style configs name them."""
        return {"bos_token_id": self.eod, "eos_token_id": self.eod, "pad_token_id": self.eod}


# config.json values that are training settings, not architecture: from-hf carries them over
# (config_from_hf returns them with the architecture), but the run's explicit overrides win.
TRAINING_KEYS = ("model.init_std", "moe.aux_loss_coeff")

_MISSING = object()


class HFConfigReader:
    """Reads an HF config.json (dotted keys reach into nested sections), failing with one line
    that names the file and the key."""

    def __init__(self, config: dict[str, Any], source: str, architecture: str) -> None:
        self.config, self.source, self.architecture = config, source, architecture

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """The value of ``key``; ``default`` when it is absent, or UserError without a default."""
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                if default is _MISSING:
                    raise UserError(f"{self.source}: '{key}' is missing; a {self.architecture} config.json needs it")
                return default
            node = node[part]
        return node

    def present(self, keys: dict[str, str]) -> dict[str, Any]:
        """``{ours: value}`` for each ``{config.json key: ours}`` that config.json holds."""
        return {ours: self.get(key) for key, ours in keys.items() if self.get(key, None) is not None}

    def refuse(self, key: str, message: str) -> NoReturn:
        raise UserError(f"{self.source}: '{key}' {message}; megamoe cannot build this model")

    def expect(self, key: str, wanted: Any, why: str) -> None:
        """Refuse ``key`` unless it is absent or ``wanted``; ``why`` completes "is VALUE: ..."."""
        if self.get(key, wanted) != wanted:
            self.refuse(key, f"is {self.get(key)!r}: {why}")
