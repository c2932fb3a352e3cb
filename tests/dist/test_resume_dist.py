"""Multi-process checkpoints: exact resume on (dp, pp, ep) = (2, 2, 2), and resharding to other layouts
(with AdamW's state and with Muon's).

A checkpoint saved by the 4-process (2, 2, 2) run is loaded by (1, 1, 1), (4, 1, 4), (1, 2, 1) and
(1, 2, 1) under ZB-V, whose V layout puts the first and the last stage on pipeline rank 0.
Two checks per layout: saving again right after loading reproduces the original checkpoint
bit for bit (model *and* optimizer state went to the right ranks under the right names), and
the next step's loss equals the original layout's next step (fp32 reduction-order noise only).

Pipeline splits: a run on the even split [3, 3] resumes on the balanced [4, 2] and back, with
the same checks, and there bit-identical losses and checkpoints: the same ranks do the same
math, only the stage boundary moves. Gradient clipping is off there: the global grad norm sums
each rank's squares, which a moved boundary regroups (last-bit noise that clipping would pass
on to every weight); everything else is computed per parameter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from megamoe.checkpoint.saver import save_checkpoint
from megamoe.checkpoint.state import load_checkpoint
from megamoe.checkpoint.store import read_manifest
from megamoe.config import compose
from megamoe.models import validate_config
from megamoe.estimators import balance
from megamoe.parallel.mesh import init_grid
from megamoe.train.step import train_step
from megamoe.train.trainer import build_trainer
from tests.checkpoint.helpers import assert_same_tensors, checkpoint_tensors
from tests.dist.launcher import run_distributed

BASE = ["+exp=tiny", "train.global_batch=8", "train.micro_batch=1", "train.seq_len=32", "train.steps=8",
        "train.lr=3e-3", "train.warmup_steps=1", "moe.aux_loss_coeff=0.01", "moe.z_loss_coeff=0.001",
        "moe.aux_free_bias=true"]
ORIGINAL = ["parallel.pp=2", "parallel.ep=2"]  # with 4 processes: dp 2
SAVED_STEP, LAST_STEP = 2, 4


def run_phases(rank: int, world_size: int, phases: list[dict[str, Any]]) -> list[list[float]]:
    """Worker: for each phase set up its layout, build a fresh trainer, optionally load a checkpoint
    (and save it again at once), then train, saving after the listed steps. Returns the losses."""
    results = []
    for phase in phases:
        cfg = compose([*BASE, *phase["layout"], f"run.dir={phase['run_dir']}"])
        validate_config(cfg, world_size)
        trainer = build_trainer(cfg, init_grid(cfg.parallel.pp, cfg.parallel.ep, timeout_s=60))
        if "load" in phase:
            load_checkpoint(trainer.state, Path(phase["load"]))
            if phase.get("save_after_load"):
                save_checkpoint(trainer.state)
        batches = iter(trainer.loader)
        losses = []
        while trainer.step < phase["until"]:
            losses.append(train_step(trainer, next(batches)).loss)
            if trainer.step in phase.get("save_at", ()):
                save_checkpoint(trainer.state)
        results.append(losses)
    torch.distributed.destroy_process_group()
    return results


RESHARD = {"1x1x1": (1, []), "4x1x4": (4, ["parallel.ep=4"]), "1x2x1": (2, ["parallel.pp=2"]),
           "1x2x1_zbv": (2, ["parallel.pp=2", "parallel.schedule=zbv_zero_bubble", "parallel.virtual_stages=2"])}


def reshard_phase(root: Path, layout: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load the (2, 2, 2) checkpoint of step 2 into ``layout``, save it at once, train one step."""
    return {"layout": [*RESHARD[layout][1], *extra], "run_dir": str(root / layout), "until": SAVED_STEP + 1,
            "save_after_load": True, "load": str(root / f"original/checkpoints/step_{SAVED_STEP}")}


