"""The dry run of a whole job: every distinct pipeline rank's step measured, next to the estimate.

The ranks of one pipeline stage differ only in which experts and which share of the batch they
hold, so the dry run plays one of each: data-parallel rank 0 of every pipeline rank, which
holds the busiest expert of the assumed routing. Each is built and stepped alone, in this
process or in ``jobs`` worker processes (they share nothing), and compared with
megamoe.estimators' figure for the same rank. The job fits when the fullest rank stays within
the memory the planner lets a layout use (its reserve is kept for the CUDA context, NCCL's
buffers and fragmentation, which no tensor shows).
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, cast

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from megamoe.config.choices import Switch
from megamoe.dryrun.step import RankStep, as_on_gpu, run_rank
from megamoe.estimators import balance, memory
from megamoe.estimators.memory import GIB, RankMemory
from megamoe.estimators.planner import Hardware
from megamoe.estimators.routing import ExpertLoads

MODELLED_DEVICE = "cuda"  # whose precision and kernels the fake step takes


@dataclass(frozen=True)
class RankReport:
    """One pipeline rank: the measured step and the estimate of the same rank."""

    step: RankStep
    estimate: RankMemory

    @property
    def measured_gib(self) -> float:
        return self.step.memory.peak_bytes / GIB

    @property
    def estimated_gib(self) -> float:
        return self.estimate.total / GIB

    def summary(self) -> dict[str, Any]:
        """The rank's entry of the JSON line."""
        step = self.step.memory
        host = self.step.host_snapshot_bytes
        return {
            "pp_rank": self.step.pp_rank, "rank": self.step.rank,
            "measured_gib": round(self.measured_gib, 4), "estimated_gib": round(self.estimated_gib, 4),
            "estimated_over_measured": round(self.estimated_gib / self.measured_gib, 4),
            "by_kind": {kind: round(nbytes / GIB, 4) for kind, nbytes in step.by_kind.items()},
            "estimated_by_part": {part: round(gib, 4) for part, gib in self.estimate.gib().items() if part != "total"},
            "largest_tensor": None if step.largest is None else step.largest.summary(),
            "at_peak": [{"kind": kind, **tensor.summary()} for kind, tensor in step.at_peak],
            "host_snapshot_gib": None if host is None else round(host / GIB, 4),
            "tensors_beyond_int32": [wide.describe() for wide in self.step.wide_tensors],
            "seconds": round(self.step.seconds, 1),
        }


@dataclass(frozen=True)
class DryRun:
    """A whole job's dry run: its config as a GPU runs it, the routing assumed, every rank."""

    cfg: DictConfig
    grid: memory.GridShape
    loads: ExpertLoads
    hardware: Hardware
    ranks: list[RankReport]
    seconds: float

    @property
    def max_measured_gib(self) -> float:
        return max(rank.measured_gib for rank in self.ranks)

    @property
    def fits(self) -> bool:
        return self.max_measured_gib <= self.hardware.usable_gib

    def summary(self) -> dict[str, Any]:
        """The JSON line: the layout, each rank, and whether it fits."""
        return {
            "world_size": self.grid.world_size,
            "layout": {**cast(dict[str, Any], OmegaConf.to_container(self.cfg.parallel)), "dp": self.grid.dp,
                       "micro_batch": self.cfg.train.micro_batch,
                       "activation_checkpointing": self.cfg.train.activation_checkpointing,
                       "layers_per_stage": balance.stage_layers(self.cfg)},
            "models": MODELLED_DEVICE, "precision": self.cfg.train.precision,
            "grouped_gemm": self.cfg.moe.grouped_gemm == Switch.ON,
            "expert_imbalance": self.loads.imbalance,
            "ranks": [rank.summary() for rank in self.ranks],
            "max_measured_gib": round(self.max_measured_gib, 4),
            "gpu": self.hardware.name, "gpu_memory_gib": round(self.hardware.memory_gib, 4),
            "usable_gib": round(self.hardware.usable_gib, 4), "fits": self.fits,
            "seconds": round(self.seconds, 1),
        }


def dry_run(cfg: DictConfig, world_size: int, hardware: Hardware, imbalance: float = 1.0, jobs: int = 1) -> DryRun:
    """Dry-run ``cfg`` (validated for ``world_size``) as a CUDA run resolves it (megamoe.dryrun.step.as_on_gpu)."""
    started = time.perf_counter()
    gpu = as_on_gpu(cfg)
    loads = ExpertLoads.of(gpu.moe, imbalance)
    grid = memory.grid_shape(gpu, world_size)
    steps = sorted(_steps(gpu, world_size, loads, jobs), key=lambda step: step.pp_rank)
    ranks = [RankReport(step, balance.rank_memory(gpu, grid, step.pp_rank, imbalance)) for step in steps]
    return DryRun(gpu, grid, loads, hardware, ranks, time.perf_counter() - started)


def _steps(cfg: DictConfig, world_size: int, loads: ExpertLoads, jobs: int) -> Iterator[RankStep]:
    """Every pipeline rank's measured step, as each finishes (a progress bar on stderr)."""
    pp = cfg.parallel.pp
    bar = tqdm(total=pp, desc="dry run: pipeline ranks stepped", unit="rank", file=sys.stderr, leave=False)
    with bar:
        if jobs <= 1 or pp == 1:
            for pp_rank in range(pp):
                yield run_rank(cfg, world_size, pp_rank, loads)
                bar.update()
            return
        context = multiprocessing.get_context("spawn")  # fresh interpreters: no process group or mode to inherit
        with ProcessPoolExecutor(min(jobs, pp), mp_context=context) as pool:
            futures = [pool.submit(run_rank, cfg, world_size, pp_rank, loads) for pp_rank in range(pp)]
            for future in futures:
                yield future.result()
                bar.update()

