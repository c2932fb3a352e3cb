"""Each step's record in metrics.jsonl, and the console line at log steps (and on skipped steps).

The record: loss, lr, gradient norm, tokens/s, consumed samples, step time, the slowest rank,
MFU on GPUs whose peak is known; at log steps (``logging.expert_load``) the routing of every
MoE layer of the model, gathered from all pipeline stages: the expert load, the mean aux loss
and z-loss, and the shares of dropped assignments and of tokens that reached no expert.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from megamoe.config.choices import FfnType
from megamoe.estimators.flops import attention_flops_per_token, fwd_flops_per_token
from megamoe.train.callbacks.base import Action
from megamoe.train.metrics import MetricsLogger, detect_peak_flops, mfu, routing_summary
from megamoe.train.router_stats import SUMS, LayerRouting
from megamoe.train.step import StepResult
from megamoe.train.trainer import Trainer


class StepMetrics:
    def __init__(self, trainer: Trainer, logger: MetricsLogger) -> None:
        cfg = trainer.cfg
        self.trainer, self.logger = trainer, logger
        self.tokens_per_step = cfg.train.global_batch * cfg.train.seq_len
        self.flops_per_token = 3 * (fwd_flops_per_token(cfg) + attention_flops_per_token(cfg, cfg.train.seq_len))
        self.peak = detect_peak_flops(trainer.grid.device)

    def is_log_step(self, step: int) -> bool:
        t = self.trainer.cfg.train
        return step % t.log_interval == 0 or step == t.steps

    def reports_routing(self, step: int) -> bool:
        """Does step ``step`` report the routing (and so reduce it over dp)?"""
        return self.trainer.cfg.logging.expert_load and self.is_log_step(step)

    def after_step(self, result: StepResult) -> Optional[Action]:
        trainer, step, elapsed = self.trainer, result.step, result.time_s
        record: dict[str, Any] = {
            "step": step, "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
            "skipped": result.skipped, "tokens_per_s": self.tokens_per_step / elapsed,
            "consumed_samples": trainer.loader.consumed_samples, "step_time_s": elapsed,
            "slowest_rank": result.slowest_rank, "slowest_rank_s": result.slowest_rank_s,
        }
        if self.peak is not None:
            record["mfu"] = mfu(record["tokens_per_s"] / trainer.grid.world_size, self.flops_per_token, self.peak)
        if self.reports_routing(step):
            record.update(routing_summary(self._routing_on_every_rank(result.routing)))
        self.logger.log_step(step, record)
        if self.is_log_step(step) or result.skipped:
            self.logger.console(step, record)
        return None

    def _routing_on_every_rank(self, routing: dict[int, LayerRouting]) -> dict[int, LayerRouting]:
        """Every MoE layer's routing (already dp-summed on each stage), on every rank: one
        all-reduce of a [layers, experts + sums] table that each stage's first replica fills in."""
        cfg, grid = self.trainer.cfg, self.trainer.grid
        if cfg.model.ffn_type != FfnType.MOE:
            return {}
        self.trainer.progress.at("routing gather")
        table = torch.zeros(cfg.model.num_layers, cfg.moe.num_experts + len(SUMS), dtype=torch.float64,
                            device=grid.device)
        if grid.dp_rank == 0:
            for index, layer in routing.items():
                table[index] = layer.row().to(grid.device)
        if grid.world_size > 1:
            dist.all_reduce(table)
        layers = {index: LayerRouting.of_row(row) for index, row in enumerate(table.cpu())}
        return {index: layer for index, layer in layers.items() if layer.forwards > 0}  # dense layers route nothing