MUON = ("train.optimizer=muon",)


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """4 processes: (2, 2, 2) trains 4 steps saving at 2 and 4; a fresh (2, 2, 2) trainer resumes
    from step 2 to 4; then the same processes reshard step 2 to (4, 1, 4). Then the same under Muon
    (in ``["muon"]``): (2, 2, 2) trains 3 steps saving at 2, and step 2 reshards to (4, 1, 4)."""
    root = tmp_path_factory.mktemp("resume")
    muon_root = root / "muon"
    phases = [
        {"layout": ORIGINAL, "run_dir": str(root / "original"), "until": LAST_STEP, "save_at": (SAVED_STEP, LAST_STEP)},
        {"layout": ORIGINAL, "run_dir": str(root / "resumed"), "until": LAST_STEP, "save_at": (LAST_STEP,),
         "load": str(root / f"original/checkpoints/step_{SAVED_STEP}")},
        reshard_phase(root, "4x1x4"),
        {"layout": [*ORIGINAL, *MUON], "run_dir": str(muon_root / "original"), "until": SAVED_STEP + 1,
         "save_at": (SAVED_STEP,)},
        reshard_phase(muon_root, "4x1x4", MUON),
    ]
    results = run_distributed(run_phases, 4, phases, timeout_s=300, init_process_group=False)
    assert all(r == results[0] for r in results)  # every rank reports the world-reduced loss
    uninterrupted, resumed, resharded, muon, muon_resharded = results[0]
    return {"root": root, "losses": uninterrupted, "resumed": resumed, "4x1x4": resharded,
            "muon": {"root": muon_root, "losses": muon, "4x1x4": muon_resharded, "extra": MUON}}


def test_resume_on_2x2x2_is_bit_identical(original: dict[str, Any]) -> None:
    assert original["resumed"] == original["losses"][SAVED_STEP:]
    root = original["root"]
    assert_same_tensors(checkpoint_tensors(root / f"resumed/checkpoints/step_{LAST_STEP}"),
                        checkpoint_tensors(root / f"original/checkpoints/step_{LAST_STEP}"))


def test_each_rank_writes_its_share_and_nothing_twice(original: dict[str, Any]) -> None:
    """The two dp replicas of every stage split its dense tensors between them (a save's time falls
    with dp); an expert is written by a replica of its own ep rank; nothing is written twice."""
    manifest = read_manifest(original["root"] / f"original/checkpoints/step_{SAVED_STEP}")
    owners: dict[str, list[str]] = {}
    written: dict[int, int] = {}
    for name, entry in manifest.files.items():
        for tensor in entry.tensors:
            owners.setdefault(tensor, []).append(name)
        if entry.kind in ("model", "optim"):
            rank = int(name.split("-r")[1][:5])
            written[rank] = written.get(rank, 0) + entry.bytes
    assert all(len(files) == 1 for files in owners.values())  # no replica is written twice
    by_rank = {r: {t for name, e in manifest.files.items() if name.startswith(f"model-r{r:05d}") for t in e.tensors}
               for r in range(4)}
    # rank = pp_rank · dp + dp_rank and dp_rank = edp_rank · ep + ep_rank; here dp = ep = 2, edp = 1.
    assert "embed.weight" in by_rank[0] | by_rank[1] and "final_norm.weight" in by_rank[2] | by_rank[3]
    assert "lm_head.weight" not in owners  # the last stage's tied copy is not stored
    assert "layers.0.mlp.experts.3.w1" in by_rank[0] and "layers.0.mlp.experts.4.w1" in by_rank[1]
    assert "layers.3.mlp.experts.7.w2" in by_rank[3]
    for stage_ranks in ((0, 1), (2, 3)):  # both replicas of each stage write, about half each
        first, second = (written[r] for r in stage_ranks)
        assert min(first, second) > 0.3 * (first + second), written
    for r in (0, 1):
        assert any(".attn." in t for t in by_rank[r]), f"rank {r} writes no dense tensor"


