"""The optimizer: AdamW's groups and decay rule, Muon's parameters, both updates against their
definitions, determinism, and optimizer state in bf16."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from megamoe.config import compose
from megamoe.config.schema import MuonConfig, TrainConfig
from megamoe.models import build_stage
from megamoe.nn.ffn import SwiGLU
from megamoe.nn.moe.experts import ExpertBank
from megamoe.parallel.mesh import init_grid, shutdown
from megamoe.train import optim
from megamoe.train.muon import Matrices
from megamoe.train.optim import HybridOptimizer, build_optimizer, param_groups
from megamoe.train.step import train_step
from megamoe.train.trainer import build_trainer
from tests.train.test_muon import reference_newton_schulz


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(4)
        self.proj = nn.Linear(4, 4, bias=True)
        self.experts = nn.Parameter(torch.randn(2, 4, 4))  # an expert bank is 3-D: decayed


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.norm = nn.RMSNorm(4)
        self.lm_head = nn.Linear(4, 10, bias=False)
        self.frozen = nn.Parameter(torch.ones(3, 3), requires_grad=False)


def _names(model: nn.Module, groups: list[dict]) -> list[set[str]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [{name_of[id(p)] for p in g["params"]} for g in groups]


def _cfg(**overrides: object) -> DictConfig:
    return OmegaConf.structured(TrainConfig(**{"lr": 1e-2, "weight_decay": 0.1, **overrides}))


def reference_adamw(w: torch.Tensor, grads: list[torch.Tensor], lr: float, wd: float,
                    b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8) -> torch.Tensor:
    """Loshchilov & Hutter's AdamW, in float64: decoupled decay, then the bias-corrected Adam step."""
    w, m, v = w.double(), torch.zeros_like(w, dtype=torch.float64), torch.zeros_like(w, dtype=torch.float64)
    for t, g in enumerate((g.double() for g in grads), start=1):
        w = w * (1 - lr * wd)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        w = w - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    return w


@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_param_groups_follow_the_decay_rule(decay_embeddings: bool) -> None:
    model = nn.Sequential()
    model.add_module("stage", _Toy())  # names gain a prefix, as inside a pipeline-stage wrapper
    toy = model.stage
    groups = param_groups(model, 0.1, decay_embeddings, {toy.embed.weight, toy.lm_head.weight})
    assert [(g["name"], g["weight_decay"]) for g in groups] == [("decay", 0.1), ("no_decay", 0.0)]
    decay, no_decay = _names(model, groups)
    matrices = {f"stage.layers.{i}.{n}" for i in (0, 1) for n in ("proj.weight", "experts")}
    gains = {f"stage.layers.{i}.{n}" for i in (0, 1) for n in ("norm.weight", "proj.bias")} | {"stage.norm.weight"}
    embeddings = {"stage.embed.weight", "stage.lm_head.weight"}
    assert decay == (matrices | embeddings if decay_embeddings else matrices)
    assert no_decay == (gains if decay_embeddings else gains | embeddings)


def test_build_optimizer_on_cpu_uses_cfg() -> None:
    opt = build_optimizer(_Toy(), _cfg(beta1=0.8, beta2=0.9, eps=1e-6))
    assert type(opt) is torch.optim.AdamW
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all(g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 and g["fused"] is True for g in opt.param_groups)


def _train(steps: int) -> tuple[nn.Module, list[torch.Tensor]]:
    """A few AdamW steps on fixed random gradients; returns the model and the gradients used."""
    torch.manual_seed(0)
    model = _Toy()
    opt = build_optimizer(model, _cfg())
    grads = []
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn_like(p) if p.requires_grad else None
        grads.append([None if p.grad is None else p.grad.clone() for p in model.parameters()])
        opt.step()
    return model, grads


def test_optimizer_is_deterministic_on_cpu() -> None:
    a, _ = _train(3)
    b, _ = _train(3)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


def test_update_matches_adamw_definition() -> None:
    steps, lr = 3, 1e-2
    trained, grads = _train(steps)
    torch.manual_seed(0)
    model = _Toy()
    decay_ids = {id(p) for p in param_groups(model, 0.1, True)[0]["params"]}
    for i, (name, p) in enumerate(model.named_parameters()):
        if not p.requires_grad:
            continue
        w = reference_adamw(p.detach(), [grads[t][i] for t in range(steps)], lr, 0.1 if id(p) in decay_ids else 0.0)
        got = dict(trained.named_parameters())[name]
        torch.testing.assert_close(got.double(), w, rtol=1e-6, atol=1e-7, msg=name)
    assert math.isclose(trained.frozen.sum().item(), 9.0)


# ---------------------------------------------------------------------------------------------
# Muon


