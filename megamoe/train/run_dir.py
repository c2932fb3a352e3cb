"""A run directory belongs to one run at a time.

Two runs writing the same ``run.dir`` interleave their metrics and overwrite each other's
checkpoints, so global rank 0 holds an exclusive lock on ``run.dir/run.lock`` for the whole run.
The lock is a POSIX record lock (``fcntl.lockf``, which NFS supports too): the kernel drops it
when its process ends, however it ends, so a run killed with -9 never blocks the next one. The
file's text names the holder (host, pid, start time) for the message the second run prints.

Once it holds the directory, rank 0 writes the resolved config and removes what interrupted
checkpoint saves left behind (``checkpoints/step_N.tmp``): no other run can be writing them.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import os
import socket
from pathlib import Path
from typing import IO, Optional

from omegaconf import DictConfig, OmegaConf

from megamoe.checkpoint.store import remove_unfinished
from megamoe.errors import SharedError, UserError, write_error
from megamoe.parallel.mesh import ProcessGrid, first_error

LOCK_FILE = "run.lock"


def lock_run_dir(run_dir: Path) -> IO[str]:
    """Create ``run_dir`` if needed and lock it; the returned file holds the lock until closed.

    Raises UserError naming the holder when another live run has it.
    """
    lock = open(run_dir / LOCK_FILE, "a+", encoding="utf-8")
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        lock.seek(0)
        holder = lock.read().strip() or "another run"
        lock.close()
        raise UserError(f"run.dir={run_dir} is in use by {holder}; wait for that run to end or stop it, "
                        "or choose another run.dir") from None
    started = datetime.datetime.now().isoformat(timespec="seconds")
    lock.seek(0)
    lock.truncate()
    lock.write(f"the run of host {socket.gethostname()} pid {os.getpid()} (started {started})\n")
    lock.flush()
    return lock


def _take_over(cfg: DictConfig, run_dir: Path) -> IO[str]:
    """Rank 0's part: lock, write config.yaml, clear unfinished saves (saying so)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = lock_run_dir(run_dir)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    except OSError as exc:
        raise UserError(write_error(exc, "choose a writable run.dir")) from None
    for leftover in remove_unfinished(run_dir / "checkpoints"):
        print(f"checkpoint: removed {leftover.name}, left by a save that did not finish", flush=True)
    return lock


def claim_run_dir(cfg: DictConfig, grid: ProcessGrid) -> Optional[IO[str]]:
    """Collective: rank 0 takes ``cfg.run.dir`` (returns the lock file, None on other ranks).

    A locked or unwritable directory stops every rank with one SharedError line.
    """
    lock, error = None, None
    if grid.rank == 0:
        try:
            lock = _take_over(cfg, Path(cfg.run.dir))
        except UserError as exc:
            error = str(exc)
    error = first_error(grid, error)
    if error is not None:
        raise SharedError(error)
    return lock
