"""The training step: recompute modes, non-finite handling, expert-load accounting, eval per source."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from megamoe.config import compose
from megamoe.errors import NonFiniteError
from megamoe.parallel.mesh import init_grid
from megamoe.train.step import train_step, validation_loss
from megamoe.train.trainer import build_trainer
from tests.dist.launcher import run_distributed
from tests.pretrain import run_pretrain

BASE = ["+exp=tiny", "train.global_batch=4", "train.micro_batch=2", "train.seq_len=32", "train.eval_iters=1"]


def steps(rank: int, world_size: int, args: tuple[list[str], int, bool]) -> dict[str, Any]:
    """Worker: run a few steps (optionally poisoning a weight with NaN first); report what happened."""
    overrides, num_steps, poison = args
    cfg = compose([*BASE, *overrides])
    grid = init_grid(cfg.parallel.pp, cfg.parallel.ep, timeout_s=60)
    trainer = build_trainer(cfg, grid)
    if poison:
        with torch.no_grad():
            trainer.modules[0].model.layers["0"].attn.q_proj.weight[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in trainer.modules[0].model.named_parameters()}
    batches = iter(trainer.loader)
    try:
        results = [train_step(trainer, next(batches)) for _ in range(num_steps)]
        error = None
    except NonFiniteError as exc:
        results, error = [], str(exc)
    after = {n: p.detach().clone() for n, p in trainer.modules[0].model.named_parameters()}
    counts = {i: layer.tokens_per_expert.sum().item() for i, layer in results[0].routing.items()} if results else {}
    evals = validation_loss(trainer) if results else {}
    torch.distributed.destroy_process_group()
    return {"results": [{k: v for k, v in vars(r).items() if k != "routing"} for r in results], "error": error,
            "changed": [n for n in before if not torch.allclose(before[n], after[n], rtol=0, atol=0, equal_nan=True)],
            "counts": counts, "evals": evals}


def _run(overrides: list[str], num_steps: int = 2, poison: bool = False, world_size: int = 1) -> dict[str, Any]:
    results = run_distributed(steps, world_size, (overrides, num_steps, poison), timeout_s=120,
                              init_process_group=False)
    return {**results[0], "counts": {i: c for r in results for i, c in r["counts"].items()}}


MIXED = ["moe.layer_freq=[0,1,1,0]", "model.dense_ffn_hidden_size=96"]  # dense layers 0 and 3


@pytest.mark.parametrize(("mode", "overrides"), [
    pytest.param("full", [], id="full"), pytest.param("selective", [], id="selective", marks=pytest.mark.slow),
    pytest.param("full", MIXED, id="full_mixed", marks=pytest.mark.slow)])
def test_activation_checkpointing_changes_nothing_but_memory(mode: str, overrides: list[str]) -> None:
    plain = _run(overrides)
    recomputed = _run([*overrides, f"train.activation_checkpointing={mode}"])
    for a, b in zip(plain["results"], recomputed["results"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    # recompute re-runs each MoE forward inside backward; tokens must still be counted once
    assert recomputed["counts"] == plain["counts"]


@pytest.mark.parametrize(("pp", "overrides", "moe_layers"), [
    pytest.param(1, [], [0, 1, 2, 3], id="pp1"), pytest.param(2, [], [0, 1, 2, 3], id="pp2"),
    pytest.param(2, MIXED, [1, 2], id="pp2_mixed", marks=pytest.mark.slow)])
def test_expert_counts_cover_every_routed_token(pp: int, overrides: list[str], moe_layers: list[int]) -> None:
    """Exactly top_k assignments per token on the first step too (no shape-inference pass counted),
    in every MoE layer; a dense layer routes nothing and reports nothing."""
    result = _run([f"parallel.pp={pp}", *overrides], world_size=pp)
    tokens_per_step = 4 * 32
    assert result["counts"] == {i: tokens_per_step * 2 for i in moe_layers}  # top-2: two assignments per token


def test_nonfinite_skip_keeps_weights_and_reports() -> None:
    result = _run(["train.on_nonfinite=skip"], poison=True)
    assert all(r["skipped"] for r in result["results"])
    assert result["changed"] == []


@pytest.mark.slow  # test_skips_are_summarised_and_stop_mode_is_one_line covers the stop mode too
def test_nonfinite_stop_names_the_step() -> None:
    result = _run(["train.on_nonfinite=stop"], poison=True)
    assert result["error"] is not None and result["error"].startswith("step 1: non-finite")


def test_eval_reports_one_loss_per_source() -> None:
    result = _run([])
    assert list(result["evals"]) == ["mock"] and 5.0 < result["evals"]["mock"] < 7.0


def unreported_then_reported(rank: int, world_size: int, _: None) -> list[dict[int, float]]:
    """Worker: one step without expert-load reporting, then one with it."""
    cfg = compose(BASE)
    trainer = build_trainer(cfg, init_grid(1, 1, timeout_s=60))
    batches = iter(trainer.loader)
    quiet = train_step(trainer, next(batches), report_routing=False).routing
    loud = train_step(trainer, next(batches), report_routing=True).routing
    torch.distributed.destroy_process_group()
    return [{i: layer.tokens_per_expert.sum().item() for i, layer in routing.items()} for routing in (quiet, loud)]


def test_unreported_steps_skip_the_reduction_and_do_not_accumulate() -> None:
    quiet, loud = run_distributed(unreported_then_reported, 1, None, timeout_s=120, init_process_group=False)[0]
    assert quiet == {}
    assert loud == {i: 4 * 32 * 2 for i in range(4)}  # this step's tokens only, top-2


def test_a_diverged_run_marks_its_skips_and_stops_without_saving(tmp_path) -> None:
    """train.lr=1e6: after an update or two every step is non-finite. Each skipped step gets a
    console line (not only log steps), the run stops after train.max_skipped_steps in a row with
    one line, and nothing is saved once the skipping has begun."""
    result = run_pretrain(tmp_path, "train.lr=1e6", "train.min_lr=0", "train.steps=50", "train.log_interval=10",
                          "train.max_skipped_steps=4", "checkpoint.interval=1")
    assert result.returncode == 2
    skipped = [int(line.split("/")[0].split()[1]) for line in result.stdout.splitlines()
               if "SKIPPED: non-finite loss or grad norm" in line]
    first = skipped[0]
    assert skipped == [first, first + 1, first + 2, first + 3]
    assert result.stderr.splitlines() == [
        f"error: train.max_skipped_steps: the last 4 steps ({first}-{first + 3}) all had a non-finite loss or gradient "
        "norm and were skipped; the run has diverged: lower train.lr or resume from an earlier checkpoint "
        "(checkpoint.resume=PATH)"]
    assert f"checkpoint: step {first} not saved: the last 1 step(s) were skipped for non-finite values" in result.stdout
    saved = sorted(int(p.name.removeprefix("step_")) for p in (tmp_path / "checkpoints").glob("step_*"))
    assert saved and saved[-1] == first - 1


def test_skips_are_summarised_and_stop_mode_is_one_line(tmp_path) -> None:
    done = run_pretrain(tmp_path / "skip", "train.lr=1e6", "train.min_lr=0", "train.steps=6")
    assert done.returncode == 0, done.stderr[-2000:]
    skipped = [line.split("/")[0].split()[1] for line in done.stdout.splitlines() if "SKIPPED" in line]
    assert skipped and done.stdout.splitlines()[-1].endswith(  # the last save was not made: the state had diverged
        f"; {len(skipped)} step(s) skipped for a non-finite loss or gradient norm: {', '.join(skipped)}; "
        "steps 1-6 are in no checkpoint")
    stopped = run_pretrain(tmp_path / "stop", "train.lr=1e6", "train.min_lr=0", "train.steps=6",
                           "train.on_nonfinite=stop")
    assert stopped.returncode == 2
    (line,) = stopped.stderr.splitlines()
    assert re.fullmatch(rf"error: step {skipped[0]}: non-finite loss \S+ or grad norm nan \(train.on_nonfinite=stop; "
                        r"train.on_nonfinite=skip drops such updates instead\)", line), line


def straggling(rank: int, world_size: int, _: None) -> list[tuple[int, float]]:
    """Worker: rank 1's forward is made 0.3 s slower; every rank reports who was slowest."""
    import time

    trainer = build_trainer(compose(BASE), init_grid(1, 1, timeout_s=60))
    if rank == 1:
        model = trainer.modules[0].model
        forward = model.hidden_states
        model.hidden_states = lambda *args, **kwargs: (time.sleep(0.3), forward(*args, **kwargs))[1]
    batches = iter(trainer.loader)
    results = [train_step(trainer, next(batches)) for _ in range(2)]
    torch.distributed.destroy_process_group()
    return [(r.slowest_rank, r.slowest_rank_s) for r in results]


def test_the_heartbeat_names_the_straggling_rank() -> None:
    for reports in run_distributed(straggling, 2, None, timeout_s=120, init_process_group=False):
        assert [rank for rank, _ in reports] == [1, 1] and all(seconds >= 0.3 for _, seconds in reports)
