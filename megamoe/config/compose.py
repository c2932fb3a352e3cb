"""Compose a run's config from configs/ and command-line overrides, with one-line errors.

We use Hydra's compose API (not ``@hydra.main``) so that every failure — an unknown key, a
wrong type, a missing experiment — becomes a single :class:`ConfigError` line that names the
key, and so that no rank creates Hydra output directories behind the user's back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megamoe.config.schema import register_configs
from megamoe.errors import ConfigError

CONFIG_DIR = Path(os.environ.get("MEGAMOE_CONFIG_DIR", Path(__file__).resolve().parents[2] / "configs"))


def _one_line(exc: BaseException) -> str:
    """Hydra/OmegaConf messages span lines; keep what names the key and the fix."""
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else exc
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    head = lines[0] if lines else type(exc).__name__
    full_key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), None)
    noise = ("Config search path", "provider=", "full_key", "reference_type", "object_type", "See https")
    options = [ln for ln in lines[1:] if not ln.startswith(noise)]
    if "Could not find" in head and options:
        return f"{head} ({' '.join(options)})"
    if full_key and full_key not in head:
        return f"{full_key}: {head}"
    return head


# Keys users type that cannot be schema fields (Python keywords) → the field that holds them.
ALIASES = {"checkpoint.async": "checkpoint.asynchronous"}

# Keys the schema no longer has → why. Configs saved with older checkpoints may still carry them;
# reading such a checkpoint drops them (megamoe.checkpoint.store.read_config).
RETIRED_KEYS = {"data.num_workers": "the loader reads in the training process; the key did nothing"}


def _unalias(override: str) -> str:
    key, sep, value = override.partition("=")
    prefix = key[:len(key) - len(key.lstrip("+~"))]
    return f"{prefix}{ALIASES.get(key.lstrip('+~'), key.lstrip('+~'))}{sep}{value}"


def compose(overrides: Sequence[str] = (), config_dir: Path | str = CONFIG_DIR) -> DictConfig:
    """Compose configs/config.yaml with ``overrides`` (e.g. ``["+exp=tiny", "train.steps=5"]``).

    Returns a read-only, fully resolved structured config. Raises ConfigError on any mistake.
    """
    register_configs()
    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base=None):
            cfg = hydra_compose("config", overrides=[_unalias(o) for o in overrides])
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_one_line(exc)) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]}: required value is missing; "
                          f"set it in the experiment yaml or as {missing[0]}=...")
    OmegaConf.set_readonly(cfg, True)
    return cfg
