"""The forward/backward seam: which runner a layout gets, and what the local one computes."""

from __future__ import annotations

import pytest
import torch

from megamoe.config import compose
from megamoe.nn.loss import IGNORE_INDEX
from megamoe.parallel.mesh import ProcessGrid
from megamoe.parallel.pipeline import masked_labels
from megamoe.train.runner import LocalRunner, PipelineRunner
from megamoe.train.trainer import build_trainer

BASE = ["+exp=tiny", "train.global_batch=4", "train.micro_batch=2", "train.seq_len=16"]


def test_the_local_runner_is_the_stage_modules_in_sequence(grid: ProcessGrid) -> None:
    """pp = 1 with two virtual stages: the runner chains both modules; its loss is the mean of
    the micro-batches' losses and its hidden states are the whole model's, micro-batch by micro-batch."""
    trainer = build_trainer(compose([*BASE, "parallel.schedule=interleaved_1f1b", "parallel.virtual_stages=2"]), grid)
    runner = trainer.runner
    assert isinstance(runner, LocalRunner) and runner.grad_divisor(2) == 1 and runner.holds_last
    microbatches = next(iter(trainer.loader))
    first, second = (module.model for module in trainer.modules)
    with torch.no_grad():
        loss = runner.run(microbatches, train=False)
        expected = []
        for mb in microbatches:
            hidden = second.hidden_states(first.hidden_states(mb["tokens"], position_ids=mb["position_ids"]),
                                          position_ids=mb["position_ids"])
            expected.append(trainer.modules[-1].loss(hidden, masked_labels(mb["labels"], mb["loss_mask"])))
        tokens = torch.cat([mb["tokens"] for mb in microbatches])
        positions = torch.cat([mb["position_ids"] for mb in microbatches])
        hidden = runner.hidden_states((tokens, positions), torch.full_like(tokens, IGNORE_INDEX))
    assert float(loss) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-6)
    assert hidden.shape == (4, 16, trainer.cfg.model.hidden_size)


def test_the_pipeline_runner_leaves_the_micro_batch_gradients_summed(grid: ProcessGrid) -> None:
    trainer = build_trainer(compose(BASE), grid)
    runner = PipelineRunner(trainer.cfg, grid, trainer.modules, trainer.grad_sync, 2, None)
    assert runner.grad_divisor(2) == 2  # the gradient sync divides by dp × n
