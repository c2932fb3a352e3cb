"""Allocation failures as torch raises them — on a GPU, from the CPU allocator, re-raised by a
pipeline stage — become one line; anything else passes through. (The real thing, a CPU allocation
refused under a small address space, is in tests/launch/test_pretrain.py.)"""

from __future__ import annotations

import re

import pytest
import torch

from megamoe.config import compose
from megamoe.errors import OutOfMemory
from megamoe.train.oom import explained_out_of_memory
from tests.pretrain import TINY

CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB of which 1.20 GiB "
            "is free. Of the allocated memory 75.10 GiB is allocated by PyTorch")
CPU_OOM = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 1073741824 bytes. Error code 12 (Cannot allocate memory)")


def _raised(error: BaseException) -> BaseException:
    with pytest.raises(BaseException) as caught, explained_out_of_memory(compose(TINY), world_size=2):
        raise error
    return caught.value


def _in_a_stage(error: BaseException) -> RuntimeError:
    wrapped = RuntimeError("Stage 1 failed in backward")
    wrapped.__cause__ = error  # how torch's pipeline stages re-raise
    return wrapped


@pytest.mark.parametrize(("error", "where", "size"), [
    (torch.OutOfMemoryError(CUDA_OOM), "GPU", "2.1 GB"),
    (_in_a_stage(torch.OutOfMemoryError(CUDA_OOM)), "GPU", "2.1 GB"),
    (RuntimeError(CPU_OOM), "host", "1.1 GB"),
])
def test_an_allocation_failure_is_one_line_with_the_memory_needed_and_the_estimate(error: BaseException, where: str,
                                                                                  size: str) -> None:
    raised = _raised(error)
    assert isinstance(raised, OutOfMemory) and "\n" not in str(raised)
    assert re.fullmatch(rf"out of {where} memory: {size} more could not be allocated with [\d.]+ (bytes|[kMG]B) in "
                        r"use, so this rank needed at least [\d.]+ (bytes|[kMG]B); the estimator puts the layout's "
                        r"fullest rank at [\d.]+ [kMG]B \(launch/model_stats.py\): lower train.micro_batch, .*",
                        str(raised))


def test_other_errors_pass_through() -> None:
    bug = RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x8)")
    assert _raised(bug) is bug
