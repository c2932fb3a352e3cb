"""Model families, by the name ``model.family`` selects, and the stages they build.

Each family lives in its own folder (megamoe/models/<name>/) and exports ``FAMILY``, a
:class:`megamoe.models.family.ModelFamily`; the registry below is the one line a new family adds
outside its folder. Families are imported when first asked for.
"""

from __future__ import annotations

import importlib
from typing import Optional

from megamoe.config.schema import Config, ModelConfig, MoEConfig, as_object
from megamoe.config.validate import validate
from megamoe.errors import ConfigError
from megamoe.models.family import ModelFamily
from megamoe.nn.decoder import Decoder
from megamoe.nn.moe.dispatcher import TokenExchange

__all__ = ["FAMILIES", "ModelFamily", "build_stage", "family_for_hf", "family_of", "get_family", "validate_config"]

FAMILIES: dict[str, str] = {
    "yuan": "megamoe.models.yuan",
    "qwen_moe": "megamoe.models.qwen_moe",
}


def get_family(name: str) -> ModelFamily:
    return importlib.import_module(FAMILIES[name]).FAMILY


def family_of(cfg: Config) -> ModelFamily:
    """The family of a run config (``model.family``)."""
    return get_family(cfg.model.family)


def family_for_hf(model_type: Optional[str]) -> Optional[ModelFamily]:
    """The family whose Hugging Face adapter reads config.json's ``model_type``, if any."""
    return next((f for f in map(get_family, FAMILIES) if f.hf.model_type == model_type), None)


def validate_config(cfg: Config, world_size: Optional[int] = None) -> None:
    """Every rule a config must follow, before anything starts: the config's own
    (megamoe.config.validate: ranges, options, divisibility, the layout at ``world_size``), then
    its family's (what its attention can be configured to). Raises a one-line ConfigError."""
    validate(cfg, world_size)
    family = cfg.model.family
    if family not in FAMILIES:
        raise ConfigError(f"model.family: '{family}' is not one of {', '.join(FAMILIES)}")
    get_family(family).validate(cfg)


def build_stage(cfg: Config, layers: Optional[range] = None, pre_process: bool = True, post_process: bool = True,
                exchange: Optional[TokenExchange] = None) -> Decoder:
    """The decoder layers ``layers`` of ``cfg``'s model (all of them by default), with the embedding
    when ``pre_process`` and the final norm and head when ``post_process``; parameters uninitialised
    (call ``reset_parameters(seed)``, or load a checkpoint)."""
    family = family_of(cfg)
    return Decoder(as_object(cfg.model, ModelConfig), as_object(cfg.moe, MoEConfig), family.attention,
                   cfg.train.activation_checkpointing, layers, pre_process, post_process, exchange)
