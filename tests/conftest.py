"""Fixtures the whole suite shares."""

from __future__ import annotations

import threading
from typing import Iterator

import pytest

import megamoe.checkpoint.saver as saver_module
from megamoe.parallel.mesh import ProcessGrid, init_grid, shutdown


@pytest.fixture
def grid() -> Iterator[ProcessGrid]:
    """One process's grid (pp = ep = dp = 1, gloo), torn down after the test."""
    yield init_grid(1, 1, timeout_s=60)
    shutdown()


@pytest.fixture
def stuck_checkpoint_writer(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Background checkpoint writers block in their first write (a loaded machine, a slow file
    system) until the event yielded is set, at the latest when the test ends; a run gives such a
    save up after 0.2 s (ABANDON_WAIT_S)."""
    release, real_write = threading.Event(), saver_module.write_shards

    def stuck_write(*args: object, **kwargs: object) -> object:
        release.wait(30)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(saver_module, "write_shards", stuck_write)
    monkeypatch.setattr(saver_module, "ABANDON_WAIT_S", 0.2)
    yield release
    release.set()
