"""The Yuan2-M32 HF mapping, checked against the official layout and an independent HF forward.

``hf_reference_logits`` re-implements the official Hugging Face forward from the facts of
docs/yuan2-m32.md (§3–§5, §8, §9) directly on the HF tensors: q/k split per head out of
cat(q_proj(x), k_proj(x)), LFA as Conv2d (2, 1) kernels with padding (1, 0) truncated to the
first s positions, V from the unfiltered input, rotary on hidden/heads dims, and routing
softmax → top-k → renormalise. Our model must produce the same logits from our tensors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from megamoe.checkpoint import hf_files
from megamoe.checkpoint.names import model_tensor_shapes
from megamoe.config import compose
from megamoe.errors import ConfigError, UserError
from megamoe.models.hf_mapping import TokenIds
from megamoe.models.yuan import hf
from tests.models.helpers import Tracker, model_tensors, random_model

# hidden 64, 4 heads of 32 (projection 128 = 2 × hidden, as M32's 4096 = 2 × 2048), rotary
# 0.5 × 32 = 16 = hidden / heads; 8 experts of ffn 128: the tiny example of docs/yuan2-m32.md §10.
TINY_HF = ["+exp=tiny", "model.head_dim=32"]


# ---- an independent forward of the official HF model, from docs/yuan2-m32.md


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    x1, x2 = rot.chunk(2, dim=-1)
    return torch.cat([rot * cos + torch.cat([-x2, x1], dim=-1) * sin, rest], dim=-1)


def hf_reference_logits(w: dict[str, torch.Tensor], config: dict, ids: torch.Tensor) -> torch.Tensor:
    hidden, heads, eps = config["hidden_size"], config["num_attention_heads"], config["rms_norm_eps"]
    d = config["attention_projection_size"] // heads
    moe = config["moe_config"]
    b, s = ids.shape
    rotary = hidden // heads
    inv_freq = 1.0 / config["rope_theta"] ** (torch.arange(0, rotary, 2, dtype=torch.float32) / rotary)
    angles = torch.outer(torch.arange(s, dtype=torch.float32), inv_freq)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    h = w["model.embed_tokens.weight"][ids]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = _rms(h, w[p + "input_layernorm.weight"], eps)
        # LFA in the official layout: [b, H, s, 1], Conv2d kernel (2, 1), padding (1, 0), keep the first s
        lf = p + "self_attn.lf_gate."
        y = x.transpose(1, 2).unsqueeze(-1)
        y = F.conv2d(y, w[lf + "conv1.weight"], w[lf + "conv1.bias"], padding=(1, 0))[:, :, :s]
        y = F.conv2d(y, w[lf + "conv2.weight"], w[lf + "conv2.bias"], padding=(1, 0))[:, :, :s]
        filtered = _rms(y.squeeze(-1).transpose(1, 2) + x, w[lf + "output_layernorm.weight"], eps)
        qk = torch.cat([filtered @ w[p + "self_attn.q_proj.weight"].T,
                        filtered @ w[p + "self_attn.k_proj.weight"].T], -1)
        q, k = qk.view(b, s, heads, 2 * d).chunk(2, dim=-1)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(b, s, heads, d)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, heads * d)
        h = h + attn @ w[p + "self_attn.o_proj.weight"].T

        x = _rms(h, w[p + "post_attention_layernorm.weight"], eps).reshape(b * s, hidden)
        rq, rk, rv = (x @ w[p + f"mlp.gate.{n}.weight"].T for n in ("query", "key", "value"))
        router_logits = ((rq[:, :, None] * rk[:, None, :]).softmax(-1) @ rv[:, :, None]).squeeze(-1)
        weights, experts = router_logits.softmax(-1).topk(moe["moe_top_k"], dim=-1)
        if moe["norm_topk_prob"]:
            weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(moe["moe_num_experts"]):
            gate, up = (x @ w[p + f"mlp.experts.{e}.w1.weight"].T).chunk(2, dim=-1)
            expert_out = (F.silu(gate) * up) @ w[p + f"mlp.experts.{e}.w2.weight"].T
            out += (weights * (experts == e)).sum(-1, keepdim=True) * expert_out
        h = h + out.view(b, s, hidden)
    return _rms(h, w["model.norm.weight"], eps) @ w["lm_head.weight"].T


# ---- tests


def test_names_and_shapes_are_the_official_ones() -> None:
    """docs/yuan2-m32.md §10's tiny example (hidden 64, 8 experts, ffn 128), name for name and shape for shape."""
    cfg = compose(TINY_HF)
    per_layer = {
        "input_layernorm.weight": (64,), "post_attention_layernorm.weight": (64,),
        "self_attn.q_proj.weight": (128, 64), "self_attn.k_proj.weight": (128, 64),
        "self_attn.v_proj.weight": (128, 64), "self_attn.o_proj.weight": (64, 128),
        "self_attn.lf_gate.conv1.weight": (32, 64, 2, 1), "self_attn.lf_gate.conv1.bias": (32,),
        "self_attn.lf_gate.conv2.weight": (64, 32, 2, 1), "self_attn.lf_gate.conv2.bias": (64,),
        "self_attn.lf_gate.output_layernorm.weight": (64,),
        **{f"mlp.gate.{n}.weight": (8, 64) for n in ("query", "key", "value")},
        **{f"mlp.experts.{e}.w1.weight": (256, 64) for e in range(8)},
        **{f"mlp.experts.{e}.w2.weight": (64, 128) for e in range(8)},
    }
    expected = {"model.embed_tokens.weight": (512, 64), "model.norm.weight": (64,)}
    expected.update({f"model.layers.{i}.{n}": shape for i in range(4) for n, shape in per_layer.items()})
    assert {n: tuple(s) for n, s in hf_files.hf_tensor_shapes(cfg).items()} == expected
    written = dict(hf.to_hf(model_tensors(random_model(cfg)), cfg))
    assert set(written) == set(expected) | {"lm_head.weight"}  # tied: the head is written as a copy
    assert torch.equal(written["lm_head.weight"], written["model.embed_tokens.weight"])