def _muon_names(cfg: DictConfig) -> tuple[dict[str, Matrices], set[str]]:
    """(Muon's parameters by name with their matrices, AdamW's names) of the config's whole model."""
    model = build_stage(cfg)
    optimizer = build_optimizer(model, cfg.train, model.embedding_parameters())
    name_of = {p: n for n, p in model.named_parameters()}
    muon, *adamw = optimizer.param_groups
    assert muon["name"] == "muon" and [g["name"] for g in adamw] == ["decay", "no_decay"]
    return ({name_of[p]: optimizer.matrices[p] for p in muon["params"]},
            {name_of[p] for group in adamw for p in group["params"]})


def test_muon_takes_every_hidden_matrix_and_adamw_the_rest() -> None:
    """Yuan: attention projections, LFA convolutions (as [out, in·2]), the Attention Router's maps,
    each expert's gate, up and down matrices; AdamW: the embedding, norms, biases."""
    muon, adamw = _muon_names(compose(["+exp=tiny", "train.optimizer=muon"]))
    layer = {name.removeprefix("layers.0."): m for name, m in muon.items() if name.startswith("layers.0.")}
    assert layer == {
        **{f"attn.{x}_proj.weight": Matrices(1, 64, 64) for x in "qkvo"},
        "attn.lf.conv1.weight": Matrices(1, 32, 128), "attn.lf.conv2.weight": Matrices(1, 64, 64),
        **{f"mlp.router.{x}.weight": Matrices(1, 8, 64) for x in ("query", "key", "value")},
        "mlp.experts.w1": Matrices(16, 128, 64), "mlp.experts.w2": Matrices(8, 64, 128),
    }
    assert len(muon) == 4 * len(layer)
    per_layer = ("input_norm.weight", "post_attn_norm.weight", "attn.lf.norm.weight", "attn.lf.conv1.bias",
                 "attn.lf.conv2.bias")
    gains_and_biases = {f"layers.{i}.{n}" for i in range(4) for n in per_layer}
    assert adamw == {"embed.weight", "final_norm.weight", *gains_and_biases}


def test_muon_on_qwen_moe_shared_experts_and_untied_head() -> None:
    """The shared expert's SwiGLU w1 holds gate and up (two matrices); the untied head stays on AdamW."""
    cfg = compose(["+exp=qwen15_moe_a27b", "parallel.pp=1", "parallel.ep=1", "model.num_layers=1",
                   "model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=4", "model.head_dim=16",
                   "model.vocab_size=100", "moe.num_experts=4", "moe.ffn_hidden_size=32",
                   "moe.shared_expert_ffn_hidden_size=48", "train.optimizer=muon"])
    muon, adamw = _muon_names(cfg)
    assert muon["layers.0.mlp.shared_experts.w1.weight"] == Matrices(2, 48, 64)
    assert muon["layers.0.mlp.shared_experts.w2.weight"] == Matrices(1, 64, 48)
    assert muon["layers.0.mlp.shared_expert_gate.weight"] == Matrices(1, 1, 64)
    assert muon["layers.0.mlp.experts.w1"] == Matrices(8, 32, 64)
    assert {"embed.weight", "lm_head.weight", "layers.0.attn.q_proj.bias"} <= adamw
    assert not adamw & set(muon)


def test_build_optimizer_muon_uses_cfg() -> None:
    muon_cfg = MuonConfig(momentum=0.9, nesterov=False, ns_steps=3, adjust_lr="original")
    opt = build_optimizer(_Toy(), _cfg(optimizer="muon", muon=muon_cfg, beta1=0.8))
    assert type(opt) is HybridOptimizer and opt.state_dtype is None
    muon, decay, no_decay = opt.param_groups
    assert {k: muon[k] for k in ("rule", "lr", "weight_decay", "momentum", "nesterov", "ns_steps", "adjust_lr")} == {
        "rule": "muon", "lr": 1e-2, "weight_decay": 0.1, "momentum": 0.9, "nesterov": False, "ns_steps": 3,
        "adjust_lr": "original"}
    assert (decay["rule"], decay["betas"], no_decay["weight_decay"]) == ("adamw", (0.8, 0.95), 0.0)


