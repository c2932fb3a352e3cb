"""Parameter initialisation that does not depend on how the model is split.

Every parameter draws its values from its own generator, seeded by a hash of its *global*
identity (seed, layer index, parameter name, global expert index). A pipeline stage that
builds only layers 12..17, or an expert-parallel rank that holds only experts 8..15, therefore
gets exactly the values the single-process model has — which is what makes "same seed, same
losses on any (dp, pp, ep) layout" testable.
"""

from __future__ import annotations

import hashlib

import torch


def init_key_seed(*key: object) -> int:
    """A stable 63-bit seed for ``key`` (unlike ``hash()``, identical across processes and runs)."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@torch.no_grad()
def seeded_normal_(tensor: torch.Tensor, std: float, *key: object) -> None:
    """Fill ``tensor`` in place with N(0, std²) drawn from a generator seeded by ``key``.

    Values are drawn on the CPU in fp32 and then copied, so they are the same on every device
    and dtype. Tensors on the meta device (model statistics, deferred init) are left alone.
    """
    if tensor.is_meta:
        return
    generator = torch.Generator(device="cpu").manual_seed(init_key_seed(*key))
    values = torch.empty(tensor.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
    tensor.copy_(values)
