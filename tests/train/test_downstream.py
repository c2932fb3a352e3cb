"""Downstream tasks inside a training run: the same scores as the single-process backend on the
same weights, the same at every layout (pp, dp, ep, a V schedule), scored when due, and
configuration mistakes stopped at startup."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from megamoe.config import compose
from megamoe.data.tokenizer import Tokenizer
from megamoe.errors import ConfigError, SharedError
from megamoe.evaluation.demo import demo_en, demo_math
from megamoe.evaluation.model import ModelBackend
from megamoe.evaluation.scoring import choice_requests, evaluate_task, generation_prompts
from megamoe.evaluation.tasks import prepare
from megamoe.models import validate_config
from megamoe.parallel.mesh import ProcessGrid, init_grid, shutdown
from megamoe.train.downstream import DownstreamEval, PipelineBackend
from megamoe.train.step import train_step
from megamoe.train.trainer import Trainer, build_trainer
from tests.data.helpers import blend_overrides
from tests.dist.launcher import run_distributed

SEQ_LEN = 48
BASE = ["+exp=tiny", "train.global_batch=8", "train.micro_batch=2", f"train.seq_len={SEQ_LEN}",
        "eval.downstream_interval=3", "eval.downstream_tasks=[demo-en,demo-math]", "eval.downstream_limit=5",
        "eval.downstream_max_new_tokens=4"]
NEW_TOKENS = 4  # demo-math items ask for 8; the tests decode 4
EN, MATH = prepare(demo_en(), 3, 0, 0), prepare(demo_math(), 3, 0, 0)


def eod_cut(ids: list[int], eod: int) -> list[int]:
    return ids[:ids.index(eod)] if eod in ids else ids


def trained(cfg: Any, grid: ProcessGrid) -> Trainer:
    """A trainer after one step (as in a run: the step builds the pipeline schedules)."""
    trainer = build_trainer(cfg, grid)
    train_step(trainer, next(iter(trainer.loader)))
    return trainer


def raw_scores(trainer: Trainer, tokenizer: Tokenizer) -> dict[str, Any]:
    """Every choice's log-likelihood and every greedy completion of the in-training backend."""
    backend = PipelineBackend(trainer, tokenizer)
    with torch.no_grad():
        logliks = backend.loglikelihoods(choice_requests(EN, tokenizer, SEQ_LEN), "demo-en")
        ids = backend.greedy(generation_prompts(MATH, tokenizer, SEQ_LEN, NEW_TOKENS), NEW_TOKENS, "demo-math")
    return {"logliks": logliks, "greedy": [eod_cut(row, tokenizer.eod_id) for row in ids]}


@pytest.mark.parametrize("documents", [False, True], ids=["plain", "documents"])
def test_in_training_scores_equal_the_single_process_backend(grid: ProcessGrid, tmp_path: Path,
                                                             documents: bool) -> None:
    """With data.reset_attention_mask a request's row is one document, as in the single-process backend."""
    cfg = compose([*BASE, *([*blend_overrides(tmp_path), "data.reset_attention_mask=true"] if documents else [])])
    trainer, downstream = trained(cfg, grid), DownstreamEval(cfg)
    tokenizer = downstream.tokenizer
    scores, logged = raw_scores(trainer, tokenizer), downstream.run(trainer)
    single = ModelBackend(trainer.modules[0].model.eval(), tokenizer.eod_id, tokenizer.vocab_size, batch_size=4)
    expected = single.loglikelihoods(choice_requests(EN, tokenizer, SEQ_LEN), "demo-en")
    torch.testing.assert_close(torch.tensor(scores["logliks"]), torch.tensor(expected), rtol=1e-5, atol=1e-5)
    assert len(set(scores["logliks"])) == len(expected)  # distinct scores: a mixed-up order would show
    assert scores["greedy"] == single.greedy(generation_prompts(MATH, tokenizer, SEQ_LEN, NEW_TOKENS), NEW_TOKENS, "")
    assert logged == {task.name: evaluate_task(task, tokenizer, single, SEQ_LEN, 4, "-") for task in downstream.tasks}


def layout_worker(rank: int, world_size: int, overrides: list[str]) -> dict[str, Any]:
    torch.set_default_dtype(torch.float64)  # no reduction-order noise: greedy ids compare exactly
    cfg = compose([*BASE, *overrides])
    validate_config(cfg, world_size)
    grid = init_grid(cfg.parallel.pp, cfg.parallel.ep, timeout_s=60)
    try:
        return raw_scores(trained(cfg, grid), DownstreamEval(cfg).tokenizer)
    finally:
        shutdown()


@pytest.fixture
def float64() -> Iterator[None]:
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.mark.slow
def test_every_layout_scores_alike(float64: None) -> None:
    """pp 2 × dp 2 × ep 2 (requests split over replicas whose experts exchange tokens) and ZB-V
    (the last stage on pipeline rank 0) against one process; every rank holds every score."""
    single = layout_worker(0, 1, [])
    layouts = [(4, ["parallel.pp=2", "parallel.ep=2"]),
               (2, ["parallel.pp=2", "parallel.schedule=zbv_zero_bubble", "parallel.virtual_stages=2"])]
    for world_size, overrides in layouts:
        for result in run_distributed(layout_worker, world_size, overrides, timeout_s=180, init_process_group=False):
            torch.testing.assert_close(torch.tensor(result["logliks"]), torch.tensor(single["logliks"]),
                                       rtol=1e-9, atol=1e-9, msg=str(overrides))
            assert result["greedy"] == single["greedy"], overrides


def test_due_every_interval_and_at_the_last_step() -> None:
    downstream = DownstreamEval(compose([*BASE, "train.steps=10"]))
    assert [step for step in range(1, 11) if downstream.due(step)] == [3, 6, 9, 10]
    off = DownstreamEval(compose(["+exp=tiny", "train.steps=10"]))
    assert not any(off.due(step) for step in range(1, 11)) and off.tasks == []


def test_a_bad_task_file_stops_the_run_at_startup(tmp_path: Path) -> None:
    bad = tmp_path / "arc.jsonl"
    bad.write_text('{"context": "q", "choices": [" a", " b"], "answer": 0}\n{"context": "q", "choices": [" a"]}\n')
    with pytest.raises(SharedError, match=f"{bad}:2: \"choices\" is"):
        DownstreamEval(compose([*BASE, f"eval.downstream_tasks=[{bad}]"]))
    long = tmp_path / "gsm.jsonl"
    long.write_text('{"prompt": "q", "answer": "1"}\n')  # decodes eval.downstream_max_new_tokens
    with pytest.raises(SharedError, match=f"gsm: {SEQ_LEN} new tokens leave no room for a prompt.*; lower "
                                          f"eval.downstream_max_new_tokens below {SEQ_LEN}$"):
        DownstreamEval(compose([*BASE, f"eval.downstream_tasks=[demo-math,{long}]",
                                f"eval.downstream_max_new_tokens={SEQ_LEN}"]))


@pytest.mark.parametrize(("override", "message"), [
    ("eval.downstream_tasks=[]", "eval.downstream_tasks: is empty"),
    ("eval.downstream_limit=0", "eval.downstream_limit: 0 must be > 0, or null"),
    ("eval.downstream_fewshot=-1", "eval.downstream_fewshot: -1 must be >= 0"),
])
def test_config_mistakes(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(compose([*BASE, override]))
