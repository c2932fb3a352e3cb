"""One pipeline rank's training step on fake tensors — the trainer's own code; the dry run's boundary with it.

megamoe.train does all the work: :func:`~megamoe.train.trainer.build_trainer` builds the rank
(its stages, the expert-parallel exchange, the gradient sync and its buckets, AdamW, the data
loader, the runner) and :func:`~megamoe.train.step.train_step` runs one step (the runner's
forward and backward of every micro-batch — the configured pipeline schedule when pp > 1 —,
the MoE dispatch through the all-to-all, the gradient sync with its overlap, the tied
embedding's sum, the gradient norm, clipping, the optimizer step); with ``checkpoint.async``
the checkpoint saver's :func:`take_snapshot` copies the rank's share to host buffers. A change
to any of them shows up here. The dry run adds only what fake tensors need, all in this file:

* the config a CUDA run resolves (:func:`as_on_gpu`), with mock data (nothing is read) and
  eager blocks;
* the exchanges take their split sizes from the assumed routing (megamoe.dryrun.routing), and
  :class:`~megamoe.dryrun.fake.FakeStepMode` answers the values the step reads back;
* the micro-batches are the trainer's loader's, as fake tensors;
* AdamW's state is made before the measured step, as a running job holds it (torch makes it
  at the first update, after the first step's peak); what else lives from step to step (the
  pipeline's buffers) the step itself makes at its start.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from megamoe.checkpoint.saver import take_snapshot
from megamoe.dryrun.fake import FakeStepMode, fake_process_group
from megamoe.dryrun.overflow import IndexWidths, WideTensor
from megamoe.dryrun.routing import assume_routing
from megamoe.dryrun.watch import MemoryWatch, StepMemory
from megamoe.estimators.routing import ExpertLoads
from megamoe.nn.casts import autocast_dtype
from megamoe.nn.moe.experts import uses_grouped_gemm
from megamoe.parallel.mesh import LaunchEnv, init_grid
from megamoe.train.step import train_step
from megamoe.train.trainer import Trainer, build_trainer

DEVICE = torch.device("cpu")  # where the fake tensors live; the kernels and dtypes chosen are a CUDA run's


def as_on_gpu(cfg: DictConfig) -> DictConfig:
    """``cfg`` as a CUDA run resolves it — train.precision auto → bf16 (fp32 master weights and
    router, bf16 compute), moe.grouped_gemm auto → the experts' CUDA choice — and as a fake step
    runs it: mock data (no file is read; the batch shapes are the same) and eager blocks
    (train.compile=block compiles these same ops)."""
    gpu = copy.deepcopy(cfg)
    OmegaConf.set_readonly(gpu, False)
    gpu.data.kind = "mock"
    gpu.train.compile = "none"
    dtype = autocast_dtype(cfg.train.precision, "cuda") or torch.float32
    gpu.train.precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    grouped = uses_grouped_gemm(gpu.moe.grouped_gemm, dtype, True, gpu.model.hidden_size, gpu.moe.ffn_hidden_size)
    gpu.moe.grouped_gemm = "on" if grouped else "off"
    OmegaConf.set_readonly(gpu, True)
    return gpu


@dataclass(frozen=True)
class RankStep:
    """What one pipeline rank's measured step held, and what else the dry run saw."""

    pp_rank: int
    rank: int  # the global rank played: data-parallel rank 0, which holds the busiest expert
    memory: StepMemory
    host_snapshot_bytes: Optional[int]  # a background checkpoint's host copy (checkpoint.async)
    wide_tensors: list[WideTensor]  # tensors at or beyond the 32-bit index range
    seconds: float


def run_rank(cfg: DictConfig, world_size: int, pp_rank: int, loads: ExpertLoads) -> RankStep:
    """Build pipeline rank ``pp_rank`` of a ``world_size``-GPU job of ``cfg`` (as :func:`as_on_gpu`
    gives it) on fake tensors and measure one training step."""
    started = time.perf_counter()
    rank = pp_rank * (world_size // cfg.parallel.pp)
    widths = IndexWidths()
    fake, memory = FakeStepMode(loads), MemoryWatch([widths.see])
    with fake_process_group(world_size, rank):
        env = LaunchEnv(rank, world_size, local_rank=0, launcher="dry run")
        grid = dataclasses.replace(init_grid(cfg.parallel.pp, cfg.parallel.ep, cfg.parallel.collective_timeout_s,
                                             env=env), device=DEVICE)
        with fake, memory:
            trainer = build_trainer(cfg, grid)
            assume_routing(trainer.state.models, loads, cfg.train.micro_batch * cfg.train.seq_len, grid.ep_group)
            make_optimizer_state(trainer.optimizer)
        batch = next(iter(trainer.loader))  # real, on the host, small: the token ids of one rank's share of a step
        with fake, memory:
            step = measure_step(trainer, [{key: fake.from_tensor(value) for key, value in mb.items()} for mb in batch],
                                memory)
            host_buffers = _snapshot(trainer)
    host = sum(b.numel() * b.element_size() for b in host_buffers.values()) if host_buffers else None
    return RankStep(pp_rank, rank, step, host, widths.found(), time.perf_counter() - started)


def measure_step(trainer: Trainer, microbatches: list[dict[str, torch.Tensor]], memory: MemoryWatch) -> StepMemory:
    """The trainer's step on ``microbatches``, measured by ``memory`` (which watched the trainer's build)."""
    with memory.measure(trainer.state.models, trainer.optimizer) as measured:
        train_step(trainer, microbatches)
    return measured[0]


def make_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """AdamW's state as a running job holds it at the start of a step (torch makes it at the
    first update): one update with zero gradients, which are dropped again."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p in params:
        p.grad = None


def _snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    """A background checkpoint's snapshot (checkpoint.async) after the step: the rank's share
    copied into host buffers (in place, a save makes none)."""
    host_buffers: dict[str, torch.Tensor] = {}
    if trainer.cfg.checkpoint.asynchronous:
        take_snapshot(trainer.state, 0, host_buffers)
    return host_buffers
