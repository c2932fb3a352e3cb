"""Pipeline schedules: the stage ↔ rank mapping, and the closed forms of the memory estimate and
the planner's bubble, against the action lists torch's own schedule classes build.

The schedules are built for stand-in stages (a constructor reads only their indices and group
size) and their lists replayed: every rank runs its actions in order, each as soon as its inputs
exist (the previous stage's forward, the next stage's input gradient), with one time unit per
chunk forward, input gradient and weight gradient (two for a full backward) and free
communication. The replay gives each rank's idle time (:func:`planner.bubble_slots`) and the
chunks it holds at its peak, from a forward to the weight gradient
(:func:`memory.microbatches_in_flight`). Which micro-batch counts a schedule accepts is
validate_layout's business and must be torch's.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional

import pytest
from torch.distributed.pipelining import Schedule1F1B
from torch.distributed.pipelining.schedules import (
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    FORWARD,
    FULL_BACKWARD,
    OVERLAP_F_B,
    _Action,
)

from megamoe.config import compose
from megamoe.config.validate import validate_layout
from megamoe.errors import ConfigError
from megamoe.estimators.balance import rank_layers
from megamoe.estimators.memory import microbatches_in_flight, stage_params
from megamoe.estimators.planner import bubble_slots
from megamoe.models import validate_config
from megamoe.parallel.pipeline import SCHEDULES
from megamoe.parallel.stages import rank_ends, stage_indices

DURATION = {FORWARD: 1, BACKWARD_INPUT: 1, BACKWARD_WEIGHT: 1, FULL_BACKWARD: 2}
RESULTS = {FORWARD: "F", BACKWARD_INPUT: "I", BACKWARD_WEIGHT: "W", FULL_BACKWARD: "IW"}  # F, input and weight grads
CHUNKS = {"1f1b": (1,), "interleaved_1f1b": (2, 3), "interleaved_zero_bubble": (1, 2, 3),
          "zbv_zero_bubble": (2,), "dualpipev": (2,)}


@dataclass
class StandIn:
    """What a schedule's constructor reads of a stage (it also writes the stage → rank mapping)."""

    stage_index: int
    num_stages: int
    group_size: int
    group_rank: int = 0
    submod: Optional[Any] = None


def parallel(schedule: str, pp: int, v: int, m: int = 1) -> SimpleNamespace:
    """The config keys the mapping, the estimate and validate_layout read."""
    return SimpleNamespace(parallel=SimpleNamespace(schedule=schedule, pp=pp, virtual_stages=v, ep=1),
                           train=SimpleNamespace(global_batch=m, micro_batch=1))


def torch_schedule(schedule: str, pp: int, v: int, m: int) -> Any:
    """torch's schedule for rank 0 of the layout (its lists cover every rank)."""
    cfg = parallel(schedule, pp, v)
    stages = [StandIn(s, pp * v, pp) for s in stage_indices(cfg, 0)]
    if schedule == "1f1b":
        return Schedule1F1B(stages[0], n_microbatches=m, loss_fn=lambda *_: None)
    return SCHEDULES[schedule](stages, n_microbatches=m, loss_fn=lambda *_: None)


def compute_actions(actions: list[Optional[_Action]]) -> list[_Action]:
    """A rank's forwards and backwards in order, overlapped pairs one after the other."""
    flat = []
    for action in filter(None, actions):
        flat.extend(action.sub_actions if action.computation_type == OVERLAP_F_B else [action])
    return [a for a in flat if a.computation_type in DURATION]


def replay(order: dict[int, list[Optional[_Action]]], num_stages: int) -> tuple[float, list[float], list[int]]:
    """The makespan, each rank's busy time and each rank's peak of chunks held (see the module docstring)."""
    todo = {rank: compute_actions(actions) for rank, actions in order.items()}
    done: dict[tuple[int, str, int], float] = {}  # (stage, F / I / W, micro-batch) → end time
    free, busy = [0.0] * len(todo), [0.0] * len(todo)
    held, peak = [0] * len(todo), [0] * len(todo)

    def inputs(a: _Action) -> list[tuple[int, str, int]]:
        s, mb = a.stage_index, a.microbatch_index
        if a.computation_type == FORWARD:
            return [(s - 1, "F", mb)] if s > 0 else []
        if a.computation_type == BACKWARD_WEIGHT:
            return [(s, "I", mb)]
        return [(s, "F", mb)] + ([(s + 1, "I", mb)] if s < num_stages - 1 else [])

    progress = True
    while progress:
        progress = False
        for rank, actions in todo.items():
            while actions and all(key in done for key in inputs(actions[0])):
                a = actions.pop(0)
                duration, results = DURATION[a.computation_type], RESULTS[a.computation_type]
                end = max([free[rank]] + [done[key] for key in inputs(a)]) + duration
                free[rank], busy[rank] = end, busy[rank] + duration
                done.update({(a.stage_index, result, a.microbatch_index): end for result in results})
                held[rank] += (results == "F") - ("W" in results)  # a chunk is held until its weight gradient
                peak[rank] = max(peak[rank], held[rank])
                progress = True
    assert not any(todo.values()), "the replay is stuck"
    return max(free), busy, peak


def cases() -> list[tuple[str, int, int, int]]:
    """Schedules, pp, chunks and micro-batches; 1F1B from m = pp (torch's Schedule1F1B refuses
    fewer, which validate does not check)."""
    return [(schedule, pp, v, m) for schedule, chunks in CHUNKS.items() for v in chunks
            for pp in (2, 3, 4) for m in range(pp if schedule == "1f1b" else 1, 3 * pp + 1)]


def accepted(schedule: str, pp: int, v: int, m: int) -> bool:
    """Does validate_layout take m micro-batches per step (on pp ranks, dp 1)?"""
    try:
        validate_layout(parallel(schedule, pp, v, m), pp)
    except ConfigError:
        return False
    return True


@pytest.mark.parametrize(("schedule", "pp", "v", "m"), cases())
def test_closed_forms_match_torch_s_action_lists(schedule: str, pp: int, v: int, m: int) -> None:
    try:
        built = torch_schedule(schedule, pp, v, m)
    except ValueError:
        assert not accepted(schedule, pp, v, m), "validate takes a micro-batch count torch refuses"
        return
    assert accepted(schedule, pp, v, m), "validate refuses a micro-batch count torch takes"
    if schedule == "1f1b":
        return  # Schedule1F1B runs its own loop; the list it draws for display skips micro-batch 0 on rank > 0
    makespan, busy, peak = replay(built.pipeline_order, pp * v)
    cfg = parallel(schedule, pp, v)
    assert peak == [microbatches_in_flight(cfg, r, m) * v for r in range(pp)]
    idle = [(makespan - b) / (3 * v) for b in busy]  # one slot: a micro-batch's 3 units on each of v chunks
    assert idle == pytest.approx([idle[0]] * pp)
    if schedule == "interleaved_zero_bubble" and 2 * m < pp:
        assert bubble_slots(schedule, pp, v, m) <= idle[0] + 1e-9  # torch may pad more than the formula counts
    else:
        assert bubble_slots(schedule, pp, v, m) == pytest.approx(idle[0])


@pytest.mark.parametrize("schedule", [s for s in CHUNKS if s != "1f1b"])
def test_stage_indices_are_torch_s_mapping(schedule: str) -> None:
    pp, v = 4, 2
    cfg = parallel(schedule, pp, v)
    built = torch_schedule(schedule, pp, v, 8)
    assert built.stage_index_to_group_rank == {s: r for r in range(pp) for s in stage_indices(cfg, r)}


def test_v_layout_puts_both_ends_on_rank_0() -> None:
    cfg = parallel("zbv_zero_bubble", 4, 2)
    assert [stage_indices(cfg, r) for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert [rank_ends(cfg, r) for r in range(4)] == [(True, True), (False, False), (False, False), (False, False)]
    loop = parallel("interleaved_zero_bubble", 4, 2)
    assert [stage_indices(loop, r) for r in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert rank_ends(loop, 0) == (True, False) and rank_ends(loop, 3) == (False, True)


@pytest.mark.parametrize(("schedule", "head_rank"), [("zbv_zero_bubble", 0), ("interleaved_zero_bubble", 1)])
def test_the_head_weighs_on_the_rank_holding_the_last_stage(schedule: str, head_rank: int) -> None:
    """A V puts the last stage, and so the output head, on rank 0; a loop on rank pp − 1: the
    balanced split gives that rank fewer layers, and the estimate gives it the head."""
    cfg = compose(["+exp=tiny", "parallel.pp=2", f"parallel.schedule={schedule}", "parallel.virtual_stages=2",
                   "model.num_layers=8", "model.vocab_size=4096", "parallel.stage_balance=auto"])
    validate_config(cfg)
    layers = [rank_layers(cfg, r).total for r in range(2)]
    assert layers[head_rank] < layers[1 - head_rank]
    holds_head = [stage_params(cfg, r, 1, rank_layers(cfg, r)).holds_head for r in range(2)]
    assert holds_head == [r == head_rank for r in range(2)]


@pytest.mark.parametrize(("overrides", "world", "key"), [
    (["parallel.schedule=zbv_zero_bubble"], 2, "parallel.virtual_stages"),
    (["parallel.schedule=dualpipev", "parallel.virtual_stages=3"], 2, "parallel.virtual_stages"),
    (["parallel.schedule=1f1b", "parallel.virtual_stages=2"], 2, "parallel.virtual_stages"),
    (["parallel.schedule=dualpipev", "parallel.virtual_stages=2", "train.global_batch=6"], 2, "train.global_batch"),
    (["parallel.schedule=interleaved_zero_bubble", "train.global_batch=10"], 2, "train.global_batch"),
])
def test_validate_refuses_what_a_schedule_cannot_run(overrides: list[str], world: int, key: str) -> None:
    cfg = compose(["+exp=tiny", "parallel.pp=2", "train.micro_batch=2", *overrides])
    with pytest.raises(ConfigError) as info:
        validate_config(cfg, world)
    assert str(info.value).startswith(key + ":")
