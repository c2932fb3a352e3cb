"""Configuration: typed schema, composition from configs/, and cross-field validation."""

from megamoe.config.compose import CONFIG_DIR, compose
from megamoe.config.schema import MegaMoEConfig, register_configs
from megamoe.config.validate import validate
from megamoe.errors import ConfigError

__all__ = ["CONFIG_DIR", "ConfigError", "MegaMoEConfig", "compose", "register_configs", "validate"]
