"""train.compile=block: the compiled blocks train exactly like eager, and only those blocks compile."""

from __future__ import annotations

import time
from typing import Any

import torch

from megamoe.config import compose, validate
from megamoe.models import build_stage
from megamoe.nn.compile import compiled_blocks
from megamoe.nn.moe.experts import ExpertBank
from megamoe.parallel.mesh import init_grid
from megamoe.train.loop import build_trainer, train_step
from tests.dist.launcher import run_distributed

STEPS = 20
BASE = ["+exp=tiny", "train.global_batch=4", "train.micro_batch=2", "train.seq_len=32", "train.lr=3e-3",
        "train.warmup_steps=2", "moe.aux_loss_coeff=0.01", "moe.num_shared_experts=1"]


def _train(rank: int, world_size: int, compile_mode: str) -> dict[str, Any]:
    cfg = compose([*BASE, f"train.compile={compile_mode}"])
    validate(cfg, world_size)
    trainer = build_trainer(cfg, init_grid(1, 1, timeout_s=60))
    batches = iter(trainer.loader)
    started = time.perf_counter()
    losses = [train_step(trainer, next(batches), report_expert_load=False)["loss"] for _ in range(STEPS)]
    return {"losses": losses, "seconds": time.perf_counter() - started}


def test_compiled_blocks_train_like_eager_for_20_steps() -> None:
    (eager,), (compiled,) = (run_distributed(_train, 1, mode, timeout_s=500, init_process_group=False)
                             for mode in ("none", "block"))
    torch.testing.assert_close(torch.tensor(compiled["losses"]), torch.tensor(eager["losses"]), rtol=1e-5, atol=0)


def test_the_moe_dispatch_and_the_experts_stay_eager() -> None:
    model = build_stage(compose(BASE))
    blocks = compiled_blocks(model)
    assert not any(isinstance(m, ExpertBank) for block in blocks for m in block.modules())
    layer = model.layers["0"]
    assert {id(layer.attn), id(layer.input_norm), id(layer.mlp.router), id(layer.mlp.shared_experts)} <= set(map(id, blocks))
    assert all(id(layer.mlp) != id(b) for b in blocks)