def test_m32_maps_to_the_released_shapes_and_config() -> None:
    """docs/yuan2-m32.md §2, §7, §8: the paper model's tensors and config.json (mapped on the meta device)."""
    cfg = compose(["+exp=m32_2000b"])
    shapes = {n: tuple(s) for n, s in hf_files.hf_tensor_shapes(cfg).items()}
    assert len(shapes) == 2 + 24 * (11 + 3 + 2 * 32)
    assert shapes["model.embed_tokens.weight"] == (135040, 2048)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (4096, 2048)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (4096, 2048)
    assert shapes["model.layers.23.self_attn.o_proj.weight"] == (2048, 4096)
    assert shapes["model.layers.23.self_attn.lf_gate.conv1.weight"] == (1024, 2048, 2, 1)
    assert shapes["model.layers.23.self_attn.lf_gate.conv2.weight"] == (2048, 1024, 2, 1)
    assert shapes["model.layers.5.mlp.gate.value.weight"] == (32, 2048)
    assert shapes["model.layers.5.mlp.experts.31.w1.weight"] == (16384, 2048)
    assert shapes["model.layers.5.mlp.experts.31.w2.weight"] == (2048, 8192)
    config = hf.hf_config(cfg, TokenIds(eod=77185, sep=77187))  # Yuan's tokenizer: <eod>, <sep>
    assert config["attention_projection_size"] == 4096 and config["tie_word_embeddings"] is True
    assert config["moe_config"] == {"moe_num_experts": 32, "moe_top_k": 2, "ffn_hidden_size": 8192,
                                    "norm_topk_prob": True, "gated_linear_unit": True}
    assert (config["eod_token"], config["sep_token"]) == (77185, 77187)
    assert config["bos_token_id"] == config["eos_token_id"] == config["pad_token_id"] == 77185


@pytest.mark.parametrize(("tokens", "sep"), [(TokenIds(eod=256), 256), (TokenIds(eod=5, sep=7), 7)])
def test_every_vocabulary_gets_the_token_ids_the_official_code_reads(tokens: TokenIds, sep: int) -> None:
    """Not only Yuan's 135040 (its modeling code reads config.eod_token / sep_token unconditionally)."""
    config = hf.hf_config(compose(TINY_HF), tokens)
    assert config["vocab_size"] == 512
    assert (config["eod_token"], config["sep_token"]) == (tokens.eod, sep)
    assert config["bos_token_id"] == config["eos_token_id"] == config["pad_token_id"] == tokens.eod


