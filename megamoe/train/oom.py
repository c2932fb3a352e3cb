"""An allocation failure, said in one line: how much memory the rank needed at least, and what the
estimator (megamoe.estimators.memory, ``launch/model_stats.py``) expected for the layout.

torch reports running out of memory as a ``torch.OutOfMemoryError`` on CUDA ("Tried to allocate
2.00 GiB") and as a RuntimeError from the CPU allocator ("DefaultCPUAllocator: can't allocate
memory: you tried to allocate 1073741824 bytes"), possibly wrapped by a pipeline stage that
re-raises it; either way a 30-line traceback that does not say what to change.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
from pathlib import Path
from typing import Iterator, Optional

import torch
from omegaconf import DictConfig

from megamoe.errors import OutOfMemory, format_bytes
from megamoe.estimators import balance

_CUDA = re.compile(r"Tried to allocate ([\d.]+) (GiB|MiB|KiB|B)")
_CPU = re.compile(r"DefaultCPUAllocator: can't allocate memory: you tried to allocate (\d+) bytes")
_UNITS = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "B": 1}
FIX = ("lower train.micro_batch, set train.activation_checkpointing=full, or spread the model over more ranks "
       "(parallel.pp, parallel.ep); python launch/plan.py finds a layout that fits")


def _requested_bytes(exc: BaseException) -> Optional[tuple[int, str]]:
    """(bytes the failed allocation asked for, on what), if ``exc`` or one of its causes is an allocation failure."""
    link: Optional[BaseException] = exc
    while link is not None:
        text = str(link)
        cuda, cpu = _CUDA.search(text), _CPU.search(text)
        if isinstance(link, torch.OutOfMemoryError) and cuda:
            return int(float(cuda[1]) * _UNITS[cuda[2]]), "GPU"
        if cpu:
            return int(cpu[1]), "host"
        link = link.__cause__ or link.__context__
    return None


def _in_use_bytes(where: str) -> int:
    """What the rank held when the allocation failed: the caching allocator's reserve on a GPU,
    the resident set on the host."""
    if where == "GPU":
        return torch.cuda.memory_reserved()
    statm = Path("/proc/self/statm")  # Linux; elsewhere the peak resident set (in bytes on macOS)
    if statm.exists():
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@contextlib.contextmanager
def explained_out_of_memory(cfg: DictConfig, world_size: int) -> Iterator[None]:
    """Turn an allocation failure raised inside into an OutOfMemory error of one line."""
    try:
        yield
    except Exception as exc:
        found = _requested_bytes(exc)
        if found is None:
            raise
        requested, where = found
        in_use = _in_use_bytes(where)
        _, estimate = balance.memory_per_gpu(cfg, world_size)
        needed = format_bytes(in_use + requested)
        raise OutOfMemory(f"out of {where} memory: {format_bytes(requested)} more could not be allocated with "
                          f"{format_bytes(in_use)} in use, so this rank needed at least {needed}; the estimator puts "
                          f"the layout's fullest rank at {format_bytes(int(estimate.total))} (launch/model_stats.py): "
                          f"{FIX}") from exc
