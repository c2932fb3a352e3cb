"""The seam: a model family is one module plus one registry line. A family written here, in the
test — plain multi-head attention, its accounting, its rules — trains, saves and resumes, and the
FLOP and memory estimators count it, without any other file knowing it exists."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megamoe.checkpoint.saver import save_checkpoint
from megamoe.checkpoint.state import resume
from megamoe.config import compose
from megamoe.config.schema import ModelConfig
from megamoe.errors import ConfigError
from megamoe.estimators.balance import memory_per_gpu
from megamoe.estimators.flops import parameter_breakdown, total_params
from megamoe.estimators.memory import FP32
from megamoe.models import FAMILIES, build_stage
from megamoe.models.family import HFAdapter, ModelFamily, Part
from megamoe.nn.init import seeded_normal_
from megamoe.nn.rope import apply_rotary
from megamoe.parallel.mesh import ProcessGrid
from megamoe.train.step import train_step
from megamoe.train.trainer import build_trainer


class PlainAttention(nn.Module):
    """q, k, v, o projections and causal SDPA: the smallest attention a family can bring."""

    def __init__(self, m: ModelConfig) -> None:
        super().__init__()
        self.heads, projection = m.num_heads, m.num_heads * m.head_dim
        self.qkv = nn.Linear(m.hidden_size, 3 * projection, bias=False)
        self.out = nn.Linear(projection, m.hidden_size, bias=False)

    def reset_parameters(self, std: float, *key: object) -> None:
        seeded_normal_(self.qkv.weight, std, *key, "qkv")
        seeded_normal_(self.out.weight, std, *key, "out")

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(apply_rotary(q, *rope), apply_rotary(k, *rope), v, is_causal=True)
        return self.out(out.transpose(1, 2).flatten(2))


def _parts(m: ModelConfig) -> dict[str, Part]:
    projections = 4 * m.hidden_size * m.num_heads * m.head_dim
    return {"attention": Part(projections, projections, projections)}


def _refuse_hf(*_: object) -> None:
    raise ConfigError("model.family: toy has no Hugging Face layout")


TOY = ModelFamily(
    name="toy", attention=PlainAttention, attention_parts=_parts,
    attention_bytes=lambda m, act: 6 * FP32 * m.num_heads * m.head_dim, attention_cast_per_forward=lambda m: 0,
    validate=lambda cfg: None,
    hf=HFAdapter("ToyForCausalLM", "toy", _refuse_hf, _refuse_hf, _refuse_hf, _refuse_hf, _refuse_hf),
)


@pytest.fixture
def toy_family(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    module = types.ModuleType("toy_family")
    module.FAMILY = TOY  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "toy_family", module)
    monkeypatch.setitem(FAMILIES, "toy", "toy_family")  # the one registry line
    yield


def _cfg(run_dir: Path):
    return compose(["+exp=tiny", "model.family=toy", "model.use_lfa=false", "train.global_batch=4",
                    "train.micro_batch=2", "train.seq_len=32", f"run.dir={run_dir}"])


def test_a_family_from_one_module_trains_saves_resumes_and_is_counted(toy_family: None, grid: ProcessGrid,
                                                                      tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    model = build_stage(cfg)
    assert all(isinstance(layer.attn, PlainAttention) for layer in model.layers.values())
    assert total_params(cfg) == sum(p.numel() for p in model.parameters())  # the shared estimator, its rows
    assert set(parameter_breakdown(cfg)) >= {"attention", "experts", "router"}
    assert memory_per_gpu(cfg)[1].total > 0

    trainer = build_trainer(cfg, grid)
    batches = iter(trainer.loader)
    losses = [train_step(trainer, next(batches)).loss for _ in range(3)]
    assert losses[-1] < losses[0]
    save_checkpoint(trainer.state)
    resumed = build_trainer(cfg, grid)
    assert resume(resumed.state) == tmp_path / "checkpoints" / "step_3" and resumed.step == 3
    for (name, a), b in zip(trainer.modules[0].named_parameters(), resumed.modules[0].parameters()):
        assert torch.equal(a, b), name


def test_an_unknown_family_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^model.family: 'mixtral' is not one of yuan, qwen_moe"):
        from megamoe.models import validate_config

        validate_config(compose(["+exp=tiny", "model.family=mixtral"]))
