"""Weights in the compute dtype: which dtype a matmul runs in, and cast copies shared by a step.

Parameters stay fp32 (the master weights) and bf16 comes from autocast. Autocast caches its
casts only for leaf tensors; weights used through views (the expert banks' per-expert slices)
or cast by hand (the grouped GEMM) would be cast again in every forward — and, saved for
backward, kept once per micro-batch in flight. Inside :func:`shared_casts` (the trainer opens
it around one optimizer step's forward and backward passes) a :class:`CastCache` makes each
such copy once and every micro-batch uses it; on exit the copies are dropped, before the
optimizer changes the weights. An update cannot be detected from the parameter itself: the
fused AdamW kernels (torch's, apex's) write it without bumping its ``_version``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch

from megamoe.config.choices import Precision

_filled: Optional[list["CastCache"]] = None  # the caches holding a copy in the open shared_casts() scope


def autocast_dtype(precision: str, device_type: str) -> Optional[torch.dtype]:
    """What ``train.precision`` means on a device: the autocast dtype, or None for plain fp32.

    ``auto`` is bf16 autocast on CUDA and fp32 on CPU (where bf16 matmuls are slow and the tests
    compare layouts in fp32). The one place precision is resolved: the trainer asks with its
    device, the estimators with ``"cuda"`` (they model a GPU run).
    """
    if precision == Precision.AUTO:
        precision = "bf16" if device_type == "cuda" else "fp32"
    return torch.bfloat16 if precision == Precision.BF16 else None


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device`` (nothing when None)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``tensor`` runs in here: autocast's when it is on, else the tensor's own."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


@contextlib.contextmanager
def shared_casts() -> Iterator[None]:
    """Share each weight's cast copy among the passes inside; drop every copy on exit (a no-op when nested)."""
    global _filled
    if _filled is not None:
        yield
        return
    _filled = []
    try:
        yield
    finally:
        for cache in _filled:
            cache.clear()
        _filled = None


class CastCache:
    """``weight.to(dtype)``: inside :func:`shared_casts` made once and reused, else made per call.

    The shared copy is made without autograd; each pass that uses it gets it through its own
    :class:`_CopyUse` node, whose backward casts the gradient back to the weight's dtype and
    hands it on to ``weight.grad`` as soon as that pass's backward reaches it. (One
    ``ToCopyBackward`` node shared by every pass would be the oldest node of each backward: the
    autograd engine runs the ready node made last first, so it would run only at the end of each
    backward, holding every layer's copy-sized weight gradient until then: 4.9 GiB more at the
    peak of an M32 stage with all 32 experts, as the dry run measured.) The copy is made again if the weight is replaced
    or changed in place (a new storage or ``_version``). In the weight's own dtype (fp32
    training) the "copy" is the weight itself.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._key: Optional[tuple] = None
        self._copy: Optional[torch.Tensor] = None

    def __call__(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if _filled is None or dtype == weight.dtype:
            return weight.to(dtype)
        key = (dtype, weight.untyped_storage()._cdata, weight._version)
        if key != self._key:
            if self._key is None:
                _filled.append(self)
            with torch.no_grad():
                self._key, self._copy = key, weight.to(dtype)
        if torch.is_grad_enabled() and weight.requires_grad:
            return _CopyUse.apply(weight, self._copy)
        assert self._copy is not None  # made with self._key
        return self._copy


class _CopyUse(torch.autograd.Function):
    """``copy`` (a cast of ``weight``) in one pass's graph: its gradient, cast to the weight's dtype,
    goes to ``weight``."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
        ctx.dtype = weight.dtype
        return copy.view_as(copy)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.to(ctx.dtype), None
