"""The demo config (`+exp=demo`, what `make demo` trains) on real indexed data, in one process.

A small bilingual corpus goes through the same path as launch/demo.py (make_demo_corpus →
preprocess_data → .bin/.idx); the config is the demo's with only its layout, size and data
paths overridden. Unlike the mock-data tests, the batches here hold real end-of-document
tokens and the validation sets are split per language.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from data_tools import preprocess_data
from data_tools.make_demo_corpus import make_corpus
from megamoe.config import compose
from megamoe.data.loader import document_ids
from megamoe.models import validate_config
from megamoe.parallel.mesh import ProcessGrid
from megamoe.train.step import train_step, validation_loss
from megamoe.train.trainer import Trainer, build_trainer

LANGS = ("zh", "en")
STEPS = 8
# One process (the demo's pp=2 × ep=2 layout is covered by tests/dist), a smaller batch, fewer steps.
SMALL = ["parallel.pp=1", "parallel.ep=1", f"train.steps={STEPS}", "train.global_batch=4", "train.micro_batch=2",
         "train.warmup_steps=2", "train.eval_iters=1"]


@pytest.fixture(scope="module")
def demo_sources(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A `data.sources=[...]` override naming a freshly built zh / en corpus (~50 KB, ~150 documents)."""
    root = tmp_path_factory.mktemp("demo_data")
    make_corpus(str(root / "raw"), size_mb=0.06, seed=0)
    for lang in LANGS:
        preprocess_data.main(["--input", str(root / "raw" / f"{lang}.jsonl"),
                              "--output-prefix", str(root / "tokens" / lang),
                              "--json-keys", "text", "--tokenizer-type", "ByteTokenizer",
                              "--append-eod", "--workers", "1"])
    sources = ", ".join(f"{{path: '{root}/tokens/{lang}_text_document', weight: 0.5, lang: {lang}}}" for lang in LANGS)
    return f"data.sources=[{sources}]"


def demo_trainer(grid: ProcessGrid, sources: str, run_dir: Path, *overrides: str) -> Trainer:
    cfg = compose(["+exp=demo", sources, *SMALL, f"run.dir={run_dir}", *overrides])
    validate_config(cfg, 1)
    return build_trainer(cfg, grid)


def recorded_microbatches(trainer: Trainer, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, torch.Tensor]]:
    """Filled with the micro-batches of every later forward (train_step, validation_loss)."""
    seen: list[dict[str, torch.Tensor]] = []
    run_microbatches = trainer.runner.run

    def recording(microbatches: list[dict[str, torch.Tensor]], train: bool) -> Any:
        seen.extend(microbatches)
        return run_microbatches(microbatches, train)

    monkeypatch.setattr(trainer.runner, "run", recording)
    return seen


def restarted_positions(tokens: torch.Tensor, eod_id: int) -> torch.Tensor:
    """Positions counted token by token: 0 at the start of a row and right after each eod."""
    expected = torch.zeros_like(tokens)
    for row in range(tokens.shape[0]):
        for t in range(1, tokens.shape[1]):
            expected[row, t] = 0 if tokens[row, t - 1] == eod_id else expected[row, t - 1] + 1
    return expected


def test_demo_config_trains_on_indexed_data_with_validation_per_language(
        grid: ProcessGrid, demo_sources: str, tmp_path: Path) -> None:
    trainer = demo_trainer(grid, demo_sources, tmp_path)
    assert trainer.cfg.data.kind == "indexed" and trainer.cfg.model.vocab_size == 384  # the demo's, not mock
    batches = iter(trainer.loader)
    losses = [train_step(trainer, next(batches)).loss for _ in range(STEPS)]
    assert all(math.isfinite(loss) for loss in losses), losses
    assert abs(losses[0] - math.log(384)) < 0.3, losses  # a fresh model is near-uniform over the vocabulary
    assert losses[-1] < losses[0] - 0.5, losses  # bytes of real text are learnable in a few steps
    validation = validation_loss(trainer)
    assert list(validation) == list(LANGS), validation
    assert all(math.isfinite(v) and v < losses[0] for v in validation.values()), validation


@pytest.mark.parametrize("reset", [True, False], ids=["reset", "no_reset"])
def test_reset_position_ids_reaches_train_and_eval_batches(
        grid: ProcessGrid, demo_sources: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reset: bool) -> None:
    """data.reset_position_ids → the trainer's loader and validation_loss(): positions restart after each eod."""
    trainer = demo_trainer(grid, demo_sources, tmp_path, f"data.reset_position_ids={str(reset).lower()}")
    batches = iter(trainer.loader)
    train_batches = [mb for _ in range(STEPS) for mb in next(batches)]
    seen = recorded_microbatches(trainer, monkeypatch)
    validation_loss(trainer)
    assert len(seen) == len(LANGS) * 2  # one global batch of two micro-batches per language
    eod = trainer.eod_id
    assert eod == 256  # ByteTokenizer's
    for batch in train_batches + seen:
        tokens = batch["tokens"]
        expected = restarted_positions(tokens, eod) if reset else torch.arange(tokens.shape[1]).expand_as(tokens)
        torch.testing.assert_close(batch["position_ids"], expected, rtol=0, atol=0)
    # The check above means something only if documents end inside rows, in training and in validation.
    for group in (train_batches, seen):
        tokens = torch.cat([b["tokens"] for b in group])
        assert int((tokens[:, :-1] == eod).sum()) >= 2


def test_reset_attention_mask_keeps_training_and_validation_inside_documents(
        grid: ProcessGrid, demo_sources: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """data.reset_attention_mask → every train and validation micro-batch carries its document ids,
    and a training step's loss is that of each document of the real corpus run alone (fp32)."""
    trainer = demo_trainer(grid, demo_sources, tmp_path, "data.reset_attention_mask=true")
    model, eod = trainer.modules[0].model, trainer.eod_id
    microbatches = next(step for step in trainer.loader if sum(int(mb["document_ids"].max()) for mb in step) >= 2)
    alone = []
    with torch.no_grad():
        for mb in microbatches:
            losses = torch.empty_like(mb["tokens"], dtype=torch.float32)
            for row, (tokens, ids) in enumerate(zip(mb["tokens"], mb["document_ids"])):
                for document in ids.unique():
                    where = (ids == document).nonzero().flatten()
                    logits = model(tokens[where][None])[0]
                    losses[row, where] = F.cross_entropy(logits, mb["labels"][row, where], reduction="none")
            alone.append(losses.mean())
    step = train_step(trainer, microbatches)
    assert step.loss == pytest.approx(float(torch.stack(alone).mean()), rel=1e-5)
    seen = recorded_microbatches(trainer, monkeypatch)
    validation_loss(trainer)
    assert len(seen) == len(LANGS) * 2 and sum(int(batch["document_ids"].max()) for batch in seen) >= 1
    for batch in [*microbatches, *seen]:
        assert torch.equal(batch["document_ids"], torch.from_numpy(document_ids(batch["tokens"].numpy(), eod)))
