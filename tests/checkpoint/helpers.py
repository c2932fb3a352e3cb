"""Shared by the checkpoint tests: read a checkpoint's tensors, compare two sets bit for bit,
wait for something a background thread or process does."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from megamoe.checkpoint.store import read_manifest, read_shard


def checkpoint_tensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Every model and optimizer tensor of a checkpoint under its global name."""
    manifest = read_manifest(ckpt_dir)
    tensors: dict[str, torch.Tensor] = {}
    for name in manifest.files_of_kind("model") + manifest.files_of_kind("optim"):
        tensors.update(read_shard(ckpt_dir / name, manifest.files[name]))
    return tensors


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def wait_until(condition: Callable[[], bool], timeout: float, what: str = "it") -> float:
    """Seconds until ``condition`` held (it must within ``timeout``: else ``what`` did not happen)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"{what} did not happen in time"
        time.sleep(0.05)
    return time.monotonic() - start
