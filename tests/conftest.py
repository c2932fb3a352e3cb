"""Fixtures the whole suite shares."""

from __future__ import annotations

from typing import Iterator

import pytest

from megamoe.parallel.mesh import ProcessGrid, init_grid, shutdown


@pytest.fixture
def grid() -> Iterator[ProcessGrid]:
    """One process's grid (pp = ep = dp = 1, gloo), torn down after the test."""
    yield init_grid(1, 1, timeout_s=60)
    shutdown()
