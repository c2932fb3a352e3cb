"""launch/model_stats.py as a user runs it: the table, the JSON last line, and one-line errors."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megamoe.config import CONFIG_DIR, compose
from megamoe.estimators import balance
from megamoe.models import validate_config

SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "model_stats.py"


def load_script():
    spec = importlib.util.spec_from_file_location("model_stats", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


model_stats = load_script()


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_tiny_matches_a_hand_count(capsys: pytest.CaptureFixture) -> None:
    model_stats.main(["+exp=tiny"])
    out = capsys.readouterr().out
    stats = last_json(out)
    # vocab 512 × hidden 64 tied; per layer: q/k/v/o 4·64², LFA convs 2·(32·64·2) + biases 96 + norm 64,
    # attention router 3·8·64, 8 SwiGLU experts of 3·64·128 (2 active), two norms of 64; final norm 64.
    per_layer_fixed = 4 * 64 * 64 + (2 * 32 * 64 * 2 + 96 + 64) + 3 * 8 * 64 + 2 * 64
    expert = 3 * 64 * 128
    assert stats["total_params"] == 512 * 64 + 4 * (per_layer_fixed + 8 * expert) + 64 == 924_864
    assert stats["active_params"] == 512 * 64 + 4 * (per_layer_fixed + 2 * expert) + 64 == 335_040
    matmul = 4 * (4 * 64 * 64 + 2 * 32 * 64 * 2 + 3 * 8 * 64 + 2 * expert) + 512 * 64
    assert stats["fwd_flops_per_token"] == 2 * matmul
    assert stats["compute_ratio_vs_dense"] == pytest.approx(matmul / 924_864)
    for label in ("embedding", "attention", "LFA", "router", "routed experts", "RMSNorms", "output head"):
        assert label in out


def test_m32_from_the_command_line_gives_the_paper_numbers() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), "+exp=m32_2000b"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    stats = last_json(result.stdout)
    assert stats["total_params"] == pytest.approx(40e9, rel=0.01)
    assert stats["active_params"] == pytest.approx(3.7e9, rel=0.01)
    assert stats["fwd_flops_per_token"] == pytest.approx(7.4e9, rel=0.01)
    assert stats["compute_ratio_vs_dense"] == pytest.approx(0.0925, abs=0.0005)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["+exp=tiny", "model.hiden_size=64"], "model.hiden_size"),  # unknown key
        (["+exp=tiny", "moe.top_k=9"], "moe.top_k"),  # impossible value (validation)
        (["+exp=nope"], "exp/nope"),  # missing experiment
        (["+exp=tiny", "--world-size", "0"], "--world-size"),  # not a number of GPUs
        (["+exp=tiny", "--world-size"], "--world-size"),  # no value
        (["+exp=tiny", "parallel.pp=2", "--world-size=3"], "parallel.pp"),  # no layout for that world
        (["+exp=tiny", "--expert-imbalance", "5"], "--expert-imbalance: 5 is outside [1, 4]"),
        (["+exp=tiny", "--expert-imbalance=much"], "--expert-imbalance: 'much' is not a number"),
    ],
)
def test_a_bad_override_exits_2_with_one_line(args: list[str], named: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        model_stats.main(args)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], captured.err


def test_tiny_memory_per_gpu(capsys: pytest.CaptureFixture) -> None:
    """The JSON line carries tests/estimators/test_memory.py's hand count of tiny on one GPU."""
    model_stats.main(["+exp=tiny"])
    out = capsys.readouterr().out
    stats = last_json(out)
    model_states = 16 * 924_864
    weight_copies = 4 * (2 * 16_384 + 2 * 8_192 + 2 * 8 * 24_576 + 4 * 1_536)
    activations = 2 * 64 * (5 * 6_300 + 72 + 788)
    gib = stats["memory_per_gpu_gib"]
    assert gib["total"] * 2**30 == pytest.approx(model_states + weight_copies + activations)
    assert gib["total"] == pytest.approx(sum(gib[p] for p in ("weights", "gradients", "optimizer", "weight_copies",
                                                               "activations")))
    assert stats["memory_layout"] == {
        "world_size": 1, "pp": 1, "dp": 1, "ep": 1, "pp_rank": 0, "microbatches_in_flight": 1.0,
        "micro_batch": 2, "precision": "bf16", "activation_checkpointing": "none", "expert_imbalance": 1.0,
        "optimizer": "adamw", "optimizer_state_dtype": "fp32",
    }
    for label in ("weights (fp32)", "gradients (fp32)", "AdamW m, v (fp32)", "bf16 weight copies", "activations"):
        assert label in out


def test_the_optimizer_row_follows_the_config(capsys: pytest.CaptureFixture) -> None:
    """Muon with bf16 state: the row says so and holds less than AdamW's (a quarter to a half)."""
    model_stats.main(["+exp=tiny"])
    adamw = last_json(capsys.readouterr().out)["memory_per_gpu_gib"]["optimizer"]
    model_stats.main(["+exp=tiny", "train.optimizer=muon", "train.optimizer_state_dtype=bf16"])
    out = capsys.readouterr().out
    muon = last_json(out)["memory_per_gpu_gib"]["optimizer"]
    assert "Muon + AdamW (bf16)" in out and "AdamW m, v" not in out
    assert adamw / 4 < muon < adamw / 2


