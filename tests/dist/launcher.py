"""Run a function in N local processes that form a gloo process group (for multi-process tests).

Each worker gets the environment torchrun would give it (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and one CPU thread, so several ranks share the
machine's few cores without oversubscription. Arguments and return values travel as plain
pickles (tensors by value, not through shared memory that dies with the worker).
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Worker = Callable[[int, int, Any], Any]


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, payload: bytes, init: bool, timeout_s: float, results: mp.Queue) -> None:
    os.environ.update(
        OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    try:
        fn, args = pickle.loads(payload)
        if init:
            dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
        results.put((rank, True, pickle.dumps(fn(rank, world_size, args))))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Worker, world_size: int, args: Any = None, timeout_s: float = 120, init_process_group: bool = True
) -> list[Any]:
    """Call ``fn(rank, world_size, args)`` in ``world_size`` spawned processes; return their results.

    ``fn`` must be importable (a module-level function). With ``init_process_group`` the default
    gloo group is up when ``fn`` starts; pass False to test code that initialises it from the
    environment itself. The first failing rank's traceback is raised as RuntimeError; a rank that
    dies silently or a run longer than ``timeout_s`` raises too, and every worker is stopped.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    payload = pickle.dumps((fn, args))
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, payload, init_process_group, timeout_s, results), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outputs) < world_size:
            try:
                rank, ok, body = results.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outputs]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} without a result")
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(outputs))
                    raise TimeoutError(f"ranks {missing} did not finish within {timeout_s:g} s")
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{body}")
            outputs[rank] = pickle.loads(body)
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    return [outputs[r] for r in range(world_size)]
