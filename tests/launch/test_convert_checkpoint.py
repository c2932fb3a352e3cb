"""launch/convert_checkpoint.py as a user runs it: exact round trips, exports that load in
transformers with their tokenizer, upcycling, one-line errors, the help text."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from megamoe.checkpoint import iter_model_tensors, read_config, write_model_checkpoint
from megamoe.config import compose
from megamoe.data.tokenizer import ByteTokenizer, HuggingFaceTokenizer
from megamoe.errors import format_bytes
from tests.data.test_tokenizer import MIXED, hf_tokenizer_file
from tests.faults import small_filesystem
from tests.models.helpers import load_model, model_tensors, random_model
from tests.models.yuan.test_hf import TINY_HF

SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "convert_checkpoint.py"
spec = importlib.util.spec_from_file_location("convert_checkpoint", SCRIPT)
convert = importlib.util.module_from_spec(spec)
spec.loader.exec_module(convert)


def make_checkpoint(path: Path, overrides: list[str], dtype: torch.dtype = torch.float32) -> Path:
    cfg = compose(overrides)
    write_model_checkpoint(path, model_tensors(random_model(cfg).to(dtype)), cfg, shard_bytes=300_000)
    return path


@pytest.mark.parametrize(("overrides", "dtype"), [
    ([], torch.float32),
    (["model.tie_embeddings=false", "moe.router_order=softmax_topk", "moe.norm_topk_prob=false"], torch.bfloat16),
])
def test_to_hf_from_hf_round_trip_is_bitwise(tmp_path: Path, overrides: list[str], dtype: torch.dtype,
                                              capsys: pytest.CaptureFixture) -> None:
    source = make_checkpoint(tmp_path / "ckpt", TINY_HF + overrides, dtype)
    convert.main(["to-hf", "--checkpoint", str(source), "--output", str(tmp_path / "hf"), "--max-shard-size", "0.5MB"])
    assert "to-hf:" in capsys.readouterr().out
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 4 and all(path.stat().st_size < 600_000 for path in shards)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["torch_dtype"] == str(dtype).removeprefix("torch.")

    convert.main(["from-hf", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "back"), "+exp=tiny"])
    original, back = dict(iter_model_tensors(source)), dict(iter_model_tensors(tmp_path / "back"))
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert back[name].dtype == dtype and torch.equal(back[name], tensor), name
    cfg, cfg_back = read_config(source), read_config(tmp_path / "back")
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "rotary_percent", "tie_embeddings"):
        assert cfg_back.model[key] == cfg.model[key], key
    assert cfg_back.moe.top_k == cfg.moe.top_k and cfg_back.moe.num_experts == cfg.moe.num_experts
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():  # the re-imported router order computes the same routing
        model, model_back = load_model(cfg, original.items()), load_model(cfg_back, back.items())
        assert torch.equal(model(ids), model_back(ids))


def test_upcycle_then_export(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_checkpoint(tmp_path / "runs" / "step_5", TINY_HF + ["model.ffn_type=dense", "model.dense_ffn_hidden_size=256"])
    (tmp_path / "runs" / "latest").write_text("step_5\n")
    convert.main(["upcycle", "--dense", str(tmp_path / "runs"), "--output", str(tmp_path / "moe"),
                  "--num-experts", "4", "--granularity", "2", "--top-k", "1"])
    out = capsys.readouterr().out
    written = sum(p.stat().st_size for p in (tmp_path / "moe").glob("model-*.safetensors"))
    assert out.startswith(f"upcycle: 8 experts per layer, about {format_bytes(written)} -> {tmp_path / 'moe'}\n")
    assert "8 experts of width 128, top-2 (4 copies x granularity 2), in 4 of 4 layers" in out
    cfg = read_config(tmp_path / "moe")
    assert (cfg.model.ffn_type, cfg.moe.num_experts, cfg.moe.ffn_hidden_size, cfg.moe.top_k) == ("moe", 8, 128, 2)
    convert.main(["to-hf", "--checkpoint", str(tmp_path / "moe"), "--output", str(tmp_path / "hf"), "--dtype", "bf16"])
    shard = load_file(next((tmp_path / "hf").glob("model-*.safetensors")))
    assert {t.dtype for t in shard.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["moe_config"]["moe_num_experts"] == 8


def test_export_holds_the_tokenizer_and_the_token_ids(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A byte-tokenizer Yuan run of vocabulary 512 (not Yuan's 135040): AutoTokenizer reads the
    export, config.json has the ids the official code reads, generation_config.json stops at the eod."""
    source = make_checkpoint(tmp_path / "ckpt", TINY_HF)
    convert.main(["to-hf", "--checkpoint", str(source), "--output", str(tmp_path / "hf")])
    assert capsys.readouterr().out.splitlines()[-1] == ("tokenizer: ByteTokenizer as tokenizer.json, "
                                                        "tokenizer_config.json, special_tokens_map.json, "
                                                        "generation_config.json")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.encode(MIXED) == ByteTokenizer().encode(MIXED) and tokenizer.eos_token == "<eod>"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["eod_token"], config["sep_token"], config["pad_token_id"], config["eos_token_id"]) == (256,) * 4
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 256 and generation["suppress_tokens"] == list(range(262, 512))


