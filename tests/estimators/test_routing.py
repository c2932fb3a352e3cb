"""The routing assumption: rows per expert at an expert imbalance, and what the busiest rank receives."""

import pytest

from megamoe.config import compose
from megamoe.errors import UserError
from megamoe.estimators.routing import ExpertLoads

TOKENS = 4096


def m32(*overrides: str) -> ExpertLoads:
    return ExpertLoads.of(compose(["+exp=m32_2000b", *overrides]).moe, 1.0)


@pytest.mark.parametrize("imbalance", [1.0, 1.5, 4.0, 16.0])
def test_rows_keep_every_assignment_and_put_the_busiest_first(imbalance: float) -> None:
    loads = ExpertLoads(32, 2, imbalance)
    rows = loads.rows(TOKENS)
    assert sum(rows) == 2 * TOKENS  # dropless: every token's k assignments land somewhere
    assert rows[0] == min(TOKENS, round(imbalance * 2 * TOKENS / 32)) == max(rows)
    assert max(rows[1:]) - min(rows[1:]) <= 1  # the others share the rest evenly


def test_balanced_routing_gives_every_rank_its_average() -> None:
    loads = ExpertLoads(32, 2)
    assert loads.rows(TOKENS) == [256] * 32
    assert loads.busiest_rank_share(8, TOKENS) == loads.busiest_rank_share(1, TOKENS) == 1.0


def test_the_busiest_rank_receives_more_the_fewer_experts_it_holds() -> None:
    """Expert 0 at twice the mean: ep 32 holds it alone (2×); ep 8 shares its rank with 3 lighter
    experts; ep 1 holds every expert, so its rows stay the balanced ones."""
    loads = ExpertLoads(32, 2, 2.0)
    rest = (2 * TOKENS - 512) / 31
    assert loads.busiest_rank_share(32, TOKENS) == 2.0
    assert loads.busiest_rank_share(8, TOKENS) == pytest.approx((512 + 3 * rest) / (4 * 256), abs=1e-3)
    assert loads.busiest_rank_share(1, TOKENS) == 1.0


def test_capacity_bounds_the_rows_whatever_the_imbalance() -> None:
    loads = ExpertLoads(32, 2, 8.0, capacity_factor=1.25)
    capacity = 320  # ceil(1.25 · 4096 · 2 / 32)
    assert max(loads.rows(TOKENS)) == capacity
    assert ExpertLoads(32, 2, 16.0, capacity_factor=1.25).busiest_rank_share(32, TOKENS) == capacity / 256


def test_expert_choice_fills_every_expert_to_its_capacity() -> None:
    loads = m32("moe.router_mode=expert_choice")
    assert loads.rows(TOKENS) == [256] * 32


@pytest.mark.parametrize("imbalance", [0.5, 16.5])
def test_an_impossible_imbalance_is_a_user_error_naming_the_flag(imbalance: float) -> None:
    with pytest.raises(UserError, match=r"--expert-imbalance: .* outside \[1, 16\].*32 / 2"):
        ExpertLoads.of(compose(["+exp=m32_2000b"]).moe, imbalance)