def test_qk_interleave_is_the_official_per_head_split() -> None:
    heads, d, hidden = 4, 8, 16
    wq, wk, x = torch.randn(heads * d, hidden), torch.randn(heads * d, hidden), torch.randn(3, hidden)
    q_proj, k_proj = hf.interleave_qk(wq, wk, heads)
    q, k = torch.cat([x @ q_proj.T, x @ k_proj.T], -1).view(3, heads, 2 * d).chunk(2, dim=-1)
    torch.testing.assert_close(q, (x @ wq.T).view(3, heads, d), rtol=0, atol=1e-6)
    torch.testing.assert_close(k, (x @ wk.T).view(3, heads, d), rtol=0, atol=1e-6)
    back_q, back_k = hf.deinterleave_qk(q_proj, k_proj, heads)
    assert torch.equal(back_q, wq) and torch.equal(back_k, wk)


@pytest.mark.parametrize("overrides", [[], ["model.tie_embeddings=false", "moe.router_order=softmax_topk",
                                             "moe.norm_topk_prob=false", "moe.top_k=3"]])
def test_logits_equal_an_independent_hf_forward(overrides: list[str]) -> None:
    cfg = compose(TINY_HF + overrides)
    model = random_model(cfg)
    weights = dict(hf.to_hf(model_tensors(model), cfg))
    config = json.loads(json.dumps(hf.hf_config(cfg, TokenIds(256))))  # exactly what config.json holds
    ids = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, reference = model(ids), hf_reference_logits(weights, config, ids)
    assert ours.abs().max() > 0.1  # not a vacuous comparison of near-zero logits
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("overrides", [[], ["model.tie_embeddings=false", "moe.router_order=softmax_topk",
                                             "moe.norm_topk_prob=false", "model.rotary_base=40890"]])
def test_config_round_trip(overrides: list[str]) -> None:
    cfg = compose(TINY_HF + overrides)
    architecture = hf.config_from_hf(json.loads(json.dumps(hf.hf_config(cfg, TokenIds(256)))))
    for section, values in architecture.items():
        for key, value in values.items():
            assert cfg[section][key] == value, f"{section}.{key}"


@pytest.mark.parametrize("masked", [False, True])
def test_config_json_records_whether_attention_stays_inside_documents(masked: bool) -> None:
    """The official code reads reset_attention_mask (docs/yuan2-m32.md §9): the export says what we trained with."""
    cfg = compose([*TINY_HF, "data.kind=indexed", "data.sources=[{path: x}]", f"data.reset_attention_mask={masked}"])
    assert hf.hf_config(cfg, TokenIds(256))["reset_attention_mask"] is masked


def test_tensor_round_trip_is_bitwise() -> None:
    cfg = compose(TINY_HF + ["model.tie_embeddings=false"])
    ours = dict(model_tensors(random_model(cfg).to(torch.bfloat16)))
    back = dict(hf.from_hf(hf.to_hf(ours.items(), cfg), cfg))
    assert list(back) == list(ours)
    for name, tensor in ours.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


