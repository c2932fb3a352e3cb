"""The Qwen2-MoE adapter against transformers' own ``Qwen2MoeForCausalLM``: the logits of an
imported model, exact round trips through the files, our exports running in transformers (and
generating our text with their tokenizer), the release's layout and config.json, what from-hf
carries over, streaming, and one-line refusals."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2MoeForCausalLM

from megamoe.checkpoint import hf_files, iter_model_tensors, read_config, write_model_checkpoint
from megamoe.config import compose
from megamoe.config.layers import layer_freq_of, moe_layer_flags
from megamoe.errors import ConfigError, UserError
from megamoe.models.hf_mapping import TokenIds
from megamoe.models.qwen_moe import hf
from tests.inference.helpers import lively_model
from tests.launch.test_convert_checkpoint import convert
from tests.launch.test_generate import script as generate_script
from tests.models.helpers import Tracker, load_model, model_tensors, random_model
from tests.models.qwen_moe.conftest import Release, token_ids

TINY = ["+exp=qwen_moe_tiny"]
MIXED_KEYS = ("decoder_sparse_step", "mlp_only_layers")

# Qwen/Qwen1.5-MoE-A2.7B's config.json on the Hugging Face hub (transformers 4.40's Qwen2MoeConfig keys).
RELEASE_CONFIG = {
    "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 5632, "max_position_embeddings": 8192, "max_window_layers": 21, "model_type": "qwen2_moe",
    "num_attention_heads": 16, "num_hidden_layers": 24, "num_key_value_heads": 16, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936, "decoder_sparse_step": 1,
    "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632, "num_experts_per_tok": 4,
    "num_experts": 60, "norm_topk_prob": False, "output_router_logits": False, "router_aux_loss_coef": 0.001,
}


def hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    return dict(hf_files.iter_hf_tensors(hf_dir))


def imported_model(checkpoint: Path) -> torch.nn.Module:
    return load_model(read_config(checkpoint), iter_model_tensors(checkpoint))


# ---- against transformers


def test_imported_model_computes_transformers_logits(release: Release) -> None:
    ids = token_ids()
    with torch.no_grad():
        reference, ours = release.model(ids).logits, imported_model(release.checkpoint)(ids)
    assert reference.abs().max() > 1.0  # not a comparison of near-zero logits
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)


def test_dense_layers_between_moe_ones_import_and_export_exactly(mixed_release: Release, tmp_path: Path) -> None:
    """decoder_sparse_step / mlp_only_layers become moe.layer_freq (with transformers' phase: step 2
    makes layers 1 and 3 sparse), the imported model computes transformers' logits, and to-hf /
    from-hf reproduce the files and the checkpoint bit for bit."""
    sparse = tuple(type(layer.mlp).__name__ == "Qwen2MoeSparseMoeBlock" for layer in mixed_release.model.model.layers)
    cfg = read_config(mixed_release.checkpoint)
    assert moe_layer_flags(cfg.model, cfg.moe) == sparse and 0 < sum(sparse) < 4
    ids = token_ids()
    with torch.no_grad():
        reference, ours = mixed_release.model(ids).logits, imported_model(mixed_release.checkpoint)(ids)
    assert reference.abs().max() > 1.0
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)

    convert.main(["to-hf", "--checkpoint", str(mixed_release.checkpoint), "--output", str(tmp_path / "hf")])
    original, exported = hf_tensors(mixed_release.hf_dir), hf_tensors(tmp_path / "hf")
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    release_keys = {key: getattr(mixed_release.model.config, key) for key in MIXED_KEYS}
    assert {key: config[key] for key in MIXED_KEYS} == release_keys

    convert.main(["from-hf", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "back"), *TINY])
    imported, back = dict(iter_model_tensors(mixed_release.checkpoint)), dict(iter_model_tensors(tmp_path / "back"))
    assert sorted(back) == sorted(imported)
    for name, tensor in imported.items():
        assert torch.equal(back[name], tensor), name


def test_imported_config_is_the_architecture(release: Release) -> None:
    cfg = read_config(release.checkpoint)
    m, moe = cfg.model, cfg.moe
    assert (m.family, m.num_kv_heads, m.head_dim, m.rotary_base) == ("qwen_moe", 2, 16, 1e6)
    assert (moe.router_order, moe.norm_topk_prob, moe.shared_expert_ffn_hidden_size) == ("softmax_topk", False, 64)
    assert {name: tuple(shape) for name, shape in hf_files.hf_tensor_shapes(cfg).items()} == \
        {name: tuple(t.shape) for name, t in hf_tensors(release.hf_dir).items()}


def test_export_reproduces_the_files_and_import_reproduces_the_checkpoint(release: Release, tmp_path: Path) -> None:
    convert.main(["to-hf", "--checkpoint", str(release.checkpoint), "--output", str(tmp_path / "hf"),
                  "--max-shard-size", "200KB"])
    original, exported = hf_tensors(release.hf_dir), hf_tensors(tmp_path / "hf")
    assert sorted(exported) == sorted(original) and len(list((tmp_path / "hf").glob("*.safetensors"))) > 2
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    with torch.no_grad():  # transformers reads our config.json as the architecture it wrote
        reloaded = Qwen2MoeForCausalLM.from_pretrained(tmp_path / "hf").eval()
        assert torch.equal(reloaded(token_ids()).logits, release.model(token_ids()).logits)

    convert.main(["from-hf", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "back"), *TINY])
    imported, back = dict(iter_model_tensors(release.checkpoint)), dict(iter_model_tensors(tmp_path / "back"))
    assert sorted(back) == sorted(imported)
    for name, tensor in imported.items():
        assert torch.equal(back[name], tensor), name


@pytest.mark.parametrize("overrides", [
    ["model.tie_embeddings=true", "moe.router_order=topk_softmax"],
    ["model.num_kv_heads=1", "moe.norm_topk_prob=true", "moe.num_shared_experts=2",
     "moe.shared_expert_ffn_hidden_size=16", "model.rotary_base=10000"],
    ["moe.layer_freq=2"],  # Megatron's phase, layers 0 and 2: decoder_sparse_step 1, mlp_only_layers [1, 3]
])
def test_our_export_runs_in_transformers(overrides: list[str], tmp_path: Path) -> None:
    cfg = compose(TINY + overrides)
    model = random_model(cfg)
    write_model_checkpoint(tmp_path / "ours", model_tensors(model), cfg)
    convert.main(["to-hf", "--checkpoint", str(tmp_path / "ours"), "--output", str(tmp_path / "hf")])
    ids = token_ids()
    with torch.no_grad():
        reference = Qwen2MoeForCausalLM.from_pretrained(tmp_path / "hf").eval()(ids).logits
        ours = model(ids)
    assert reference.abs().max() > 0.1
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)


def test_an_export_generates_our_greedy_text_in_transformers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """AutoModelForCausalLM + AutoTokenizer on the export, generate(do_sample=False): the text
    launch/generate.py --greedy prints (the byte tokenizer, 262 ids in 512 embedding rows)."""
    cfg = compose(TINY)
    write_model_checkpoint(tmp_path / "ckpt" / "step_1", model_tensors(lively_model(TINY)), cfg)
    convert.main(["to-hf", "--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    capsys.readouterr()
    for prompt in ("The ", "北京", "Alice has 12 apples"):
        generate_script.main(["--checkpoint", str(tmp_path / "ckpt"), "--prompt", prompt, "--greedy",
                              "--max-new-tokens", "24", "--device", "cpu"])
        ours = capsys.readouterr().out
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=24)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        if new[-1] == tokenizer.eos_token_id:  # where ours stopped, without printing it
            new.pop()
        assert max(new) < 262  # the suppressed padding rows were never chosen
        theirs = prompt + tokenizer.decode(new)
        assert ours == theirs + "\n", prompt  # both print an incomplete UTF-8 tail as U+FFFD


def test_from_hf_needs_no_training_key_and_carries_the_training_settings(release: Release, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """128 positions, fewer than the default train.seq_len of 4096: a sequence length that fits,
    said in one line; router_aux_loss_coef and initializer_range come along (and go back out),
    unless the command line sets them."""
    hf_dir = tmp_path / "hf"
    shutil.copytree(release.hf_dir, hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "router_aux_loss_coef": 0.005,
                                                    "initializer_range": 0.0125}))
    convert.main(["from-hf", "--hf", str(hf_dir), "--output", str(tmp_path / "plain")])
    assert ("note: train.seq_len=128, the model's max_position_embeddings (the default 4096 does not fit); set "
            "train.seq_len to choose another\n") in capsys.readouterr().err
    cfg = read_config(tmp_path / "plain")
    assert (cfg.train.seq_len, cfg.moe.aux_loss_coeff, cfg.model.init_std) == (128, 0.005, 0.0125)
    convert.main(["to-hf", "--checkpoint", str(tmp_path / "plain"), "--output", str(tmp_path / "back")])
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (back["router_aux_loss_coef"], back["initializer_range"]) == (0.005, 0.0125)

    convert.main(["from-hf", "--hf", str(hf_dir), "--output", str(tmp_path / "set"), "moe.aux_loss_coeff=0.01",
                  "train.seq_len=64"])
    assert "note:" not in capsys.readouterr().err
    cfg = read_config(tmp_path / "set")
    assert (cfg.train.seq_len, cfg.moe.aux_loss_coeff, cfg.model.init_std) == (64, 0.01, 0.0125)
    with pytest.raises(SystemExit):
        convert.main(["from-hf", "--hf", str(hf_dir), "--output", str(tmp_path / "long"), "train.seq_len=256"])
    assert capsys.readouterr().err.startswith("error: train.seq_len: 256 exceeds model.max_position_embeddings=128")


# ---- the release


def test_release_config_is_the_exp_config() -> None:
    """configs/exp/qwen15_moe_a27b.yaml builds the architecture the release's config.json
    describes, and writes it back."""
    cfg = compose(["+exp=qwen15_moe_a27b"])
    for section, values in hf.config_from_hf(RELEASE_CONFIG).items():
        for key, value in values.items():
            assert cfg[section][key] == value, f"{section}.{key}"
    written = hf.hf_config(cfg, TokenIds(eod=151643))  # Qwen's <|endoftext|>
    assert {key: written[key] for key in RELEASE_CONFIG if key in written} == \
        {key: value for key, value in RELEASE_CONFIG.items() if key in written}


def test_release_tensors_on_the_meta_device() -> None:
    cfg = compose(["+exp=qwen15_moe_a27b"])
    shapes = {name: tuple(shape) for name, shape in hf_files.hf_tensor_shapes(cfg).items()}
    per_layer = 2 + 7 + 1 + 3 * 60 + 3 + 1  # norms, q/k/v (+ biases) / o, router, experts, shared expert, its gate
    assert len(shapes) == 3 + 24 * per_layer
    assert shapes["lm_head.weight"] == shapes["model.embed_tokens.weight"] == (151936, 2048)
    assert shapes["model.layers.23.self_attn.k_proj.bias"] == (2048,)
    assert shapes["model.layers.0.mlp.gate.weight"] == (60, 2048)
    assert shapes["model.layers.0.mlp.experts.59.gate_proj.weight"] == (1408, 2048)
    assert shapes["model.layers.0.mlp.experts.59.down_proj.weight"] == (2048, 1408)
    assert shapes["model.layers.0.mlp.shared_expert.up_proj.weight"] == (5632, 2048)
    assert shapes["model.layers.0.mlp.shared_expert_gate.weight"] == (1, 2048)


# ---- the mapping


@pytest.mark.parametrize("overrides", [
    [], ["model.tie_embeddings=true", "model.num_kv_heads=4", "moe.norm_topk_prob=true"],
])
def test_config_round_trip(overrides: list[str]) -> None:
    cfg = compose(TINY + overrides)
    for section, values in hf.config_from_hf(json.loads(json.dumps(hf.hf_config(cfg, TokenIds(256))))).items():
        for key, value in values.items():
            assert cfg[section][key] == value, f"{section}.{key}"


@pytest.mark.parametrize("direction", ["to_hf", "from_hf"])
def test_mapping_streams_holding_at_most_one_pair(direction: str) -> None:
    cfg = compose(TINY)
    source = list(model_tensors(random_model(cfg)))
    if direction == "from_hf":
        source = sorted(hf.to_hf(source, cfg))  # transformers' files list their tensors by name
    tracker = Tracker(source)
    count = sum(1 for _ in getattr(hf, direction)(tracker, cfg))
    pairs = 4 * (8 + 1)  # per layer, each expert's and the shared expert's w1 ↔ gate_proj, up_proj
    assert count == len(source) + (pairs if direction == "to_hf" else -pairs)
    assert tracker.peak_count <= 2  # the tensor just passed on, and a gate_proj waiting for its up_proj


@pytest.mark.parametrize("layers", [4, 5])
def test_every_mix_of_layers_maps_to_transformers_rule_and_back(layers: int) -> None:
    """Each pattern of MoE and dense layers: config.json's decoder_sparse_step / mlp_only_layers
    make transformers build exactly those (its rule), and reading them back gives a
    moe.layer_freq that selects them again."""
    for pattern in itertools.product([False, True], repeat=layers):
        if not any(pattern):
            continue
        step, mlp_only = hf.sparse_layout(pattern)
        assert tuple(i not in mlp_only and (i + 1) % step == 0 for i in range(layers)) == pattern
        config = {**RELEASE_CONFIG, "num_hidden_layers": layers, "decoder_sparse_step": step,
                  "mlp_only_layers": mlp_only}
        freq = hf.config_from_hf(config)["moe"]["layer_freq"]
        assert freq == layer_freq_of(pattern)
        cfg = compose(TINY + [f"model.num_layers={layers}", f"moe.layer_freq={json.dumps(freq).replace(' ', '')}"])
        assert moe_layer_flags(cfg.model, cfg.moe) == pattern


def test_an_incomplete_pair_names_the_expert() -> None:
    cfg = compose(TINY)
    tensors = [(n, t) for n, t in hf.to_hf(model_tensors(random_model(cfg)), cfg)
               if n != "model.layers.2.mlp.experts.5.up_proj.weight"]
    with pytest.raises(UserError, match=r"^model\.layers\.2\.mlp\.experts\.5: found gate_proj\.weight but not up_proj"):
        list(hf.from_hf(tensors, cfg))


# ---- refusals


@pytest.mark.parametrize(("override", "key"), [
    ("model.ffn_type=dense", "model.ffn_type"),
    ("model.head_dim=32", "model.head_dim"),
    ("model.rotary_percent=0.5", "model.rotary_percent"),
    ("model.qkv_bias=false", "model.qkv_bias"),
    ("moe.router=attention", "moe.router"),
    ("moe.noisy_gating=true", "moe.noisy_gating"),
    ("moe.router_mode=expert_choice", "moe.router_mode"),
    ("moe.aux_free_bias=true", "moe.aux_free_bias"),
    ("moe.capacity_factor=1.25", "moe.capacity_factor"),
    ("moe.num_shared_experts=0", "moe.num_shared_experts"),
    ("moe.shared_expert_gate=false", "moe.shared_expert_gate"),
])
def test_refuses_what_the_format_cannot_express(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        hf.hf_config(compose(TINY + [override]), TokenIds(256))
    assert str(info.value).startswith(f"{key}: ") and "\n" not in str(info.value)


def test_a_refusal_names_the_setting_that_exports() -> None:
    with pytest.raises(ConfigError, match=r"^model.head_dim: 32 .*hidden_size / num_heads = 16 wide: train with "
                                          r"model.head_dim=16$"):
        hf.check_exportable(compose(TINY + ["model.head_dim=32"]))


@pytest.mark.parametrize(("change", "key"), [
    (lambda c: c.pop("num_experts"), "num_experts"),
    (lambda c: c.update(model_type="qwen2"), "model_type"),
    (lambda c: c.update(decoder_sparse_step=0), "decoder_sparse_step"),
    (lambda c: c.update(mlp_only_layers=[24]), "mlp_only_layers"),
    (lambda c: c.update(mlp_only_layers=list(range(24))), "mlp_only_layers"),  # no MoE layer left: a dense model
    (lambda c: c.update(num_experts=0), "num_experts"),
    (lambda c: c.update(use_sliding_window=True), "use_sliding_window"),
    (lambda c: c.update(rope_scaling={"type": "yarn", "factor": 4.0}), "rope_scaling"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act"),
    (lambda c: c.update(head_dim=32), "head_dim"),
])
def test_config_from_hf_names_the_key_it_cannot_use(change, key: str) -> None:
    config = dict(RELEASE_CONFIG)
    change(config)
    with pytest.raises(UserError) as info:
        hf.config_from_hf(config, "x/config.json")
    assert str(info.value).startswith(f"x/config.json: '{key}' ") and "\n" not in str(info.value)
