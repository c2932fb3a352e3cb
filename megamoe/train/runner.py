"""Forward and backward of a step's micro-batches: one seam, two implementations.

The loop, validation, downstream evaluation and the dry run all call a :class:`Runner` the
same way, whatever the layout (Megatron's ``get_forward_backward_func``):

* :class:`LocalRunner` (pp = 1): this rank's stage modules in sequence, one micro-batch after
  another, a plain gradient-accumulation loop; each micro-batch's loss is scaled by 1/n before
  its backward, and MoE aux losses likewise (MoEAuxLossBackward's scale).
* :class:`PipelineRunner` (pp > 1): the configured schedule of torch.distributed.pipelining
  (megamoe.parallel.pipeline), which keeps the n micro-batch gradients summed; the gradient
  sync divides them by n with the data-parallel average.

The last stage module computes head and loss together, by chunks of tokens
(:meth:`StageModule.loss`): no micro-batch's logits are ever held whole. The expert banks' bf16
weight copies are made once for all the micro-batches of a call (:func:`shared_casts`).
"""

from __future__ import annotations

import contextlib
import functools
from abc import ABC, abstractmethod
from typing import Optional

import torch
from omegaconf import DictConfig
from torch import Tensor

from megamoe.nn.casts import autocast, shared_casts
from megamoe.nn.moe.layer import MoEAuxLossBackward
from megamoe.parallel.grads import GradSync
from megamoe.parallel.mesh import ProcessGrid
from megamoe.parallel.pipeline import Schedules, StageModule, build_schedules, masked_labels, stage_inputs

Batch = dict[str, Tensor]  # a micro-batch: tokens, labels, loss_mask, position_ids [micro_batch, seq_len]


class Runner(ABC):
    """Runs the forward (and backward) passes of this rank's stages over a step's micro-batches."""

    def __init__(self, modules: list[StageModule], grad_sync: GradSync, device: torch.device,
                 compute_dtype: Optional[torch.dtype]) -> None:
        self.modules, self.grad_sync, self.device, self.compute_dtype = modules, grad_sync, device, compute_dtype

    @property
    def holds_last(self) -> bool:
        """This rank runs the last stage: it sees the loss and the final hidden states."""
        return self.modules[-1].is_last

    def autocast(self) -> contextlib.AbstractContextManager:
        """The training precision (megamoe.nn.casts.autocast_dtype), for passes run outside :meth:`run`."""
        return autocast(self.device, self.compute_dtype)

    @shared_casts()
    def run(self, microbatches: list[Batch], train: bool) -> Optional[Tensor]:
        """Forward all micro-batches, and backward when ``train``: their mean loss on the last
        stage, None elsewhere. Gradients are left summed for :attr:`grad_divisor`."""
        batch = {k: torch.cat([mb[k] for mb in microbatches]).to(self.device) for k in microbatches[0]}
        labels = masked_labels(batch["labels"], batch["loss_mask"])
        with torch.set_grad_enabled(train):
            return self._run(stage_inputs(batch), labels, len(microbatches), train)

    @abstractmethod
    def _run(self, inputs: tuple[Tensor, ...], labels: Tensor, n: int, train: bool) -> Optional[Tensor]:
        """:meth:`run` on the first stage's inputs (:func:`stage_inputs`) of the concatenated
        micro-batches (n of them) on this rank's device."""

    @abstractmethod
    def grad_divisor(self, num_microbatches: int) -> int:
        """What the step's summed gradients are divided by, besides the data-parallel size."""

    @abstractmethod
    def hidden_states(self, inputs: tuple[Tensor, ...], labels: Tensor) -> Optional[Tensor]:
        """The last stage's final-normed hidden states of the first stage's ``inputs`` (token ids,
        position ids[, document ids], each [rows, seq]; the schedule's rows: num_microbatches ×
        micro_batch), for evaluation; None on the other stages."""


