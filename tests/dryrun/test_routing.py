"""The exchanges of the assumed routing: the split sizes they answer with, and where they go."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megamoe.config import compose
from megamoe.dryrun.fake import FakeStepMode, fake_process_group
from megamoe.dryrun.routing import AssumedAllToAll, AssumedLocalExchange, assume_routing
from megamoe.estimators.routing import ExpertLoads
from megamoe.models import build_stage
from megamoe.nn.moe import MoELayer


def test_all_to_all_sizes_follow_the_loads_with_every_source_routing_alike() -> None:
    """8 experts over ep 4, expert 0 at twice the mean: this rank (ep rank 0, experts 0 and 1)
    sends each rank its experts' rows and receives its own experts' rows from each of 4 sources."""
    rows = ExpertLoads(8, 2, 2.0).rows(16)  # 32 assignments: expert 0 gets 8, the others 24 / 7
    assert rows == [8, 4, 4, 4, 3, 3, 3, 3]
    with fake_process_group(8, 0):
        group, _ = dist.new_subgroups_by_enumeration([[0, 1, 2, 3], [4, 5, 6, 7]])
        exchange = AssumedAllToAll(rows, group)
        with FakeStepMode():
            sizes = exchange.split_sizes(torch.empty(8, dtype=torch.int64), torch.empty(4, 2, dtype=torch.int64))
            received, per_expert = exchange.dispatch(torch.empty(32, 6), torch.empty(8, dtype=torch.int64))
    assert sizes == [12, 8, 6, 6] + [12] * 4 + [32, 16]
    assert received.shape == (48, 6) and per_expert == [32, 16]


def test_a_micro_batch_of_another_size_is_refused() -> None:
    with pytest.raises(RuntimeError, match="assumed 32 routed rows per micro-batch, the MoE layer dispatched 30"):
        AssumedLocalExchange([16, 16]).dispatch(torch.empty(30, 4), torch.empty(2))


def test_every_moe_layer_takes_one_assumed_exchange() -> None:
    cfg = compose(["+exp=tiny"])
    with torch.device("meta"):
        models = [build_stage(cfg, range(0, 2)), build_stage(cfg, range(2, 4))]
    assume_routing(models, ExpertLoads.of(cfg.moe), 128, None)
    exchanges = {id(layer.exchange) for model in models for layer in model.modules() if isinstance(layer, MoELayer)}
    assert len(exchanges) == 1
    assert models[0].layers["0"].mlp.exchange.loads == [32] * 8
