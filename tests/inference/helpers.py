"""Models whose greedy continuations vary from token to token, so agreeing outputs mean something."""

from __future__ import annotations

import torch

from megamoe.config import compose
from megamoe.nn.decoder import Decoder
from tests.models.helpers import random_model

FAMILIES = ["+exp=tiny", "+exp=qwen_moe_tiny"]


def lively_model(overrides: list[str], seed: int = 0) -> Decoder:
    """A random model with larger weights than at initialisation: a near-uniform model repeats
    one token, which a broken cache would repeat too."""
    model = random_model(compose(overrides), seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model


def prompts(lengths: tuple[int, ...] = (7, 2, 4), seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=generator).tolist() for n in lengths]
