"""Tensors too large for 32-bit indexing, found op by op in a fake step.

A tensor with 2^31 elements or more cannot be addressed with an int32 flat index. torch's
element-wise kernels split such tensors into 32-bit-indexable pieces, but a kernel that takes
a flat index, a row offset or a gather index as int32 (a grouped GEMM's ``offs``, a sort, a
custom or vendor kernel) overflows silently — on the first day of a rented cluster, not in a
CPU test. :class:`IndexWidths` notes every op that makes such a tensor, so the
dry run names them before the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

INT32_LIMIT = 2**31  # elements a signed 32-bit index can address


@dataclass(frozen=True)
class WideTensor:
    """An op that made or read a tensor of at least 2^31 elements."""

    op: str
    shape: tuple[int, ...]
    dtype: str

    def describe(self) -> str:
        numel = 1
        for size in self.shape:
            numel *= size
        return f"{self.op}: {list(self.shape)} {self.dtype} ({numel / INT32_LIMIT:.2f} × 2^31 elements)"


class IndexWidths:
    """Collects the ops that make tensors of at least :data:`INT32_LIMIT` elements, once each
    (a MemoryWatch observer: every large tensor a step reads, one of its ops made)."""

    def __init__(self) -> None:
        self._found: dict[WideTensor, None] = {}

    def see(self, tensor: torch.Tensor, func: Any) -> None:
        if tensor.numel() >= INT32_LIMIT:
            self._found.setdefault(WideTensor(str(func), tuple(tensor.shape), str(tensor.dtype)))

    def found(self) -> list[WideTensor]:
        return list(self._found)