class _Matrices(nn.Module):
    """Every kind of parameter Muon sees, and AdamW's kinds next to them."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.conv = nn.Conv1d(8, 4, kernel_size=2)  # [4, 8, 2] → one 4 × 16 matrix; its bias on AdamW
        self.proj = nn.Linear(8, 12, bias=False)
        self.ffn = SwiGLU(8, 6)  # w1 [12, 8]: gate and up, two 6 × 8 matrices
        self.experts = ExpertBank(3, 0, 8, 6)  # w1 [3, 12, 8] → 6 matrices 6 × 8; w2 [3, 8, 6] → 3 of 8 × 6
        self.norm = nn.RMSNorm(8)
        for p in self.parameters():
            nn.init.normal_(p, std=0.5)


def _train_muon(steps: int, **cfg: object) -> tuple[nn.Module, list[list[torch.Tensor]], torch.optim.Optimizer]:
    """A few Muon steps on fixed random gradients; returns the model, the gradients, the optimizer."""
    torch.manual_seed(0)
    model = _Matrices()
    opt = build_optimizer(model, _cfg(optimizer="muon", **cfg), [model.embed.weight])
    grads = []
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return model, grads, opt


def _reference_muon(w: torch.Tensor, grads: list[torch.Tensor], matrices: Matrices, lr: float, wd: float,
                    momentum: float = 0.95) -> torch.Tensor:
    """Moonlight's Muon in float64, matrix by matrix: B ← μB + G, U = G + μB (Nesterov), decoupled
    decay, update 0.2·√max(A, B)·NS(U)."""
    w, buffer = w.double(), torch.zeros_like(w, dtype=torch.float64)
    for g in (g.double() for g in grads):
        buffer = momentum * buffer + g
        u = matrices.view(g + momentum * buffer)
        update = torch.stack([reference_newton_schulz(m) for m in u]).reshape(w.shape)
        w = w * (1 - lr * wd) - lr * 0.2 * math.sqrt(max(matrices.rows, matrices.cols)) * update
    return w


def test_muon_update_matches_its_definition() -> None:
    """Muon on the matrices (per matrix: banks, stacked gate / up and convolutions included), AdamW on
    the embedding, the norm and the bias, in one step."""
    steps, lr = 3, 1e-2
    trained, grads, opt = _train_muon(steps)
    torch.manual_seed(0)
    model = _Matrices()
    matrices = {
        "conv.weight": Matrices(1, 4, 16), "proj.weight": Matrices(1, 12, 8), "ffn.w1.weight": Matrices(2, 6, 8),
        "ffn.w2.weight": Matrices(1, 8, 6), "experts.w1": Matrices(6, 6, 8), "experts.w2": Matrices(3, 8, 6)}
    for i, (name, p) in enumerate(model.named_parameters()):
        history = [grads[t][i] for t in range(steps)]
        if name in matrices:
            expected = _reference_muon(p.detach(), history, matrices[name], lr, 0.1)
        else:
            expected = reference_adamw(p.detach(), history, lr, 0.1 if name == "embed.weight" else 0.0)
        got = dict(trained.named_parameters())[name].detach().double()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)
        assert name in matrices or set(opt.state[dict(trained.named_parameters())[name]]) == {"step", "exp_avg",
                                                                                             "exp_avg_sq"}


def test_adamw_in_pieces_equals_adamw_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """The AdamW rule runs over pieces of each parameter (bounded temporaries): same bits as whole."""
    whole = _train_muon(2, optimizer_state_dtype="bf16")[0]
    monkeypatch.setattr(optim, "ELEMENTWISE_CHUNK", 7)
    pieces = _train_muon(2, optimizer_state_dtype="bf16")[0]
    for (name, a), b in zip(whole.named_parameters(), pieces.parameters()):
        assert torch.equal(a, b), name


def test_muon_is_deterministic_on_cpu() -> None:
    a, b = _train_muon(3)[0], _train_muon(3)[0]
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


# ---------------------------------------------------------------------------------------------
# Optimizer state in bf16


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_bf16_state_is_bf16_and_survives_a_state_dict_round_trip(optimizer: str) -> None:
    torch.manual_seed(0)
    model = _Matrices()
    opt = build_optimizer(model, _cfg(optimizer=optimizer, optimizer_state_dtype="bf16"), [model.embed.weight])
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    kinds = {key for state in opt.state.values() for key in state}
    assert kinds == ({"momentum_buffer", "step", "exp_avg", "exp_avg_sq"} if optimizer == "muon"
                     else {"step", "exp_avg", "exp_avg_sq"})
    assert all(value.dtype == (torch.float32 if key == "step" else torch.bfloat16)
               for state in opt.state.values() for key, value in state.items())
    saved = {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    opt.load_state_dict(opt.state_dict())  # torch would cast the state to the weights' fp32
    for p, state in opt.state.items():
        for key, value in state.items():
            assert value.dtype == saved[p][key].dtype and torch.equal(value, saved[p][key]), key


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_bf16_state_follows_fp32_state_on_a_run(optimizer: str) -> None:
    """The tiny model learning one batch by heart (the loss falls by ~half in 12 steps): bf16 state's
    losses stay within 0.5% of fp32 state's, the state's rounding error (2⁻⁹) not compounding."""
    runs = []
    for dtype in ("fp32", "bf16"):
        cfg = compose(["+exp=tiny", "train.global_batch=4", "train.seq_len=32", "train.warmup_steps=1",
                       f"train.optimizer={optimizer}", f"train.optimizer_state_dtype={dtype}"])
        grid = init_grid(1, 1, timeout_s=60)
        try:
            trainer = build_trainer(cfg, grid)
            batch = next(iter(trainer.loader))
            runs.append(torch.tensor([train_step(trainer, batch, report_routing=False).loss for _ in range(12)]))
        finally:
            shutdown()
    fp32, bf16 = runs
    assert fp32[-1] < 0.75 * fp32[0]
    torch.testing.assert_close(bf16, fp32, rtol=5e-3, atol=0)
    assert not torch.equal(bf16, fp32)  # the state really was rounded
