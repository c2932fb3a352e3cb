"""A rank's step on fake tensors against the same step on real CPU tensors, measured the same way.

The real run is the trainer on 2 or 4 gloo processes, each rank's step measured by the same
MemoryWatch (real storages instead of fake ones); the dry run plays data-parallel rank 0 of
each pipeline rank. They differ in what fake tensors cannot know — the real run's routing is
its data's, the dry run's is balanced — and must agree within 10%.
"""

from __future__ import annotations

from typing import Optional

import pytest

from megamoe.config import compose, validate
from megamoe.dryrun.step import as_on_gpu, make_optimizer_state, measure_step, run_rank
from megamoe.dryrun.watch import MemoryWatch
from megamoe.estimators import balance, memory
from megamoe.estimators.routing import ExpertLoads
from megamoe.parallel.mesh import init_grid
from megamoe.train.trainer import build_trainer
from tests.dist.launcher import run_distributed

LAYOUTS = {  # name: (overrides, world size)
    "tiny_dp2_ep2": (["+exp=tiny", "parallel.ep=2"], 2),
    "demo_pp2_dp2_ep2": (["+exp=demo"], 4),
}


def real_step_peak(rank: int, world_size: int, overrides: list[str]) -> Optional[tuple[int, int]]:
    """(pipeline rank, peak bytes) of a real CPU step on data-parallel rank 0 of its stage."""
    cfg = as_on_gpu(compose(overrides))
    grid = init_grid(cfg.parallel.pp, cfg.parallel.ep, 120)
    memory = MemoryWatch()
    with memory:
        trainer = build_trainer(cfg, grid)
        make_optimizer_state(trainer.optimizer)
    batch = next(iter(trainer.loader))
    with memory:
        step = measure_step(trainer, batch, memory)
    return (grid.pp_rank, step.peak_bytes) if grid.dp_rank == 0 else None


def test_gpu_config_is_bf16_with_grouped_gemms_and_mock_data() -> None:
    cfg = as_on_gpu(compose(["+exp=demo"]))
    assert (cfg.train.precision, cfg.moe.grouped_gemm, cfg.data.kind, cfg.train.compile) == ("bf16", "on", "mock",
                                                                                             "none")
    assert as_on_gpu(compose(["+exp=tiny", "train.precision=fp32"])).moe.grouped_gemm == "off"  # CUDA's own choice


@pytest.mark.parametrize("layout", ["tiny_dp2_ep2", pytest.param("demo_pp2_dp2_ep2", marks=pytest.mark.slow)])
def test_fake_step_peak_is_within_10_percent_of_the_real_one(layout: str) -> None:
    overrides, world_size = LAYOUTS[layout]
    real = dict(r for r in run_distributed(real_step_peak, world_size, overrides, timeout_s=300) if r is not None)
    cfg = as_on_gpu(compose(overrides))
    validate(cfg, world_size=world_size)
    for pp_rank, real_peak in real.items():
        fake_peak = run_rank(cfg, world_size, pp_rank, ExpertLoads.of(cfg.moe)).memory.peak_bytes
        assert abs(fake_peak - real_peak) <= 0.1 * real_peak, (pp_rank, fake_peak, real_peak)
    assert len(real) == cfg.parallel.pp


def test_a_background_checkpoint_snapshot_is_host_memory() -> None:
    one_microbatch = ["+exp=tiny", "train.global_batch=2"]
    cfg = as_on_gpu(compose([*one_microbatch, "checkpoint.async=true"]))
    in_place = run_rank(as_on_gpu(compose(one_microbatch)), 1, 0, ExpertLoads.of(cfg.moe))
    background = run_rank(cfg, 1, 0, ExpertLoads.of(cfg.moe))
    params = 924_864  # tests/launch/test_model_stats.py counts them
    weights_and_adam = 3 * 4 * params  # fp32 weights, m and v
    assert weights_and_adam < background.host_snapshot_bytes < weights_and_adam + 1024  # + AdamW's step counts
    assert in_place.host_snapshot_bytes is None
    assert background.memory.peak_bytes == in_place.memory.peak_bytes  # the device holds none of it


@pytest.mark.parametrize("overrides", [
    ["moe.capacity_factor=1.25"],  # token choice with drops: the capacity mask answered from the loads
    ["moe.router_mode=expert_choice"],
    ["model.ffn_type=dense", "model.dense_ffn_hidden_size=96"],
], ids=["capacity", "expert_choice", "dense"])
def test_every_routing_runs_and_matches_the_estimate(overrides: list[str]) -> None:
    cfg = as_on_gpu(compose(["+exp=tiny", "parallel.ep=2", *overrides]))
    validate(cfg, world_size=2)
    loads = ExpertLoads.of(cfg.moe, 3.0 if cfg.moe.capacity_factor else 1.0)
    step = run_rank(cfg, 2, 0, loads)
    estimate = balance.rank_memory(cfg, memory.grid_shape(cfg, 2), 0, loads.imbalance).total
    assert abs(estimate / step.memory.peak_bytes - 1) < 0.1
