"""One rank of a large job, played by this process on fake tensors and a fake process group.

Under torch's FakeTensorMode every tensor has a shape, a dtype and a device but no memory and
no values; ops run their shape functions only. The ``fake`` process-group backend answers
every collective and point-to-point operation at once without talking to anyone, so one
process can be global rank R of a world of any size: it builds R's process groups and runs R's
program, and each of its sends and receives, all-reduces and all-to-alls is issued as on the
cluster. What the other ranks would have sent is never seen — only its shape, which the
receive buffer already has.

Values the program reads back on the host are data fake tensors do not have.
:class:`FakeStepMode` answers them: the routing counts come from the assumed routing
(megamoe.dryrun.routing), everything else the step reads from :func:`host_value`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from megamoe.compat import FakeTensorMode, init_fake_process_group
from megamoe.estimators.routing import ExpertLoads

aten = torch.ops.aten


def host_value(dtype: torch.dtype) -> float | int:
    """The answer to a host read of a fake scalar (``.item()``, ``float(t)``), by its dtype.

    A step reads floats (the loss, the gradient norm: 1.0, finite, so the step is neither
    skipped nor stopped), one int32 (torch's pipeline vote, the product of every stage's 1 for
    "my shapes are given", as ours are: 1, so the pipeline takes its static path as on the
    cluster) and int64 indices (the slowest rank: 0, valid in any world).
    """
    if dtype.is_floating_point:
        return 1.0
    return 1 if dtype == torch.int32 else 0


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int) -> Iterator[None]:
    """torch.distributed initialised as global rank ``rank`` of ``world_size`` on the fake backend."""
    init_fake_process_group(world_size, rank)
    try:
        yield
    finally:
        dist.destroy_process_group()


class FakeStepMode(FakeTensorMode):
    """Fake tensors that answer the data-dependent ops of a training step (module docstring):

    - ``aten._local_scalar_dense`` (``.item()``, ``float(t)``): :func:`host_value`;
    - ``aten.bincount``: the router's counts per expert, a fake tensor of ``minlength``
      (their values reach the program only through the exchange, which takes the assumption);
    - a boolean mask over the assignments of a capacity-limited dispatch
      (megamoe.nn.moe.dispatcher.permute): as many kept rows as the assumed loads keep.

    Any other op whose output shape depends on values still raises, naming itself. One mode
    serves the whole dry run of a rank: enter it as often as needed.
    """

    def __init__(self, loads: Optional[ExpertLoads] = None) -> None:
        super().__init__()
        self.loads = loads

    def dispatch(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            return host_value(args[0].dtype)
        if func is aten.bincount.default:
            length = kwargs.get("minlength", args[2] if len(args) > 2 else 0)
            return self._empty(types, [length], torch.int64, args[0].device)
        if func is aten.index.Tensor and self._is_capacity_mask(args[1]):
            source, (mask,) = args
            assert self.loads is not None  # _is_capacity_mask checked
            kept = sum(self.loads.rows(mask.numel() // self.loads.top_k))
            return self._empty(types, [kept, *source.shape[1:]], source.dtype, source.device)
        return super().dispatch(func, types, args, kwargs)

    def _empty(self, types: Any, shape: list[int], dtype: torch.dtype, device: torch.device) -> Any:
        return super().dispatch(aten.empty.memory_format, types, (shape,), {"dtype": dtype, "device": device})

    def _is_capacity_mask(self, indices: list[Optional[torch.Tensor]]) -> bool:
        loads = self.loads
        return (loads is not None and loads.capacity_factor is not None and not loads.expert_choice
                and len(indices) == 1 and indices[0] is not None and indices[0].dtype == torch.bool
                and indices[0].numel() % loads.top_k == 0)
