"""launch/dry_run.py as users run it: the table and the JSON last line, whether the layout fits,
the routing it assumes, and one `error:` line with exit 2 for a layout that cannot be built."""

from __future__ import annotations

import contextlib
import io

import pytest

from launch import dry_run
from megamoe.dryrun.watch import KINDS
from tests.launch.test_model_stats import last_json

TINY_PP2_EP2 = ["+exp=tiny", "parallel.pp=2", "parallel.ep=2", "--world-size", "4"]


@pytest.fixture(scope="module")
def tiny_run() -> tuple[str, dict]:
    """(what it printed, its JSON line) of a tiny model's dry run on pp 2 × dp 2, ep 2."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        dry_run.main(TINY_PP2_EP2)
    return out.getvalue(), last_json(out.getvalue())


def test_json_names_the_layout_every_rank_and_the_verdict(tiny_run: tuple[str, dict]) -> None:
    _, summary = tiny_run
    assert summary["world_size"] == 4
    assert {key: summary["layout"][key] for key in ("pp", "dp", "ep", "schedule")} == {
        "pp": 2, "dp": 2, "ep": 2, "schedule": "1f1b"}
    assert [rank["pp_rank"] for rank in summary["ranks"]] == [0, 1]
    for rank in summary["ranks"]:
        assert set(rank["by_kind"]) == set(KINDS)
        assert rank["measured_gib"] == pytest.approx(sum(rank["by_kind"].values()), abs=1e-3)
        assert 0.8 < rank["estimated_gib"] / rank["measured_gib"] < 1.25
    assert summary["max_measured_gib"] == max(rank["measured_gib"] for rank in summary["ranks"])
    assert (summary["gpu_memory_gib"], summary["usable_gib"], summary["fits"]) == (80, 72, True)
    assert (summary["models"], summary["precision"], summary["grouped_gemm"]) == ("cuda", "bf16", True)


def test_table_shows_the_measured_next_to_the_estimate(tiny_run: tuple[str, dict]) -> None:
    out, summary = tiny_run
    assert "modelled: a CUDA GPU's step (bf16 compute, fp32 master weights and router, grouped-GEMM experts)" in out
    assert "the busiest expert at 1 × the mean load" in out
    row = next(line.split() for line in out.splitlines() if line.split()[:1] == ["1"])
    rank = summary["ranks"][1]
    assert [float(x) for x in row[1:4]] == pytest.approx(
        [1024 * rank["measured_gib"], 1024 * rank["estimated_gib"], rank["estimated_over_measured"]], abs=0.01)
    assert "tensors of 2^31 elements or more: none" in out
    assert "fits: the fullest rank needs" in out


def test_a_gpu_too_small_does_not_fit(capsys: pytest.CaptureFixture) -> None:
    summary = dry_run.main(["+exp=tiny", "--gpu-memory", "0.005"])
    assert not summary["fits"] and summary["usable_gib"] == pytest.approx(0.0045)
    assert "does NOT fit" in capsys.readouterr().out


def test_an_imbalanced_routing_fills_the_busiest_rank(tiny_run: tuple[str, dict]) -> None:
    _, balanced = tiny_run
    skewed = dry_run.main([*TINY_PP2_EP2, "--expert-imbalance", "4"])  # every token to expert 0
    assert skewed["expert_imbalance"] == 4
    for before, after in zip(balanced["ranks"], skewed["ranks"]):
        assert after["measured_gib"] > before["measured_gib"]
        assert after["estimated_gib"] > before["estimated_gib"]


@pytest.mark.parametrize(("args", "message"), [
    (["+exp=tiny", "parallel.pp=3", "--world-size", "6"], "parallel.pp"),  # 4 layers do not split in 3
    (["+exp=tiny", "--world-size", "3"], "train.global_batch"),
    (["+exp=tiny", "--expert-imbalance", "9"], "--expert-imbalance: 9 is outside [1, 4]"),
    (["+exp=tiny", "--gpu-memory", "-1"], "--gpu-memory must be positive"),
    (["+exp=tiny", "--frobnicate"], "--frobnicate: unknown option"),
])
def test_what_cannot_be_built_is_one_error_line(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        dry_run.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