@pytest.mark.parametrize(("override", "key"), [
    ("model.ffn_type=dense", "model.ffn_type"),
    ("moe.layer_freq=[0,1,1,1]", "moe.layer_freq"),  # no config.json key says which layers are dense
    ("model.use_lfa=false", "model.use_lfa"),
    ("model.rotary_percent=1.0", "model.rotary_percent"),
    ("moe.router=linear", "moe.router"),
    ("moe.num_shared_experts=1", "moe.num_shared_experts"),
    ("moe.aux_free_bias=true", "moe.aux_free_bias"),
])
def test_refuses_what_the_format_cannot_express(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        hf.hf_config(compose(TINY_HF + [override]), TokenIds(256))
    assert str(info.value).startswith(f"{key}: ") and "\n" not in str(info.value)


def test_a_mixed_stack_is_refused_naming_the_setting_that_exports() -> None:
    with pytest.raises(ConfigError) as info:
        hf.check_exportable(compose(TINY_HF + ["moe.layer_freq=2"]))
    assert str(info.value) == ("moe.layer_freq: 2 cannot be exported to the Yuan2-M32 Hugging Face format: every "
                               "layer there is MoE (its config.json has no key for dense layers): train with "
                               "moe.layer_freq=1")


def test_a_rotary_dim_it_cannot_run_names_the_settings_that_would() -> None:
    with pytest.raises(ConfigError, match=r"^model.rotary_percent: 0.5 \(rotary dim 8\) cannot be exported to the "
                                          r"Yuan2-M32 Hugging Face format: its code rotates hidden_size / num_heads = "
                                          r"16 dims of each head; a model it can run sets model.head_dim=32 or "
                                          r"model.rotary_percent=1.0$"):
        hf.check_exportable(compose(["+exp=tiny"]))  # head_dim 16, half of it rotated


@pytest.mark.parametrize(("change", "key"), [
    (lambda c: c.pop("hidden_size"), "hidden_size"),
    (lambda c: c["moe_config"].pop("moe_top_k"), "moe_config.moe_top_k"),
    (lambda c: c.update(model_type="llama"), "model_type"),
    (lambda c: c.update(use_shareqk=True), "use_shareqk"),
    (lambda c: c["moe_config"].update(gated_linear_unit=False), "moe_config.gated_linear_unit"),
    (lambda c: c.update(num_attention_heads=3), "num_attention_heads"),
])
def test_config_from_hf_names_the_key_it_cannot_use(change, key: str) -> None:
    config = hf.hf_config(compose(TINY_HF), TokenIds(256))
    change(config)
    with pytest.raises(UserError) as info:
        hf.config_from_hf(config, "x/config.json")
    assert f"'{key}'" in str(info.value) and str(info.value).startswith("x/config.json: ")


@pytest.mark.parametrize("direction", ["to_hf", "from_hf"])
def test_mapping_streams_holding_at_most_one_qk_pair(direction: str) -> None:
    cfg = compose(TINY_HF)
    source = list(model_tensors(random_model(cfg)))
    if direction == "from_hf":
        source = list(hf.to_hf(source, cfg))
    tracker = Tracker(source)
    count = sum(1 for _ in getattr(hf, direction)(tracker, cfg))
    assert len(source) > 100 and count >= len(source) - 1
    assert tracker.peak_count <= 2  # the tensor just passed on, and a q waiting for its k


def test_writer_streams_bounded_shards(tmp_path: Path) -> None:
    cfg = compose(TINY_HF)
    source = list(hf.to_hf(model_tensors(random_model(cfg)), cfg))
    sizes = [t.numel() * t.element_size() for _, t in source]
    max_shard, largest = 100_000, max(sizes)  # a few tensors per shard; the 131 KB embedding gets its own
    tracker = Tracker(source)
    summary = hf_files.write_hf_checkpoint(tmp_path / "hf", tracker, {"model_type": "yuan"}, max_shard)
    assert tracker.peak_bytes <= max_shard + largest < sum(sizes) / 10  # one shard held, never the model
    assert summary.tensors == len(source) and summary.bytes == sum(sizes) and summary.shards > 10
    index = json.loads((tmp_path / "hf" / hf_files.INDEX_FILE).read_text())
    assert set(index["weight_map"]) == {name for name, _ in source}
    assert index["metadata"]["total_size"] == sum(sizes)
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{k:05d}-of-{len(files):05d}.safetensors" for k in range(1, len(files) + 1)]
    loaded = {}
    for file in files:
        shard = load_file(tmp_path / "hf" / file)  # the reference safetensors reader
        assert sum(t.numel() * t.element_size() for t in shard.values()) <= max(max_shard, largest)
        loaded.update(shard)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in source)
    assert json.loads((tmp_path / "hf" / hf_files.CONFIG_FILE).read_text()) == {"model_type": "yuan",
                                                                                 "torch_dtype": "float32"}
    assert sorted(name for name, _ in hf_files.iter_hf_tensors(tmp_path / "hf")) == sorted(loaded)


def test_model_tensor_names_all_map() -> None:
    cfg = compose(TINY_HF + ["model.tie_embeddings=false"])
    for name in model_tensor_shapes(cfg):
        assert hf.NAMES.ours(hf.NAMES.hf(name)) == name
