"""What a step holds in memory, op by op: every storage an op creates, what kind it is, and the peak.

A :class:`MemoryWatch` sits on top of the fake-tensor mode and sees each op's outputs. A new
storage is recorded with its size and the moment it was made (a clock that ticks at every
allocation and free); a weak reference records when it dies. After the step every storage
gets its final kind, and the peak is replayed from the records: the storages alive at the
moment the running total was highest, summed by kind. The kinds follow the memory estimate's
parts (megamoe.estimators.memory):

* ``weights``: the stage models' parameters and buffers; ``gradients``: their ``.grad``
  storages (the gradient sync's flat buffers); ``optimizer``: the optimizer's state and what
  its step allocates;
* ``weight_copies``: made from weights or weight copies alone (the bf16 casts autocast and the
  expert banks make, the router's concatenated maps; a zeros_like of a weight is no copy);
* ``persistent_buffers``: anything else that outlives the step, i.e. is kept from one step to
  the next (torch's pipeline receive and gradient buffers, made at the first step);
* ``activations``: made outside the backward pass (the forward and the loss); ``temporaries``:
  made inside it (recomputed activations, gradients of activations).

torch.distributed._tools.mem_tracker.MemTracker categorises in the same spirit, but through
module hooks that refuse a module run more than once per step (a pipeline runs each stage
once per micro-batch); this watch needs no hooks.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

from megamoe.compat import TorchDispatchMode, in_backward_pass

KINDS = ("weights", "gradients", "optimizer", "weight_copies", "persistent_buffers", "activations", "temporaries")
_FROM_WEIGHTS = ("weights", "weight_copies")
_aten = torch.ops.aten
# Ops that take only a tensor's shape from their input: what they make from a weight is no copy of it.
_SHAPE_ONLY = {_aten.empty_like, _aten.zeros_like, _aten.ones_like, _aten.full_like, _aten.new_empty, _aten.new_zeros,
               _aten.new_ones, _aten.new_full, _aten.new_empty_strided}
_STATE_KINDS = ("weights", "gradients", "optimizer")  # the model states: their size is the parameters' business
_STEP_KINDS = ("activations", "temporaries", "weight_copies")  # what a step makes and frees again

TOP_AT_PEAK = 8  # the largest tensors alive at the peak that a StepMemory lists
# Called with every tensor whose storage is new, and the op that made it.
StorageObserver = Callable[[torch.Tensor, Any], None]


@dataclass(frozen=True)
class Allocation:
    """A tensor the step allocated: the op that made it, its shape and dtype (and its storage's bytes)."""

    nbytes: int
    op: str
    shape: tuple[int, ...]
    dtype: str

    def summary(self) -> dict[str, Any]:
        return {"op": self.op, "shape": list(self.shape), "dtype": self.dtype, "gib": round(self.nbytes / 2**30, 4)}


@dataclass
class _Storage:
    nbytes: int
    born: int
    kind: str
    made_by: Allocation
    died: Optional[int] = None


@dataclass(frozen=True)
class StepMemory:
    """The peak of one measured step, by kind; its largest tensor, and the largest ones alive at the
    peak besides the model states."""

    peak_bytes: int
    by_kind: dict[str, int]
    largest: Optional[Allocation]
    at_peak: list[tuple[str, Allocation]]  # (kind, tensor), largest first


def _tensors(out: Any) -> Iterator[torch.Tensor]:
    """The tensors of an op's output: a tensor, or a (nested) tuple or list of them."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for item in out:
            yield from _tensors(item)


class MemoryWatch(TorchDispatchMode):
    """Records every storage made under it; :meth:`measure` brackets the step whose peak counts.
    ``observers`` see every new storage too (megamoe.dryrun.overflow)."""

    def __init__(self, observers: Iterable[StorageObserver] = ()) -> None:
        super().__init__()
        self._observers = list(observers)
        self._storages: WeakIdKeyDictionary = WeakIdKeyDictionary()  # live storage → its record
        self._records: list[_Storage] = []
        self._clock = 0
        self._live = 0
        self._peak, self._peak_at = 0, 0
        self._in_optimizer = False
        self._largest: Optional[Allocation] = None
        self._measuring = False

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        out = func(*args, **(kwargs or {}))
        kind = None
        for tensor in _tensors(out):
            if tensor.untyped_storage() not in self._storages:
                kind = kind or self._kind_of_new(func, args, kwargs)
                self._add(tensor, kind, func)
        if kind is not None and self._live > self._peak:
            self._peak, self._peak_at = self._live, self._clock
        return out

    def _kind_of_new(self, func: Any, args: tuple, kwargs: Optional[dict]) -> str:
        """The provisional kind of what an op makes (weights, gradients and the rest are settled later)."""
        if self._in_optimizer:
            return "optimizer"
        inputs = [t for t in _tensors([*args, *(kwargs or {}).values()])]
        if inputs and func.overloadpacket not in _SHAPE_ONLY and all(
                (record := self._storages.get(t.untyped_storage())) is not None and record.kind in _FROM_WEIGHTS
                for t in inputs):
            return "weight_copies"
        return "temporaries" if in_backward_pass() else "activations"

    def _add(self, tensor: torch.Tensor, kind: str, func: Any) -> None:
        storage = tensor.untyped_storage()
        dtype = str(tensor.dtype).removeprefix("torch.")
        made_by = Allocation(storage.nbytes(), str(func), tuple(tensor.shape), dtype)
        record = _Storage(made_by.nbytes, self._clock, kind, made_by)
        self._clock += 1
        self._storages[storage] = record
        self._records.append(record)
        self._live += record.nbytes
        weakref.finalize(storage, self._free, record)
        for observe in self._observers:
            observe(tensor, func)
        if self._measuring and (self._largest is None or record.nbytes > self._largest.nbytes):
            self._largest = made_by

    def _free(self, record: _Storage) -> None:
        record.died = self._clock
        self._clock += 1
        self._live -= record.nbytes

    def _settle(self, tensors: Iterable[torch.Tensor], kind: str) -> None:
        for tensor in tensors:
            record = self._storages.get(tensor.untyped_storage())
            if record is not None:
                record.kind = kind

    @contextlib.contextmanager
    def measure(self, models: Sequence[nn.Module], optimizer: torch.optim.Optimizer) -> Iterator[list[StepMemory]]:
        """Measure the step run inside: yields a list that holds its :class:`StepMemory` on exit.
        The peak counts what is alive when the step starts (the models' weights and gradients,
        the optimizer's state, what earlier steps kept) and everything the step makes."""
        self._settle_state(models, optimizer)  # what the step's ops read: weight copies are told by their inputs
        self._peak, self._peak_at, self._largest, self._measuring = self._live, self._clock, None, True
        result: list[StepMemory] = []
        hooks = (register_optimizer_step_pre_hook(lambda *_: setattr(self, "_in_optimizer", True)),
                 register_optimizer_step_post_hook(lambda *_: setattr(self, "_in_optimizer", False)))
        try:
            yield result
        finally:
            for hook in hooks:
                hook.remove()
            self._measuring = False
        for record in self._storages.values():  # outlived the step: kept for the next one
            if record.kind in _STEP_KINDS:
                record.kind = "persistent_buffers"
        self._settle_state(models, optimizer)
        alive = self._alive_at(self._peak_at)
        by_kind = Counter({kind: 0 for kind in KINDS})
        for record in alive:
            by_kind[record.kind] += record.nbytes
        held = sorted((r for r in alive if r.kind not in _STATE_KINDS), key=lambda r: r.nbytes, reverse=True)
        at_peak = [(r.kind, r.made_by) for r in held[:TOP_AT_PEAK]]
        result.append(StepMemory(self._peak, dict(by_kind), self._largest, at_peak))

    def _settle_state(self, models: Sequence[nn.Module], optimizer: torch.optim.Optimizer) -> None:
        """Give the models' parameters, buffers and gradients and the optimizer's state their kinds."""
        params = [p for model in models for p in model.parameters()]
        self._settle((t for model in models for t in (*model.parameters(), *model.buffers())), "weights")
        self._settle((p.grad for p in params if p.grad is not None), "gradients")
        self._settle((v for state in optimizer.state.values() for v in state.values()
                      if isinstance(v, torch.Tensor)), "optimizer")

    def _alive_at(self, moment: int) -> list[_Storage]:
        """The storages alive at ``moment``: born before it, dead not before it."""
        return [r for r in self._records if r.born < moment and (r.died is None or r.died >= moment)]