# Muon's momentum reshards by parameter name like AdamW's moments: (2, 2, 2) → (4, 1, 4) and (1, 1, 1)
# cover a changed dp, pp and ep; the 2-process pipeline layouts add nothing Muon-specific (slow).
RESHARD_CASES = [pytest.param(layout, "adamw", id=layout, marks=pytest.mark.slow if "zbv" in layout else ())
                 for layout in sorted(RESHARD)] + [
    pytest.param(layout, "muon", id=f"{layout}-muon", marks=() if layout in ("4x1x4", "1x1x1") else pytest.mark.slow)
    for layout in sorted(RESHARD)]


@pytest.mark.parametrize(("layout", "optimizer"), RESHARD_CASES)
def test_reshard_to_another_layout(layout: str, optimizer: str, original: dict[str, Any]) -> None:
    run = original if optimizer == "adamw" else original["muon"]
    root, phase = run["root"], reshard_phase(run["root"], layout, run.get("extra", ()))
    world_size = RESHARD[layout][0]
    if layout in run:
        next_losses = run[layout]
    elif world_size == 1:
        (next_losses,) = run_phases(0, 1, [phase])  # in this process: no spawn
    else:
        (next_losses,) = run_distributed(run_phases, world_size, [phase], timeout_s=300, init_process_group=False)[0]
    resaved = checkpoint_tensors(root / f"{layout}/checkpoints/step_{SAVED_STEP}")
    assert_same_tensors(resaved, checkpoint_tensors(root / f"original/checkpoints/step_{SAVED_STEP}"))
    assert ("momentum_buffer/layers.3.mlp.experts.7.w2" in resaved) == (optimizer == "muon")
    torch.testing.assert_close(next_losses[0], run["losses"][SAVED_STEP], rtol=1e-5, atol=0)


# 6 layers on pp 2 with a head worth ~2.3 layers (vocab 2048): stage_balance=auto moves a layer off the last stage.
SPLIT = ["model.num_layers=6", "model.vocab_size=2048", "parallel.pp=2", "train.clip_grad=0"]
EVEN, BALANCED = [*SPLIT, "parallel.stage_balance=even"], [*SPLIT, "parallel.stage_balance=auto"]


@pytest.fixture(scope="module")
def across_splits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """2 processes: the even split trains 6 steps saving at 2 and 4; the balanced split resumes
    from step 2 to 4 (saving at once and at 4); the even split resumes from that step 4 to 6."""
    root = tmp_path_factory.mktemp("splits")
    phases = [
        {"layout": EVEN, "run_dir": str(root / "even"), "until": 6, "save_at": (2, 4)},
        {"layout": BALANCED, "run_dir": str(root / "balanced"), "until": 4, "save_at": (4,),
         "load": str(root / "even/checkpoints/step_2"), "save_after_load": True},
        {"layout": EVEN, "run_dir": str(root / "back"), "until": 6, "save_after_load": True,
         "load": str(root / "balanced/checkpoints/step_4")},
    ]
    results = run_distributed(run_phases, 2, phases, timeout_s=300, init_process_group=False)
    assert results[0] == results[1]
    even, balanced, back = results[0]
    return {"root": root, "even": even, "balanced": balanced, "back": back}


@pytest.mark.slow
def test_resume_across_pipeline_splits_is_bit_identical(across_splits: dict[str, Any]) -> None:
    assert [balance.stage_layers(compose([*BASE, *layout])) for layout in (EVEN, BALANCED)] == [[3, 3], [4, 2]]
    assert across_splits["balanced"] == across_splits["even"][2:4]
    assert across_splits["back"] == across_splits["even"][4:6]
    root = across_splits["root"]
    for saved_after_load, original in [("balanced/checkpoints/step_2", "even/checkpoints/step_2"),
                                       ("balanced/checkpoints/step_4", "even/checkpoints/step_4"),
                                       ("back/checkpoints/step_4", "balanced/checkpoints/step_4")]:
        assert_same_tensors(checkpoint_tensors(root / saved_after_load), checkpoint_tensors(root / original))

