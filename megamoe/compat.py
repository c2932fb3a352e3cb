"""Every use of a private or internal torch API, in one place.

torch moves its internals between releases; when it does, this file is the one to change. Each
entry says what we need it for and which public API would replace it once torch offers one.
Nothing else in megamoe imports a name starting with an underscore from torch.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._subclasses import fake_tensor
from torch.distributed.pipelining import PipelineStage

# torch.distributed.pipelining.schedules: the action lists a schedule runs, and the multi-stage
# runtime whose lists can be edited. Public replacement: none yet (the schedules expose only
# step() / eval()); a custom schedule would need them too.
from torch.distributed.pipelining.schedules import (
    FORWARD,
    OVERLAP_F_B,
    RECV_F,
    SEND_F,
    _Action,
    _PipelineSchedule,
    _PipelineScheduleRuntime,
)

# The type the schedules take their stages as (PipelineStage is one).
from torch.distributed.pipelining.stage import _PipelineStageBase
from torch.utils import _python_dispatch

PipelineSchedule = _PipelineSchedule  # the type of Schedule1F1B and the multi-stage schedules
PipelineScheduleRuntime = _PipelineScheduleRuntime
PipelineStageBase = _PipelineStageBase

# The dry run (megamoe.dryrun): tensors with shapes, dtypes and devices but no memory or values,
# and a mode that sees every op dispatched. Public replacements: none (torchtitan's memory
# estimation builds on the same two).
FakeTensorMode = fake_tensor.FakeTensorMode
TorchDispatchMode = _python_dispatch.TorchDispatchMode


def in_backward_pass() -> bool:
    """Is autograd running a backward pass on this thread (e.g. activation checkpointing's recompute)?

    ``torch._C._current_graph_task_id`` is -1 outside a backward. Public replacement: none;
    ``torch.is_grad_enabled`` is true in both.
    """
    return torch._C._current_graph_task_id() != -1


def init_fake_process_group(world_size: int, rank: int) -> None:
    """torch.distributed initialised as global rank ``rank`` of ``world_size`` on torch's ``fake``
    backend, which answers every collective and point-to-point operation at once, talking to no one.

    Public replacement: none; the backend is registered by a module of torch's test utilities.
    """
    from torch.testing._internal.distributed import fake_pg

    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=rank, world_size=world_size)


def default_store() -> dist.Store:
    """The key-value store of the default process group (torchrun's, or init_process_group's).

    Public replacement: none for the group's own store; passing a ``TCPStore`` around would
    need a second rendezvous.
    """
    return dist.distributed_c10d._get_default_store()


def has_grouped_mm() -> bool:
    """``torch._grouped_mm`` (one GEMM over many row groups, bf16 on CUDA) exists from torch 2.8.

    Public replacement: ``torch.nn.functional.grouped_mm`` once it is stable.
    """
    return hasattr(torch, "_grouped_mm")


def grouped_mm(x: Tensor, weight: Tensor, offs: Tensor) -> Tensor:
    """``x`` [rows, in] times ``weight[g]`` [in, out] for each group of rows ending at ``offs[g]``."""
    return torch._grouped_mm(x, weight, offs=offs)


class HookedPipelineStage(PipelineStage):
    """A PipelineStage that tells its owner when a stage runs its last backward of a step and
    when it reduces its gradients (torch's REDUCE_GRAD action, placed right after a stage's last
    backward-like action) — where an overlapped gradient reduction starts and flushes.

    Overrides ``backward_one_chunk``, ``backward_weight_one_chunk`` and ``perform_reduce_grad``,
    internal methods of PipelineStage. Public replacement: a stage hook API (proposed upstream
    as post-backward hooks on PipelineStage).
    """

    def __init__(self, module: nn.Module, before_last_backward: Callable[[nn.Module], None],
                 after_reduce_grad: Callable[[nn.Module], None], **kwargs: Any) -> None:
        super().__init__(module, **kwargs)  # PipelineStage's own arguments
        self._before_last_backward, self._after_reduce_grad = before_last_backward, after_reduce_grad

    def backward_one_chunk(self, bwd_chunk_id: int, loss: Optional[Tensor] = None, full_backward: bool = True,
                           last_backward: bool = False) -> None:
        if last_backward:
            self._before_last_backward(self.submod)
        super().backward_one_chunk(bwd_chunk_id, loss=loss, full_backward=full_backward, last_backward=last_backward)

    def backward_weight_one_chunk(self, bwd_chunk_id: int, last_backward: bool = False) -> None:
        if last_backward:
            self._before_last_backward(self.submod)
        super().backward_weight_one_chunk(bwd_chunk_id, last_backward=last_backward)

    def perform_reduce_grad(self, grad_scale_factor: int) -> None:
        super().perform_reduce_grad(grad_scale_factor)
        self._after_reduce_grad(self.submod)


_FORWARD_ACTIONS = {FORWARD, SEND_F, RECV_F}


def forwards_only(schedule: PipelineScheduleRuntime) -> PipelineScheduleRuntime:
    """``schedule`` reduced to its forwards and their sends and receives, in its order (free of
    deadlocks, and so with fewer waits).

    Edits ``pipeline_order_with_comms``, the lowered action lists of the multi-stage runtime.
    Public replacement: a forward-only ``eval()`` in torch's V schedules, which today hand an
    input gradient from a rank's second stage to its first even in ``eval()``.
    """
    schedule.pipeline_order_with_comms = {rank: list(_forward_actions(actions))
                                          for rank, actions in schedule.pipeline_order_with_comms.items()}
    return schedule


def _forward_actions(actions: Sequence[_Action]) -> Iterator[_Action]:
    """The forwards, forward sends and receives of a lowered action list (an overlapped forward
    and backward pair gives its forward)."""
    for action in actions:
        parts: tuple[_Action, ...] = (action,)
        if action.computation_type == OVERLAP_F_B:
            assert action.sub_actions is not None  # an overlapped pair lists its forward and backward
            parts = action.sub_actions
        yield from (part for part in parts if part.computation_type in _FORWARD_ACTIONS)
