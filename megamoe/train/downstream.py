"""Downstream tasks during training (``eval.downstream_*``): the evaluation tasks
(megamoe.evaluation), scored by the run's own stages every ``eval.downstream_interval`` steps.

The forward passes take the path validation takes — this rank's stage modules in turn (pp = 1)
or the pipeline's forward-only schedule (pp > 1), whose stages were built for fixed shapes:
``global_batch / dp`` rows of ``train.seq_len`` tokens. So each request (a context and one
choice, or a prompt) gets a row of its own, right-padded; the last stage turns the rows'
final-normed hidden states into scores (the schedule also computes its loss on them; it is
dropped). The data-parallel replicas split the requests, every replica running the same
number of batches (the expert all-to-all spans replicas), and one all-reduce gives every rank
all the scores, so every rank computes the same metrics and rank 0 logs them.

Generation is greedy without a cache: one full forward per new token, after which the last
stage's choice is summed over the pipeline group, so the first stage can append it. Works at
every layout; its cost is ``max_new_tokens`` forwards per batch.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import Tensor

from megamoe.data.tokenizer import Tokenizer, tokenizer_from_config
from megamoe.errors import SharedError
from megamoe.evaluation.scoring import Request, evaluate_task, new_tokens, pack, sequence_logprobs
from megamoe.evaluation.tasks import GENERATION, Task, load_tasks, prepare
from megamoe.nn.casts import compute_dtype, shared_casts
from megamoe.nn.loss import IGNORE_INDEX
from megamoe.train.step import evaluating
from megamoe.train.trainer import Trainer

Scores = dict[str, dict[str, float]]  # task → metric → value


class PipelineBackend:
    """:class:`megamoe.evaluation.scoring.Backend` over a training run's stages (collective: every
    rank calls it with the same requests)."""

    def __init__(self, trainer: Trainer, tokenizer: Tokenizer) -> None:
        self.trainer, self.tokenizer = trainer, tokenizer
        self.rows = trainer.num_microbatches * trainer.cfg.train.micro_batch
        self.length = trainer.cfg.train.seq_len
        self.holds_last = trainer.runner.holds_last
        self.device = trainer.grid.device

    def _batches(self, count: int) -> list[list[int]]:
        """This replica's share of ``count`` requests (every dp-th) in batches of ``rows``; every
        replica gets as many batches, the last ones possibly empty."""
        grid = self.trainer.grid
        mine = list(range(grid.dp_rank, count, grid.dp))
        batches = math.ceil(math.ceil(count / grid.dp) / self.rows)
        return [mine[b * self.rows:(b + 1) * self.rows] for b in range(batches)]

    def _hidden(self, tokens: Tensor, labels: Tensor) -> Optional[Tensor]:
        """The last stage's final-normed hidden states of ``tokens`` [rows, length]; None elsewhere."""
        positions = torch.arange(self.length, device=self.device).repeat(len(tokens), 1)  # sent on: contiguous
        return self.trainer.runner.hidden_states(tokens.to(self.device), positions, labels.to(self.device))

    def _share(self, values: Tensor) -> Tensor:
        """Every rank's copy of ``values``, which the last stage's replicas filled in disjoint parts."""
        if self.trainer.grid.world_size > 1:
            dist.all_reduce(values)
        return values

    @property
    def _head(self) -> Tensor:
        return self.trainer.modules[-1].model.head_weight

    def loglikelihoods(self, requests: Sequence[Request], desc: str) -> list[float]:
        values = torch.zeros(len(requests), dtype=torch.float64, device=self.device)
        for batch in self._batches(len(requests)):
            tokens, labels = pack([requests[i] for i in batch], self.rows, self.length, self.tokenizer.eod_id)
            hidden = self._hidden(tokens, labels)
            if hidden is not None and batch:
                values[batch] = sequence_logprobs(hidden[:len(batch)], self._head, labels[:len(batch)].to(self.device))
        return self._share(values).tolist()

    def greedy(self, prompts: Sequence[list[int]], max_new_tokens: int, desc: str) -> list[list[int]]:
        generated = torch.zeros(len(prompts), max_new_tokens, dtype=torch.long, device=self.device)
        for batch in self._batches(len(prompts)):
            tokens = torch.full((self.rows, self.length), self.tokenizer.eod_id, dtype=torch.long)
            ends = torch.ones(self.rows, dtype=torch.long)  # each row's length; padding rows hold one token
            for row, i in enumerate(batch):
                tokens[row, :len(prompts[i])] = torch.tensor(prompts[i])
                ends[row] = len(prompts[i])
            starts = ends.clone()
            labels = torch.full_like(tokens, IGNORE_INDEX)
            for _ in range(max_new_tokens):
                tokens[torch.arange(self.rows), ends] = self._next_tokens(self._hidden(tokens, labels), ends - 1)
                ends += 1
            if self.holds_last:
                for row, i in enumerate(batch):
                    generated[i] = tokens[row, starts[row]:ends[row]].to(self.device)
        return self._share(generated).tolist()

    def _next_tokens(self, hidden: Optional[Tensor], positions: Tensor) -> Tensor:
        """The greedy next id of each row (after its token at ``positions``), on every rank of the
        pipeline group: chosen on the last stage (among the tokenizer's ids), summed with zeros."""
        chosen = torch.zeros(self.rows, dtype=torch.long, device=self.device)
        if hidden is not None:
            last = hidden[torch.arange(self.rows, device=self.device), positions.to(self.device)]
            dtype = compute_dtype(hidden)
            chosen = (last.to(dtype) @ self._head[:self.tokenizer.vocab_size].to(dtype).t()).argmax(dim=-1)
        if self.trainer.grid.pp > 1:
            dist.all_reduce(chosen, group=self.trainer.grid.pp_group)
        return chosen.cpu()


class DownstreamEval:
    """The configured tasks, read once at startup (a bad task file, or generation items that leave
    no room for their prompt in ``train.seq_len``, stop the run before its first step), scored
    every ``eval.downstream_interval`` steps and at the last step."""

    def __init__(self, cfg: DictConfig) -> None:
        e = cfg.eval
        self.cfg = cfg
        self.tasks: list[Task] = []
        if e.downstream_interval:
            self.tokenizer = tokenizer_from_config(cfg.data.tokenizer)
            if self.tokenizer.vocab_size > cfg.model.vocab_size:
                raise SharedError(f"eval.downstream_tasks: the tokenizer has {self.tokenizer.vocab_size} ids, more than "
                                  f"model.vocab_size={cfg.model.vocab_size}")
            self.tasks = [prepare(task, e.downstream_limit, e.downstream_fewshot, cfg.seed)
                          for task in load_tasks(e.downstream_tasks)]
            for task in self.tasks:
                if task.kind == GENERATION:
                    new_tokens(task, e.downstream_max_new_tokens, cfg.train.seq_len)

    def due(self, step: int) -> bool:
        interval = self.cfg.eval.downstream_interval
        return interval > 0 and (step % interval == 0 or step == self.cfg.train.steps)

    def run(self, trainer: Trainer) -> Scores:
        """Every task's metrics (collective). Modules in eval mode meanwhile (no router noise), the
        expert load not recorded, the weights' cast copies made once for all the passes."""
        backend = PipelineBackend(trainer, self.tokenizer)
        with evaluating(trainer, "downstream evaluation"), trainer.runner.autocast(), shared_casts():
            return {task.name: evaluate_task(task, self.tokenizer, backend, self.cfg.train.seq_len,
                                             self.cfg.eval.downstream_max_new_tokens) for task in self.tasks}
