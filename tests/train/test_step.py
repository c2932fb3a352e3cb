"""One step's routing statistics, and validation in evaluation mode."""

from __future__ import annotations

import pytest
import torch

from megamoe.config import compose
from megamoe.parallel.mesh import ProcessGrid
from megamoe.train.step import train_step, validation_loss
from megamoe.train.trainer import build_trainer

BASE = ["+exp=tiny", "train.global_batch=2", "train.micro_batch=2", "train.seq_len=16", "train.eval_iters=1"]


def test_a_reported_step_carries_each_layers_routing(grid: ProcessGrid) -> None:
    """One micro-batch, capacity 0.5 (drops), both balancing losses on: the step's routing is the
    layer's own forward summary (MoELayer.last_stats), summed once."""
    trainer = build_trainer(compose([*BASE, "moe.capacity_factor=0.5", "moe.aux_loss_coeff=0.01",
                                     "moe.z_loss_coeff=0.001"]), grid)
    layers = trainer.router_stats.layers
    result = train_step(trainer, next(iter(trainer.loader)), report_routing=True)
    assert sorted(result.routing) == sorted(layers)
    for index, routing in result.routing.items():
        stats = layers[index].last_stats
        assert routing.forwards == 1 and routing.tokens == 2 * 16
        assert torch.equal(routing.tokens_per_expert, stats.tokens_per_expert.double())
        assert (routing.aux_loss, routing.z_loss) == (float(stats.aux_loss), float(stats.z_loss))
        assert routing.dropped == float(stats.dropped) > 0 and 0 <= routing.unrouted <= routing.tokens
    quiet = train_step(trainer, next(iter(trainer.loader)), report_routing=False)
    assert quiet.routing == {} and trainer.router_stats.device_sums == {}  # nothing carried into the next step


def test_validation_runs_without_router_noise_and_always_restores_training(grid: ProcessGrid,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Noisy gating draws noise in training mode only: two validations of the same weights agree,
    and the modules are back in training mode (recording routing) however validation ends."""
    trainer = build_trainer(compose([*BASE, "moe.router=linear", "moe.noisy_gating=true"]), grid)
    assert validation_loss(trainer) == validation_loss(trainer)
    assert all(module.training for module in trainer.modules) and trainer.router_stats.recording

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a failure inside validation")

    monkeypatch.setattr(trainer.runner, "run", fail)
    with pytest.raises(RuntimeError, match="inside validation"):
        validation_loss(trainer)
    assert all(module.training for module in trainer.modules) and trainer.router_stats.recording
