"""Fake CUDA tensors on a CPU-only torch: what a forward needs that such a build lacks.

A CPU-only build has no CUDA device guard, which a few things ask for even on fake tensors:
Python indexing (``x[..., :n]``, ``x[i] = y``: the binding guards the device), ``~x`` and
``x.contiguous()``, nn.init's default initialisers (they draw on the device's generator) and
``torch.autocast("cuda")`` (it turns itself off without a GPU). :class:`CudaShims` routes
indexing through the equivalent view ops and ``aten.index`` / ``aten.index_put_``, the other
bindings to their aten ops, skips nn.init, and :func:`cuda_autocast` sets CUDA autocast's state
directly. Autograd's graph wants the guard
too (the process aborts), so forwards run without gradients.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from torch.overrides import TorchFunctionMode

aten = torch.ops.aten


def _basic(x: torch.Tensor, index: Any) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """``x[index]``'s ints, slices, None and Ellipsis as view ops; its tensor indices by the dim they index."""
    index = index if isinstance(index, tuple) else (index,)
    named = sum(1 for i in index if i is not None and i is not Ellipsis)
    dim, tensors = 0, {}
    for i in index:
        if i is Ellipsis:
            dim += x.dim() - named
        elif i is None:
            x, dim = x.unsqueeze(dim), dim + 1
        elif isinstance(i, int):
            x = x.select(dim, i)
        elif isinstance(i, slice):
            start, stop, step = i.indices(x.shape[dim])
            x, dim = aten.slice(x, dim, start, stop, step), dim + 1
        else:
            tensors[dim], dim = i, dim + 1
    return x, tensors


def _advanced(tensors: dict[int, torch.Tensor]) -> list[Optional[torch.Tensor]]:
    return [tensors.get(d) for d in range(max(tensors) + 1)]


# Bindings that guard the device before reaching aten, sent to their aten ops.
ROUTED = {torch.Tensor.__invert__: aten.bitwise_not.default, torch.Tensor.contiguous: aten.contiguous.default}


class CudaShims(TorchFunctionMode):
    """Indexing and the bindings above without the device guard, and no nn.init (module docstring)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        if func is torch.Tensor.__getitem__:
            view, tensors = _basic(*args)
            return aten.index(view, _advanced(tensors)) if tensors else view
        if func is torch.Tensor.__setitem__:
            target, index, value = args
            view, tensors = _basic(target, index)
            if not isinstance(value, torch.Tensor):
                value = torch.full((), value, dtype=target.dtype, device=target.device)
            return aten.index_put_(view, _advanced(tensors), value) if tensors else aten.copy_(view, value)
        return ROUTED.get(func, func)(*args, **kwargs)


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype = torch.bfloat16) -> Iterator[None]:
    """``torch.autocast("cuda", dtype)`` without asking whether a GPU is there."""
    before = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", before[0])
        torch.set_autocast_dtype("cuda", before[1])
