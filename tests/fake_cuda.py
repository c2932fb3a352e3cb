"""Fake CUDA tensors on a CPU-only torch, for forward passes that check shapes and devices.

Under ``FakeTensorMode`` a tensor can live on ``cuda:0`` without a GPU: every aten op computes
only its output's metadata. A few of the Python bindings, though, set up a device guard before
anything reaches aten — indexing ``x[...]``, ``~x``, ``x.contiguous()`` — and a CPU-only torch
has no CUDA guard to set up. :class:`FakeCuda` sends those calls to the aten ops directly.
Backward through fake CUDA tensors still aborts, so tests run forwards only (``no_grad``).

    model = model.requires_grad_(False)
    with FakeTensorMode(allow_non_fake_inputs=True), FakeCuda(), torch.no_grad():
        out = model.to("cuda:0")(torch.zeros(2, 64, dtype=torch.long, device="cuda"))
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

aten = torch.ops.aten


def basic_index(x: Tensor, index: Any) -> Tensor:
    """``x[index]`` for ints, slices, ``None`` and ``...`` (the indexing model code uses), as aten views."""
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, (Tensor, list, bool)) for i in index):
        raise NotImplementedError(f"FakeCuda: advanced indexing {index!r}")
    out, dim = x, 0
    for i in index:
        if i is None:
            out, dim = aten.unsqueeze.default(out, dim), dim + 1
        elif i is Ellipsis:
            dim += x.dim() - sum(1 for j in index if j is not None and j is not Ellipsis)
        elif isinstance(i, int):
            out = aten.select.int(out, dim, i)
        else:
            out, dim = aten.slice.Tensor(out, dim, i.start, i.stop, i.step or 1), dim + 1
    return out


ROUTED: dict[Callable[..., Any], Callable[..., Any]] = {
    Tensor.__getitem__: basic_index,
    Tensor.__invert__: aten.bitwise_not.default,
    Tensor.contiguous: aten.contiguous.default,
}


class FakeCuda(TorchFunctionMode):
    """Routes the Python bindings that need a real CUDA device guard to their aten ops."""

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        return ROUTED.get(func, func)(*args, **(kwargs or {}))
