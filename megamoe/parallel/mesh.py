"""The process grid: who am I, and which groups do I talk to.

World = pp × dp; expert parallelism lives inside dp (dp = edp × ep, ep innermost so that the
all-to-all stays inside a node on GPU clusters). Global rank = pp_rank · dp + dp_rank and
dp_rank = edp_rank · ep + ep_rank.

The launcher only decides *how* processes learn their rank: torchrun and the DeepSpeed launcher
set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; SLURM's ``srun`` sets
SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (MASTER_ADDR / MASTER_PORT come from the sbatch
script). Without any of them we run as a single process.

Groups are built with ``new_subgroups_by_enumeration`` rather than a DeviceMesh: the data-
parallel group is the flattening of (edp, ep), which DeviceMesh only offers through a private
API (``_flatten``), and the tied-embedding group (first and last pipeline stage) is not a mesh
dimension at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megamoe.config.choices import Backend


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun" | "slurm" | "single"


def read_launch_env(env: Mapping[str, str] = os.environ) -> LaunchEnv:
    """Rank and world size from torchrun / DeepSpeed (RANK...) or SLURM (SLURM_PROCID...)."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), "slurm")
    return LaunchEnv(0, 1, 0, "single")


@dataclass
class ProcessGrid:
    """This rank's coordinates in the (pp, edp, ep) grid and its process groups.

    Groups are None when their size is 1, so callers skip communication.
    """

    rank: int
    world_size: int
    pp: int
    dp: int
    ep: int
    device: torch.device
    pp_group: Optional[ProcessGroup] = None
    dp_group: Optional[ProcessGroup] = None
    ep_group: Optional[ProcessGroup] = None
    edp_group: Optional[ProcessGroup] = None
    embed_group: Optional[ProcessGroup] = None  # pp ranks 0 and pp − 1, same dp rank (a loop's first + last stage)

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    @property
    def pp_rank(self) -> int:
        return self.rank // self.dp

    @property
    def dp_rank(self) -> int:
        return self.rank % self.dp

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.ep

    @property
    def edp_rank(self) -> int:
        return self.dp_rank // self.ep


def grid_rank_lists(pp: int, dp: int, ep: int) -> dict[str, list[list[int]]]:
    """Every group of each kind as lists of global ranks (pure: testable without processes)."""
    edp = dp // ep
    rank = lambda p, e, x: p * dp + e * ep + x  # noqa: E731 - (pp, edp, ep) coordinates → rank
    return {
        "pp": [[rank(p, e, x) for p in range(pp)] for e in range(edp) for x in range(ep)],
        "dp": [[rank(p, e, x) for e in range(edp) for x in range(ep)] for p in range(pp)],
        "ep": [[rank(p, e, x) for x in range(ep)] for p in range(pp) for e in range(edp)],
        "edp": [[rank(p, e, x) for e in range(edp)] for p in range(pp) for x in range(ep)],
        "embed": [[d, (pp - 1) * dp + d] for d in range(dp)] if pp > 1 else [],
    }


def pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def attempt_store(env: LaunchEnv, timeout: timedelta, environ: Mapping[str, str] = os.environ) -> dist.Store:
    """The job's key-value store (at MASTER_ADDR:MASTER_PORT), with this launch attempt's keys apart.

    torchrun restarts a failed group in place (``--max-restarts``), and by default its workers
    share the agent's rendezvous store, which still holds the previous attempt's keys: a
    restarted gloo group then reads stale peer addresses and fails to connect ("Gloo
    connectFullMesh failed … Connection refused", pytorch issue 135712). Prefixing every key
    with the restart count makes each attempt start on a clean slate, with or without
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE``. Rank 0 hosts the store unless the agent does.
    """
    agent_hosts = environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), env.world_size,
                          is_master=env.rank == 0 and not agent_hosts, timeout=timeout, wait_for_workers=False)
    return dist.PrefixStore(f"megamoe/attempt{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_grid(pp: int, ep: int, timeout_s: int, backend: str = "auto", env: Optional[LaunchEnv] = None) -> ProcessGrid:
    """Start torch.distributed (nccl on CUDA, gloo on CPU) with a collective timeout; build all groups.

    The caller has already validated that world_size fits (pp, ep) — see config.validate_layout.
    """
    env = env or read_launch_env()
    device = pick_device(env.local_rank)
    if backend == Backend.AUTO:
        backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        store = dist.HashStore() if env.world_size == 1 else attempt_store(env, timeout)
        dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout)
    dp = env.world_size // pp
    grid = ProcessGrid(rank=env.rank, world_size=env.world_size, pp=pp, dp=dp, ep=ep, device=device)
    for kind, rank_lists in grid_rank_lists(pp, dp, ep).items():
        if not rank_lists or len(rank_lists[0]) == 1:
            continue
        group, _ = dist.new_subgroups_by_enumeration(rank_lists, timeout=timeout)
        if any(grid.rank in ranks for ranks in rank_lists):
            setattr(grid, f"{kind}_group", group)
    return grid


def first_error(grid: ProcessGrid, error: Optional[str]) -> Optional[str]:
    """Every rank's outcome (an error message, or None) → the first rank's error, on every rank.

    Collective: lets all ranks take the same branch after a step that may fail on some of them.
    """
    if grid.world_size == 1:
        return error
    errors: list[Optional[str]] = [None] * grid.world_size
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