def test_world_size_flag_sets_data_parallelism(capsys: pytest.CaptureFixture) -> None:
    for flag in (["--world-size", "8"], ["--world-size=8"]):
        model_stats.main(["+exp=tiny", *flag, "parallel.pp=2", "parallel.ep=2"])
        layout = last_json(capsys.readouterr().out)["memory_layout"]
        assert (layout["world_size"], layout["pp"], layout["dp"], layout["ep"]) == (8, 2, 4, 2)
        assert layout["pp_rank"] in (0, 1)


def test_expert_imbalance_flag_is_the_estimate_s(capsys: pytest.CaptureFixture) -> None:
    model_stats.main(["+exp=m32_2000b", "--world-size", "256", "--expert-imbalance", "2"])
    out = capsys.readouterr().out
    stats = last_json(out)
    assert stats["memory_layout"]["expert_imbalance"] == 2.0 and "busiest expert at 2 × the mean load" in out
    cfg = compose(["+exp=m32_2000b"])
    expected = balance.memory_per_gpu(cfg, 256, 2.0)[1].total / 2**30
    assert stats["memory_per_gpu_gib"]["total"] == pytest.approx(expected)
    assert expected > balance.memory_per_gpu(cfg, 256)[1].total / 2**30


# The ladder between tiny and m32_2000b, with the GPUs each is meant for.
LADDER = {"proxy_1gpu": 1, "m32_8gpu": 8}
GPU_GIB = 80
HEADROOM = 0.9  # the estimate leaves out the CUDA context, NCCL buffers and fragmentation


@pytest.mark.parametrize(("exp", "world_size"), list(LADDER.items()))
def test_ladder_config_fits_an_80_gib_gpu(exp: str, world_size: int, capsys: pytest.CaptureFixture) -> None:
    cfg = compose([f"+exp={exp}"])
    validate_config(cfg, world_size=world_size)
    model_stats.main([f"+exp={exp}", "--world-size", str(world_size)])
    stats = last_json(capsys.readouterr().out)
    total = stats["memory_per_gpu_gib"]["total"]
    assert stats["memory_layout"]["world_size"] == world_size
    assert total <= HEADROOM * GPU_GIB
    # the figure written in the config's header comment is the estimate's, rounded
    header = (CONFIG_DIR / "exp" / f"{exp}.yaml").read_text()
    stated = re.search(r"Memory per GPU .*?~(\d+) GiB", header, re.S)
    assert stated is not None and int(stated.group(1)) == round(total), (stated and stated.group(0), total)


def test_uneven_split_shows_its_layers_and_memory_follows_it(capsys: pytest.CaptureFixture) -> None:
    model_stats.main(["+exp=tiny", "parallel.pp=2", "parallel.layers_per_stage=[3,1]"])
    out = capsys.readouterr().out
    stats = last_json(out)
    assert "layers per stage 3, 1 (explicit split)" in out
    # training FLOPs per token at seq 64 (tests/estimators/test_balance.py): a layer 476,544, the head 262,144
    stages = [3 * 476_544, 476_544 + 262_144]
    assert stats["pipeline"]["layers_per_stage"] == [3, 1]
    assert stats["pipeline"]["slowest_stage_vs_mean"] == pytest.approx(max(stages) / (sum(stages) / 2))
    # the fullest GPU is rank 0: 3 layers of 223,008 parameters (the hand count above) and the embedding
    assert stats["memory_layout"]["pp_rank"] == 0
    assert stats["memory_per_gpu_gib"]["weights"] * 2**30 == 4 * (3 * 223_008 + 512 * 64)


def test_a_mixed_stack_names_its_dense_layers_and_counts_them(capsys: pytest.CaptureFixture) -> None:
    """Layers 0 and 1 dense (a SwiGLU of 96: 3·64·96 = 18,432 instead of the router and 8 experts)."""
    model_stats.main(["+exp=tiny", "moe.layer_freq=[0,0,1,1]", "model.dense_ffn_hidden_size=96", "parallel.pp=2"])
    out = capsys.readouterr().out
    stats = last_json(out)
    assert "(2 MoE layers), dense SwiGLU ffn 96 in layers 0-1" in out.splitlines()[0]
    assert stats["layers"] == {"moe": 2, "dense": 2}
    assert stats["total_params"] == 924_864 - 2 * (3 * 8 * 64 + 8 * 3 * 64 * 128) + 2 * 18_432
    # the fullest GPU is rank 1 (2 MoE layers; rank 0 holds the dense ones and the embedding)
    assert stats["memory_layout"]["pp_rank"] == 1


@pytest.mark.parametrize(("exp", "world_size", "gpu_gib"),
                         [("m32_2000b", 256, 80), ("m32_2000b_141gb", 64, 141e9 / 2**30)])
def test_m32_configs_fit_their_gpus_and_the_paper_layout_does_not(exp: str, world_size: int, gpu_gib: float) -> None:
    """The planner's recommendations leave 10% of the GPU for what the estimate leaves out."""
    fits = model_stats.stats(compose([f"+exp={exp}"]), world_size)["memory_per_gpu_gib"]["total"]
    assert fits <= 0.9 * gpu_gib
    paper = model_stats.stats(compose(["+exp=m32_2000b_paper_pp8"]), world_size)["memory_per_gpu_gib"]["total"]
    assert paper > 80
