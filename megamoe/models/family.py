"""The seam between megamoe and a model family.

The trainer, the pipeline, the checkpoint store, the FLOP / memory estimators, the planner and
the converters reach a model only through a :class:`ModelFamily`, picked by ``model.family``
from the registry in :mod:`megamoe.models`. A family is one folder, ``megamoe/models/<name>/``:

- its attention block (the decoder skeleton, the MoE layer and the loss are shared:
  megamoe.nn), built from the typed ``model`` section of the config;
- its accounting: the attention block's parameters and what it saves for backward, which the
  shared estimators (megamoe.estimators.flops, megamoe.estimators.memory) add to the common parts;
- its config rules (what its attention can and cannot be configured to);
- its Hugging Face adapter: tensor names and shapes to and from the architecture's own layout,
  and config.json both ways.

Adding a family: write the folder (see docs/model_families.md for Qwen-MoE's as the example)
and add one line to :data:`megamoe.models.FAMILIES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from omegaconf import DictConfig

from megamoe.config.schema import Config, ModelConfig
from megamoe.models.hf_mapping import TokenIds
from megamoe.nn.decoder import AttentionFactory

Tensors = Iterable[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class Part:
    """One row of a parameter breakdown: parameters stored, passed through per token, and used
    as matmul weights per token (2 FLOPs each forward); megamoe.estimators.flops states the rules."""

    total: int
    active: int
    matmul: int  # per token; a tied head's matmul counts the embedding's parameters here


@dataclass(frozen=True)
class HFAdapter:
    """One Hugging Face architecture ↔ megamoe's layout-independent checkpoint tensors.

    ``to_hf`` / ``from_hf`` map streams of (name, tensor), holding as little as they can;
    ``check_exportable`` raises ConfigError (naming the key and the setting that would do) for
    what the architecture cannot express; ``hf_config`` writes config.json for a run config and
    its tokenizer's special ids (checking first) and ``config_from_hf`` reads it back as
    ``model`` / ``moe`` sections (raising UserError naming the config.json key it cannot build).
    """

    architecture: str  # config.json "architectures", e.g. "YuanForCausalLM"
    model_type: str  # config.json "model_type", e.g. "yuan"
    to_hf: Callable[[Tensors, DictConfig], Iterator[tuple[str, torch.Tensor]]]
    from_hf: Callable[[Tensors, DictConfig], Iterator[tuple[str, torch.Tensor]]]
    check_exportable: Callable[[DictConfig], None]
    hf_config: Callable[[DictConfig, TokenIds], dict[str, Any]]
    config_from_hf: Callable[[dict[str, Any], str], dict[str, dict[str, Any]]]
    ignored: Callable[[str, bool], bool] = field(default=lambda name, tied: False)  # HF tensors to skip (name, tied)


@dataclass(frozen=True)
class ModelFamily:
    """Everything the framework needs to know about one family of models."""

    name: str
    attention: AttentionFactory  # a decoder layer's attention block
    attention_parts: Callable[[ModelConfig], dict[str, Part]]  # its parameters per layer, by estimator row
    attention_bytes: Callable[[ModelConfig, int], int]  # bytes it saves for backward per token (activation bytes)
    attention_cast_per_forward: Callable[[ModelConfig], int]  # its parameters cast again in every forward
    validate: Callable[[Config], None]  # its config rules: raise ConfigError naming the key
    hf: HFAdapter
