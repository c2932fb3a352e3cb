"""What incremental decoding keeps between forward calls, so each new token costs one position.

A decoder layer's output at position t depends on earlier positions only through attention
(their keys and values) and, in Yuan's LFA, through two kernel-2 causal convolutions (the
previous position's input of each). :class:`KVCache` holds exactly that per layer — K/V after
RoPE, at the K/V head count (grouped-query attention caches the smaller tensors), and the last
input of each convolution — plus, shared by all layers, which cached positions are real tokens.

A batch of prompts of different lengths is left-padded: padding positions are never attended
to by real tokens (a key padding mask), see a zero "previous token" in the convolutions, and do
not advance the position ids, so each sequence computes what it would compute alone. Call
:meth:`KVCache.advance` once per forward with the new positions' padding, then pass the cache
and the position ids it returned to ``Decoder.forward``.
"""

from __future__ import annotations

from typing import Optional

import torch


class LayerCache:
    """One layer's cached keys/values and convolution inputs, reading the step's mask from ``batch``."""

    def __init__(self, batch: KVCache) -> None:
        self.batch = batch
        self.keys: Optional[torch.Tensor] = None  # [b, kv_heads, t, d], RoPE applied
        self.values: Optional[torch.Tensor] = None
        self.last_inputs: dict[str, torch.Tensor] = {}  # convolution name → its input at the last position [b, 1, C]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this step's k, v [b, kv_heads, s, d]; return the keys and values of every position."""
        if self.keys is not None:
            assert self.values is not None  # set with the keys
            k, v = torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2)
        self.keys, self.values = k, v
        return k, v

    def previous_inputs(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The input at t-1 for each new position t of convolution ``name``: x [b, s, C] shifted
        right by one, the cached last input in front (zero before the first token and at padding)."""
        assert self.batch.new_tokens is not None, "KVCache.advance registers the positions first"
        x = x * self.batch.new_tokens[..., None].to(x.dtype)
        last = self.last_inputs.get(name, torch.zeros_like(x[:, :1]))
        self.last_inputs[name] = x[:, -1:]
        return torch.cat([last, x[:, :-1]], dim=1)

    @property
    def mask(self) -> torch.Tensor:
        """The step's attention mask [b, 1, s, t] (True = attend)."""
        assert self.batch.mask is not None, "KVCache.advance registers the positions first"
        return self.batch.mask


class KVCache:
    """The decoding state of a batch of sequences: every layer's :class:`LayerCache` and the
    key padding (which cached positions are real tokens)."""

    def __init__(self) -> None:
        self.tokens: Optional[torch.Tensor] = None  # [b, t] bool: position is a real token (not left padding)
        self.new_tokens: Optional[torch.Tensor] = None  # [b, s] the same for the positions being added
        self.mask: Optional[torch.Tensor] = None  # [b, 1, s, t] the step's attention mask
        self._layers: dict[int, LayerCache] = {}

    def __len__(self) -> int:
        """Positions cached (padding included)."""
        return 0 if self.tokens is None else self.tokens.shape[1]

    def layer(self, index: int) -> LayerCache:
        return self._layers.setdefault(index, LayerCache(self))

    def advance(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """Register s new positions (new_tokens [b, s] bool, False = padding); return their position ids [b, s].

        Position ids count each sequence's real tokens, so a left-padded prompt is numbered as if
        alone. The mask lets a query see the real tokens up to itself, and a padding query itself
        (a row with no key would give NaN, which would reach real tokens through its value).
        """
        seen = 0 if self.tokens is None else self.tokens.sum(dim=1, keepdim=True)
        positions = (seen + new_tokens.cumsum(dim=1) - 1).clamp(min=0)
        start = len(self)
        self.tokens = new_tokens if self.tokens is None else torch.cat([self.tokens, new_tokens], dim=1)
        self.new_tokens = new_tokens
        query = torch.arange(start, len(self), device=new_tokens.device)[:, None]
        key = torch.arange(len(self), device=new_tokens.device)
        self.mask = (((key <= query) & self.tokens[:, None, :]) | (key == query))[:, None]
        return positions
