"""Upcycling: at step 0 the MoE computes what the dense model computes (with or without a gated
shared expert, in every layer or in those moe.layer_freq selects); the router is a seeded fresh one."""

from __future__ import annotations

import pytest
import torch

from megamoe.checkpoint.store import model_tensor_shapes
from megamoe.checkpoint.upcycle import upcycle, upcycled_config
from megamoe.config import compose
from megamoe.config.layers import moe_layer_flags
from megamoe.errors import ConfigError
from megamoe.models import build_stage
from tests.models.helpers import load_model, model_tensors, random_model

DENSE = ["+exp=tiny", "model.ffn_type=dense", "model.dense_ffn_hidden_size=96"]
# Qwen1.5-MoE's way: the dense FFN (width 128) into fine-grained experts and a gated shared expert;
# its routing (softmax_topk, norm_topk_prob false) is renormalised by upcycling.
QWEN_DENSE = ["+exp=qwen_moe_tiny", "model.ffn_type=dense"]


@pytest.mark.parametrize(("dense_overrides", "copies", "granularity", "top_k", "shared", "layer_freq"), [
    (DENSE, 4, 1, 2, False, 1),
    (DENSE, 3, 2, 2, False, 1),
    (DENSE + ["moe.router_order=softmax_topk", "moe.aux_free_bias=true"], 2, 3, 1, False, 1),
    (QWEN_DENSE, 4, 1, 1, True, 1),
    (QWEN_DENSE, 2, 4, 1, True, 1),
    (DENSE + ["moe.router_order=softmax_topk", "moe.norm_topk_prob=false"], 3, 3, 1, True, 1),
    (DENSE, 4, 2, 1, False, "([0]*2+[1]*2)"),  # DeepSeek-style dense first layers
    (QWEN_DENSE, 2, 2, 1, True, 2),  # layers 0 and 2
])
def test_upcycled_model_computes_the_dense_model(dense_overrides: list[str], copies: int, granularity: int,
                                                 top_k: int, shared: bool, layer_freq: int | str) -> None:
    dense_cfg = compose(dense_overrides)
    dense = random_model(dense_cfg)
    width = dense_cfg.model.dense_ffn_hidden_size
    cfg = upcycled_config(dense_cfg, copies, granularity, top_k, shared, layer_freq)
    assert (cfg.moe.num_experts, cfg.moe.ffn_hidden_size, cfg.moe.top_k) == (copies * granularity, width // granularity,
                                                                               top_k * granularity)
    assert (cfg.moe.num_shared_experts, cfg.moe.shared_expert_gate) == (int(shared), shared)
    tensors = list(upcycle(model_tensors(dense), cfg, granularity, seed=7))
    assert sorted(name for name, _ in tensors) == sorted(model_tensor_shapes(cfg))  # every tensor, each once
    kept = [name for name in dict(tensors) if name.endswith(".mlp.w1.weight")]  # the dense layers' FFNs, as they were
    assert kept == [f"layers.{i}.mlp.w1.weight" for i, moe in enumerate(moe_layer_flags(cfg.model, cfg.moe)) if not moe]
    moe = load_model(cfg, tensors)
    ids = torch.randint(0, dense_cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = dense(ids), moe(ids)
        routing = next(moe.moe_layers()).last_stats.tokens_per_expert
    assert (routing > 0).sum() > top_k * granularity  # tokens really spread over the experts
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)


def test_experts_are_copies_of_the_dense_ffn_slices() -> None:
    dense_cfg = compose(DENSE)
    dense = dict(model_tensors(random_model(dense_cfg)))
    cfg = upcycled_config(dense_cfg, copies=2, granularity=3, top_k=1)
    moe = dict(upcycle(dense.items(), cfg, granularity=3, seed=7))
    w1, w2 = dense["layers.1.mlp.w1.weight"], dense["layers.1.mlp.w2.weight"]
    for expert in range(6):
        g = expert % 3
        rows = list(range(32 * g, 32 * g + 32))
        assert torch.equal(moe[f"layers.1.mlp.experts.{expert}.w1"], torch.cat([w1[rows], w1[[96 + r for r in rows]]]))
        assert torch.equal(moe[f"layers.1.mlp.experts.{expert}.w2"], w2[:, rows] * 3)
    for name in dense:
        if ".mlp." not in name:
            assert torch.equal(moe[name], dense[name]), name
    single = dict(upcycle(dense.items(), upcycled_config(dense_cfg, copies=2), granularity=1, seed=7))
    assert torch.equal(single["layers.1.mlp.experts.1.w2"], w2)  # G = 1: bitwise copies


def test_router_is_a_fresh_seeded_one_in_virtual_groups() -> None:
    dense_cfg = compose(DENSE)
    dense = list(model_tensors(random_model(dense_cfg)))
    from_scratch = build_stage(upcycled_config(dense_cfg, copies=4))  # what training from scratch draws
    from_scratch.reset_parameters(seed=11)
    for granularity in (1, 2):
        cfg = upcycled_config(dense_cfg, copies=4, granularity=granularity)
        moe = dict(upcycle(dense, cfg, granularity, seed=11))
        for which in ("query", "key", "value"):
            fresh = from_scratch.state_dict()[f"layers.2.mlp.router.{which}.weight"]
            assert torch.equal(moe[f"layers.2.mlp.router.{which}.weight"], fresh.repeat_interleave(granularity, 0))
    other_seed = dict(upcycle(dense, upcycled_config(dense_cfg, copies=4), 1, seed=12))
    assert not torch.equal(other_seed["layers.2.mlp.router.query.weight"], moe["layers.2.mlp.router.query.weight"])


@pytest.mark.parametrize(("overrides", "args", "key"), [
    (["+exp=tiny"], (4, 1, 2), "model.ffn_type"),
    (DENSE + ["moe.router_mode=expert_choice"], (4, 1, 2), "moe.router_mode"),
    (DENSE, (4, 5, 2), "--granularity"),
    (DENSE, (2, 1, 3), "--top-k"),
    (DENSE, (0, 1, 1), "--num-experts"),
    (DENSE, (4, 1, 2, False, "[1,1]"), "--layer-freq"),
    (DENSE, (4, 1, 2, False, "[0,0,0,0]"), "--layer-freq"),
])
def test_config_mistakes_name_the_key(overrides: list[str], args: tuple, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        upcycled_config(compose(overrides), *args)
    assert str(info.value).startswith(f"{key}: ")