class LocalRunner(Runner):
    """pp = 1: this rank's stage modules (one, or several virtual stages) in sequence."""

    def __init__(self, modules: list[StageModule], grad_sync: GradSync, device: torch.device,
                 compute_dtype: Optional[torch.dtype], micro_batch: int) -> None:
        super().__init__(modules, grad_sync, device, compute_dtype)
        self.micro_batch = micro_batch

    def _forward(self, *inputs: Tensor) -> Tensor:
        x: Tensor | tuple[Tensor, ...] = inputs
        for module in self.modules:
            x = module(*x)
        assert isinstance(x, Tensor), "the last stage returns the final hidden states alone"
        return x

    def _run(self, inputs: tuple[Tensor, ...], labels: Tensor, n: int, train: bool) -> Tensor:
        losses = []
        with MoEAuxLossBackward.scaled(1.0 / n):
            for i, (mb_labels, *mb_inputs) in enumerate(zip(*(t.chunk(n) for t in (labels, *inputs)))):
                with self.autocast():
                    loss = self.modules[-1].loss(self._forward(*mb_inputs), mb_labels)
                if train:
                    if i == n - 1:  # the last backward: buckets may start reducing as their gradients are final
                        for module in self.modules:
                            self.grad_sync.arm(module.model)
                    (loss / n).backward()
                losses.append(loss.detach())
        return torch.stack(losses).mean()

    def grad_divisor(self, num_microbatches: int) -> int:
        return 1  # each micro-batch's loss was scaled by 1/n before its backward

    def hidden_states(self, inputs: tuple[Tensor, ...], labels: Tensor) -> Tensor:
        return torch.cat([self._forward(*chunk) for chunk in zip(*(t.split(self.micro_batch) for t in inputs))])


class PipelineRunner(Runner):
    """pp > 1: the configured pipeline schedule over this rank's stages."""

    def __init__(self, cfg: DictConfig, grid: ProcessGrid, modules: list[StageModule], grad_sync: GradSync,
                 num_microbatches: int, compute_dtype: Optional[torch.dtype]) -> None:
        super().__init__(modules, grad_sync, grid.device, compute_dtype)
        self.cfg, self.grid, self.num_microbatches = cfg, grid, num_microbatches

    @functools.cached_property
    def schedules(self) -> Schedules:
        """Built on first use: the stages' static shapes are known, nothing runs."""
        return build_schedules(self.cfg, self.grid, self.modules, self.num_microbatches, self.grad_sync)

    def _stage_args(self, inputs: tuple[Tensor, ...], labels: Tensor) -> tuple[tuple[Tensor, ...], Optional[Tensor]]:
        """What this rank feeds the schedule: the inputs on the first stage, the target on the last."""
        return inputs if self.modules[0].is_first else (), labels if self.holds_last else None  # both on a V's rank 0

    def _run(self, inputs: tuple[Tensor, ...], labels: Tensor, n: int, train: bool) -> Optional[Tensor]:
        run = self.schedules.train.step if train else self.schedules.evaluate.eval
        losses: list[Tensor] = []
        args, target = self._stage_args(inputs, labels)
        # scale 1: the gradient sync divides the micro-batch sum by n; return_outputs=False: the last
        # stage keeps no micro-batch's output past its backward
        with MoEAuxLossBackward.scaled(1.0), self.autocast():
            run(*args, target=target, losses=losses, return_outputs=False)
        return torch.stack([loss.detach().float() for loss in losses]).mean() if self.holds_last else None

    def grad_divisor(self, num_microbatches: int) -> int:
        return num_microbatches

    def hidden_states(self, inputs: tuple[Tensor, ...], labels: Tensor) -> Optional[Tensor]:
        args, target = self._stage_args(inputs, labels)  # torch's schedules need a target
        return self.schedules.evaluate.eval(*args, target=target, return_outputs=True)


def build_runner(cfg: DictConfig, grid: ProcessGrid, modules: list[StageModule], grad_sync: GradSync,
                 num_microbatches: int, compute_dtype: Optional[torch.dtype]) -> Runner:
    """The runner for this layout: local when pp = 1, else the pipeline's."""
    if grid.pp == 1:
        return LocalRunner(modules, grad_sync, grid.device, compute_dtype, cfg.train.micro_batch)
    return PipelineRunner(cfg, grid, modules, grad_sync, num_microbatches, compute_dtype)
