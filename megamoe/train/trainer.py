"""One rank's share of a training run, built from the config: its stage models, how they run
(the runner), how their gradients are averaged, the optimizer and the data.

What a checkpoint saves and restores is ``Trainer.state`` (megamoe.checkpoint.state); the rest
is rebuilt from the config at every start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from megamoe.checkpoint.state import TrainingState
from megamoe.config.choices import Compile
from megamoe.data.blend import Dataset
from megamoe.data.loader import GlobalBatchLoader, build_datasets, data_eod_id, data_stream
from megamoe.nn.casts import autocast_dtype
from megamoe.nn.compile import compile_blocks
from megamoe.nn.moe.experts import expert_parameters
from megamoe.parallel.expert import AllToAllExchange
from megamoe.parallel.grads import GradChunk, GradSync
from megamoe.parallel.mesh import ProcessGrid
from megamoe.parallel.pipeline import StageModule, TiedEmbedding, build_stage_modules
from megamoe.parallel.stall import Progress
from megamoe.train.optim import build_optimizer
from megamoe.train.router_stats import RouterStats
from megamoe.train.runner import Runner, build_runner


@dataclass
class Trainer:
    """Everything one rank needs to run steps; built by :func:`build_trainer`."""

    state: TrainingState
    modules: list[StageModule]  # the pipeline's wrappers of state.models, in stage order
    runner: Runner  # forward and backward of a step's micro-batches (local, or through the pipeline)
    grad_sync: GradSync
    dense_params: list[nn.Parameter]  # replicated over dp
    expert_params: list[nn.Parameter]  # replicated over edp, sharded over ep
    valid: dict[str, Dataset]  # validation data per source (language)
    router_stats: RouterStats
    tied: TiedEmbedding  # this rank's ends of a tied embedding split over stages, if any
    eod_id: Optional[int]  # where documents end: data.reset_position_ids and data.reset_attention_mask use it
    progress: Progress = field(default_factory=Progress)  # the operation in flight, for stall reports

    cfg = property(lambda self: self.state.cfg)
    grid = property(lambda self: self.state.grid)
    optimizer = property(lambda self: self.state.optimizer)
    loader = property(lambda self: self.state.data)

    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    @property
    def num_microbatches(self) -> int:
        t = self.cfg.train
        return t.global_batch // (t.micro_batch * self.grid.dp)

    def parameters(self) -> Iterator[nn.Parameter]:
        for module in self.modules:
            yield from module.parameters()


def build_trainer(cfg: DictConfig, grid: ProcessGrid) -> Trainer:
    """Build this rank's stages (initialised by global name, so any layout starts alike), the
    gradient sync, the optimizer, the data and the runner."""
    exchange = AllToAllExchange(cfg.moe.num_experts, grid.ep_group) if grid.ep > 1 else None
    with torch.device(grid.device):  # built in place: no host copy of the weights (and fake tensors cannot move)
        modules = build_stage_modules(cfg, grid.pp_rank, exchange)
    models = [module.model for module in modules]
    for model in models:
        model.reset_parameters(cfg.seed)
        if cfg.train.compile == Compile.BLOCK:
            compile_blocks(model)
    chunks = [grad_chunk(model) for model in reversed(models)]  # the order their backward ends
    experts = [p for chunk in reversed(chunks) for p in chunk.expert]
    dense = [p for chunk in reversed(chunks) for p in chunk.dense]
    grad_sync = GradSync(chunks, grid.dp_group, grid.edp_group, cfg.parallel.grad_bucket_mb,
                         cfg.parallel.overlap_grad_reduce)
    embeddings = [p for model in models for p in model.embedding_parameters()]
    optimizer = build_optimizer(nn.ModuleList(models), cfg.train, embeddings)
    train, valid, _ = build_datasets(cfg, is_builder=grid.rank == 0)
    eod_id = data_eod_id(cfg)
    state = TrainingState(cfg, grid, models, optimizer, rank_loader(cfg, grid, train, eod_id), data_stream(cfg))
    moe_layers = {layer.layer_index: layer for model in models for layer in model.moe_layers()}
    num_microbatches = cfg.train.global_batch // (cfg.train.micro_batch * grid.dp)
    runner = build_runner(cfg, grid, modules, grad_sync, num_microbatches,
                          autocast_dtype(cfg.train.precision, grid.device.type))
    return Trainer(state, modules, runner, grad_sync, dense, experts, valid, RouterStats(moe_layers),
                   TiedEmbedding.of(models), eod_id)


def grad_chunk(model: nn.Module) -> GradChunk:
    """A stage module's parameters, split into the experts (averaged over edp) and the rest (dp)."""
    experts = expert_parameters(model)
    expert_ids = {id(p) for p in experts}
    return GradChunk(model, [p for p in model.parameters() if id(p) not in expert_ids], experts)


def rank_loader(cfg: DictConfig, grid: ProcessGrid, dataset: Dataset, eod_id: Optional[int]) -> GlobalBatchLoader:
    """This data-parallel rank's micro-batches of ``dataset``, ids checked against the model's vocabulary."""
    return GlobalBatchLoader(dataset, cfg.train.global_batch, cfg.train.micro_batch, grid.dp_rank, grid.dp,
                             eod_id=eod_id, reset_position_ids=cfg.data.reset_position_ids,
                             vocab_size=cfg.model.vocab_size, reset_attention_mask=cfg.data.reset_attention_mask)