def test_export_of_a_run_whose_tokenizer_moved(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = Path(hf_tokenizer_file(tmp_path, ["<eod>", "<pad>"]))
    source = make_checkpoint(tmp_path / "ckpt", TINY_HF + ["data.tokenizer.type=HuggingFaceTokenizer",
                                                           f"data.tokenizer.model={path}"])
    moved = path.rename(tmp_path / "moved.json")
    with pytest.raises(SystemExit):
        convert.main(["to-hf", "--checkpoint", str(source), "--output", str(tmp_path / "hf")])
    assert capsys.readouterr().err == (f"error: tokenizer model not found: {path}; to-hf exports the run's tokenizer "
                                       "(data.tokenizer): pass --tokenizer-model PATH where its file is now\n")
    convert.main(["to-hf", "--checkpoint", str(source), "--output", str(tmp_path / "hf"), "--tokenizer-model",
                  str(moved)])
    exported = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert exported.encode(MIXED) == HuggingFaceTokenizer(str(moved)).encode(MIXED)


def test_help_shows_the_whole_description(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        convert.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert info.value.code == 0
    assert "Convert checkpoints: megamoe <-> Hugging Face (each model family's own layout: Yuan2-M32, Qwen2-MoE), " \
           "and dense -> MoE upcycling." in out
    assert "to-hf writes the weights, config.json, the run's tokenizer" in out and "exit 2." in out


def test_an_upcycled_checkpoint_that_cannot_fit_the_disk_is_refused_before_writing(
        checkpoints: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with small_filesystem(tmp_path / "disk", 4 << 20) as disk, pytest.raises(SystemExit) as info:
        convert.main(["upcycle", "--dense", str(checkpoints / "dense"), "--output", str(disk / "moe"),
                      "--num-experts", "10000"])
    assert info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert re.fullmatch(rf"error: {tmp_path}/disk/moe: the output needs about 7\.\d GB, its file system has 4\.2 MB "
                        r"free; free space, choose another --output, or fewer --num-experts", line), line
    assert not any(disk.iterdir())


def _break_shard(hf_dir: Path) -> None:
    shard = next(hf_dir.glob("model-*.safetensors"))
    tensors = load_file(shard)
    name = next(iter(tensors))
    tensors[name] = torch.zeros(3)
    save_file(tensors, shard)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("convert")
    make_checkpoint(root / "moe", TINY_HF)
    make_checkpoint(root / "dense", TINY_HF + ["model.ffn_type=dense", "model.dense_ffn_hidden_size=256"])
    convert.main(["to-hf", "--checkpoint", str(root / "moe"), "--output", str(root / "hf")])
    shutil.copytree(root / "hf", root / "hf_missing_shard")
    next((root / "hf_missing_shard").glob("model-*.safetensors")).unlink()
    shutil.copytree(root / "hf", root / "hf_bad_shape")
    _break_shard(root / "hf_bad_shape")
    for damage, keep in (("truncated", lambda data: data[:len(data) // 2]), ("garbage", lambda data: b"<html>" * 40)):
        shutil.copytree(root / "hf", root / f"hf_{damage}")
        shard = next((root / f"hf_{damage}").glob("model-*.safetensors"))
        shard.write_bytes(keep(shard.read_bytes()))
    return root


@pytest.mark.parametrize(("args", "named"), [
    (["to-hf", "--checkpoint", "{root}/nowhere", "--output", "{tmp}/hf"], "nowhere: no such checkpoint directory"),
    (["to-hf", "--checkpoint", "{root}/moe", "--output", "{root}/dense"], "dense: already exists"),
    (["to-hf", "--checkpoint", "{root}/dense", "--output", "{tmp}/hf"], "model.ffn_type: 'dense'"),
    (["to-hf", "--checkpoint", "{root}/moe", "--output", "{tmp}/hf", "--max-shard-size", "lots"], "--max-shard-size"),
    (["from-hf", "--hf", "{root}/moe", "--output", "{tmp}/x"], "config.json: not found"),
    (["from-hf", "--hf", "{root}/hf", "--output", "{tmp}/x", "model.hidden_size=128"],
     "model.hidden_size=128 contradicts"),
    (["from-hf", "--hf", "{root}/hf_missing_shard", "--output", "{tmp}/x", "+exp=tiny"],
     "missing; the download is incomplete"),
    (["from-hf", "--hf", "{root}/hf_bad_shape", "--output", "{tmp}/x", "+exp=tiny"], "has shape [3]"),
    (["from-hf", "--hf", "{root}/hf_truncated", "--output", "{tmp}/x", "+exp=tiny"],
     "hf_truncated/model-00001-of-00001.safetensors: not a readable safetensors file (Error while deserializing "
     "header: incomplete metadata, file not fully covered); it is truncated or damaged: download it again"),
    (["from-hf", "--hf", "{root}/hf_garbage", "--output", "{tmp}/x", "+exp=tiny"],
     "hf_garbage/model-00001-of-00001.safetensors: not a readable safetensors file"),
    (["upcycle", "--dense", "{root}/moe", "--output", "{tmp}/x", "--num-experts", "4"], "model.ffn_type: the source"),
    (["upcycle", "--dense", "{root}/dense", "--output", "{tmp}/x", "--num-experts", "4", "--granularity", "3"],
     "--granularity: 3 does not divide"),
    (["upcycle", "--dense", "{root}/dense", "--output", "{tmp}/x", "--num-experts", "4", "--layer-freq", "[0,1]"],
     "--layer-freq: [0, 1] has 2 entries, but model.num_layers=4 needs one per layer"),
])
def test_mistakes_end_with_one_line(checkpoints: Path, tmp_path: Path, args: list[str], named: str,
                                    capsys: pytest.CaptureFixture) -> None:
    argv = [a.format(root=checkpoints, tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as info:
        convert.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2
    assert err[-1].startswith("error: ") and named in err[-1], err
    assert not any(line.startswith("Traceback") for line in err)
    assert not (tmp_path / "x").exists()


def test_script_runs_from_the_command_line(checkpoints: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), "from-hf", "--hf", str(checkpoints / "hf"),
                             "--output", str(tmp_path / "back"), "+exp=tiny", "model.head_dim=32", "train.lr=2e-3"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"checkpoint.resume={tmp_path / 'back'}" in result.stdout
    assert read_config(tmp_path / "back").train.lr == 2e-3
