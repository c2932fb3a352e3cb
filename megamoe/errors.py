"""Every error a user can act on, and the one-line descriptions of failed writes.

A leaf module (standard library only): data tools, the config and the trainer all raise these,
and a command-line entry point (megamoe.cli) turns each into one ``error: ...`` line, exit 2.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path
from typing import Iterator, Optional


class UserError(Exception):
    """A mistake the user can fix (bad file, bad flag, bad layout); shown as one line."""


class SharedError(UserError):
    """A UserError raised identically on every rank at once — derived from the config and shared
    files alone, or agreed through a collective — so rank 0 alone reports it (see launch/pretrain.py)."""


class ConfigError(ValueError):
    """A user mistake in the configuration; its message is one line that names the key."""


class CheckpointError(UserError):
    """A missing, truncated, corrupt or mismatched checkpoint file; the message names the file."""


class DatasetFormatError(UserError):
    """A ``.bin``/``.idx`` pair that is missing, truncated or not in the expected format."""


class IndexWaitTimeout(UserError):
    """A rank waited too long for rank 0's index files (rank 0 failed, or the cache is not shared)."""


class TaskError(SharedError):
    """An evaluation task that cannot be read; shared: every rank of a training run reads the same files."""


class OutOfMemory(UserError):
    """An allocation failed: the message says how much memory the rank needed at least, what the
    estimator expected for the layout, and which settings to change."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, with what it cost (the step reached, the checkpoint to resume from):
    said in one line, exit code 130."""


class NonFiniteError(SharedError):
    """A NaN/Inf loss or gradient norm with train.on_nonfinite=stop, or too many skipped in a row."""


def format_bytes(n: int) -> str:
    """``n`` bytes in the largest unit that keeps a digit before the point (decimal: 1 GB = 1e9)."""
    unit, scale = next(((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if n >= s), ("bytes", 1))
    return f"{n / scale:,.1f} {unit}" if scale > 1 else f"{n} bytes"


def write_error(exc: OSError, fix: str, needed_bytes: Optional[int] = None) -> str:
    """One line for a failed write: the path, the system's reason, and the fix.

    For a full disk (ENOSPC, EDQUOT) it also says how much space the write needed and how much
    the file system has free now (after the caller removed its partial output).
    """
    path = exc.filename or "?"
    line = f"{path}: cannot write ({exc.strerror or exc})"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        need = f"needs {format_bytes(needed_bytes)}, " if needed_bytes else ""
        line += f": the disk is full ({need}{format_bytes(free_bytes(Path(path)))} free)"
    return f"{line}; {fix}"


def free_bytes(path: Path) -> int:
    """Free space of the file system ``path`` is (or would be created) on: its nearest existing ancestor's."""
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    return shutil.disk_usage(existing).free


@contextlib.contextmanager
def naming(path: Path | str) -> Iterator[None]:
    """Let OSErrors raised inside name ``path``: the system names the file only for open() and
    the like, not for write() or fsync(), where a full disk shows."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise
