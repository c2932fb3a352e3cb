"""train.compile=block: the compiled blocks train exactly like eager, and only those blocks compile."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

from megamoe.config import compose
from megamoe.models import build_stage, validate_config
from megamoe.nn.compile import compiled_blocks
from megamoe.nn.moe.experts import ExpertBank
from megamoe.parallel.mesh import init_grid
from megamoe.train.step import train_step
from megamoe.train.trainer import build_trainer
from tests.dist.launcher import run_distributed

STEPS = 20
BASE = ["+exp=tiny", "train.global_batch=4", "train.micro_batch=2", "train.seq_len=32", "train.lr=3e-3",
        "train.warmup_steps=2", "moe.aux_loss_coeff=0.01", "moe.num_shared_experts=1"]


def _train(rank: int, world_size: int, args: tuple[str, list[str], torch.dtype]) -> dict[str, Any]:
    compile_mode, overrides, dtype = args
    torch.set_default_dtype(dtype)
    cfg = compose([*BASE, *overrides, f"train.compile={compile_mode}"])
    validate_config(cfg, world_size)
    trainer = build_trainer(cfg, init_grid(1, 1, timeout_s=60))
    batches = iter(trainer.loader)
    losses = [train_step(trainer, next(batches), report_routing=False).loss for _ in range(STEPS)]
    return {"losses": losses, "graphs": counters["stats"]["unique_graphs"]}


# The MoE model runs in float64: in fp32 the compiled kernels' rounding (~1e-7) flips near-ties in
# the top-2 routing of this tiny random model within a few steps, and a flipped token changes the
# loss by ~1e-4 (chaos, not a compile bug; tests/dist/test_layouts.py says the same of layouts).
# It has a dense layer too (moe.layer_freq), whose whole SwiGLU compiles beside the MoE layers'
# routers and shared experts. The dense model shows the fp32 agreement directly (-m slow: it
# repeats the compile's cost).
MIXED = ["moe.layer_freq=[1,0,1,1]", "model.dense_ffn_hidden_size=96"]
CASES = {"mixed_float64": (MIXED, torch.float64, 1e-9),
         "dense_fp32": (["model.ffn_type=dense", "moe.num_shared_experts=0"], torch.float32, 1e-6)}


@pytest.mark.slow  # an option of its own (train.compile=block); eager is what every other test runs
@pytest.mark.parametrize("case", ["mixed_float64", "dense_fp32"])
def test_compiled_blocks_train_like_eager_for_20_steps(case: str) -> None:
    overrides, dtype, rtol = CASES[case]
    (eager,), (compiled,) = (
        run_distributed(_train, 1, (mode, overrides, dtype), timeout_s=500, init_process_group=False)
        for mode in ("none", "block")
    )
    assert eager["graphs"] == 0 and compiled["graphs"] > 0  # the blocks did compile
    torch.testing.assert_close(torch.tensor(compiled["losses"]), torch.tensor(eager["losses"]), rtol=rtol, atol=0)


def test_the_moe_dispatch_and_the_experts_stay_eager() -> None:
    model = build_stage(compose([*BASE, *MIXED]))
    blocks = set(map(id, compiled_blocks(model)))
    assert not any(isinstance(m, ExpertBank) for block in compiled_blocks(model) for m in block.modules())
    layer, dense = model.layers["0"], model.layers["1"]
    assert {id(layer.attn), id(layer.input_norm), id(layer.mlp.router), id(layer.mlp.shared_experts)} <= blocks
    assert id(layer.mlp) not in blocks
    assert {id(dense.attn), id(dense.mlp)} <= blocks  # a dense layer's FFN has fixed shapes: all of it compiles
