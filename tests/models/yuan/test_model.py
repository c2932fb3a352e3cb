"""The Yuan decoder: names, causality, stage splits, meta-device init, tying, and learning."""

import math
from typing import Sequence

import pytest
import torch
from omegaconf import DictConfig

from megamoe.config import compose
from megamoe.models import build_stage
from megamoe.nn.decoder import Decoder
from megamoe.nn.ffn import SwiGLU
from megamoe.nn.loss import lm_loss
from megamoe.nn.moe.layer import MoELayer

SEED = 1234


def tiny(*overrides: str) -> DictConfig:
    return compose(["+exp=tiny", *overrides])


def built(cfg: DictConfig, first: int = 0, last: int | None = None, pre: bool = True, post: bool = True) -> Decoder:
    model = build_stage(cfg, range(first, cfg.model.num_layers if last is None else last), pre, post)
    model.reset_parameters(SEED)
    return model


def tokens(cfg: DictConfig, batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.model.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_parameter_names_use_global_layer_indices() -> None:
    model = built(tiny(), first=2, last=4, pre=False)
    layer = {
        "input_norm.weight", "post_attn_norm.weight",
        "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.o_proj.weight",
        "attn.lf.conv1.weight", "attn.lf.conv1.bias", "attn.lf.conv2.weight", "attn.lf.conv2.bias",
        "attn.lf.norm.weight",
        "mlp.router.query.weight", "mlp.router.key.weight", "mlp.router.value.weight",
        "mlp.experts.w1", "mlp.experts.w2",
    }
    expected = {f"layers.{i}.{name}" for i in (2, 3) for name in layer} | {"final_norm.weight", "lm_head.weight"}
    assert set(dict(model.named_parameters())) == expected
    assert model.layers["2"].attn.lf.conv1.weight.shape == (32, 64, 2)  # [out, in, kernel], index 0 = previous token


def test_first_stage_has_embedding_only_and_returns_hidden() -> None:
    cfg = tiny()
    model = built(cfg, 0, 2, post=False)
    assert {n for n, _ in model.named_parameters() if not n.startswith("layers.")} == {"embed.weight"}
    assert model(tokens(cfg)).shape == (2, 16, cfg.model.hidden_size)


@pytest.mark.parametrize("ffn_type", ["moe", "dense"])
def test_no_logit_depends_on_a_later_token(ffn_type: str) -> None:
    """In float64, so that the MoE's batch-dependent matmul blocking (rounding at 1e-7 in fp32)
    cannot hide a real leak, which would be of the order of the logits themselves."""
    cfg = tiny(f"model.ffn_type={ffn_type}")
    model = built(cfg).double().eval()
    x = tokens(cfg, batch=1, seq=12)
    with torch.no_grad():
        base = model(x)
        for t in (0, 5, 11):
            changed = x.clone()
            changed[0, t] = (changed[0, t] + 1) % cfg.model.vocab_size
            moved = (model(changed) - base).abs().amax(-1)[0]
            assert torch.all(moved[:t] < 1e-12), f"a logit before token {t} depends on it"
            assert moved[t] > 1e-3


@pytest.mark.parametrize("tie", [True, False])
def test_pipeline_stages_in_sequence_equal_the_full_model(tie: bool) -> None:
    cfg = tiny(f"model.tie_embeddings={str(tie).lower()}")
    x = tokens(cfg)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1]]).expand(2, -1)  # restarts after EODs
    first, second = built(cfg, 0, 2, post=False), built(cfg, 2, 4, pre=False)
    with torch.no_grad():
        staged = second(first(x, positions), positions)
        full = built(cfg)(x, positions)
    torch.testing.assert_close(staged, full, rtol=0, atol=0)


def test_tied_head_counts_once_and_a_head_only_stage_starts_equal_to_the_embedding() -> None:
    cfg = tiny()
    full = built(cfg)
    assert full.lm_head is None
    assert "lm_head.weight" not in dict(full.named_parameters())
    head_stage = built(cfg, 2, 4, pre=False)
    assert torch.equal(head_stage.lm_head.weight, full.embed.weight)
    untied = built(tiny("model.tie_embeddings=false"))
    assert not torch.equal(untied.lm_head.weight, untied.embed.weight)


def test_meta_build_then_materialise_equals_eager_build() -> None:
    cfg = tiny("moe.num_shared_experts=1")
    with torch.device("meta"):
        model = build_stage(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.reset_parameters(SEED)
    eager = built(cfg)
    for (name, p), (_, q) in zip(model.named_parameters(), eager.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert torch.equal(model(tokens(cfg)), eager(tokens(cfg)))


def test_reset_parameters_follows_the_definition() -> None:
    model = built(tiny())
    layer = model.layers["1"]
    assert torch.equal(layer.input_norm.weight, torch.ones(64))
    assert torch.equal(layer.attn.lf.conv1.bias, torch.zeros(32))
    std = layer.attn.q_proj.weight.std().item()
    assert 0.018 < std < 0.022  # init_std 0.02
    assert not torch.equal(layer.attn.q_proj.weight, model.layers["0"].attn.q_proj.weight)
    assert not torch.equal(layer.attn.q_proj.weight, layer.attn.k_proj.weight)


def test_ffn_type_and_moe_layers() -> None:
    moe = built(tiny())
    assert [layer.layer_index for layer in moe.moe_layers()] == [0, 1, 2, 3]
    assert all(isinstance(layer, MoELayer) for layer in moe.moe_layers())
    dense = built(tiny("model.ffn_type=dense"))
    assert isinstance(dense.layers["0"].mlp, SwiGLU)
    assert list(dense.moe_layers()) == []
    mixed = built(tiny("moe.layer_freq=[0,1,1,0]", "model.dense_ffn_hidden_size=96"))
    assert [layer.layer_index for layer in mixed.moe_layers()] == [1, 2]
    assert mixed.layers["3"].mlp.w2.weight.shape == (64, 96)


def reference_lm_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[label], averaged over the unmasked positions, one at a time."""
    terms = [-torch.log_softmax(logits[b, s].double(), -1)[labels[b, s]]
             for b in range(labels.shape[0]) for s in range(labels.shape[1]) if mask[b, s]]
    return torch.stack(terms).mean()


def test_lm_loss_is_the_masked_mean_cross_entropy() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11).bfloat16()
    labels = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]])
    loss = lm_loss(logits, labels, mask)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), reference_lm_loss(logits, labels, mask), rtol=1e-6, atol=1e-6)


def train_losses(cfg: DictConfig, steps: int) -> Sequence[float]:
    torch.manual_seed(0)
    model = built(cfg)
    batch = tokens(cfg, batch=2, seq=33)
    inputs, labels = batch[:, :-1], batch[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = lm_loss(model(inputs), labels, torch.ones_like(labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_tiny_moe_loss_falls_on_a_fixed_batch() -> None:
    losses = train_losses(tiny(), steps=50)
    assert losses[0] == pytest.approx(math.log(512), abs=0.2)  # near-uniform predictions at init
    assert losses[-1] < losses[0] / 4
