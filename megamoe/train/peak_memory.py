"""The most bytes the CPU allocator had handed out at once while a block ran (a measurement, for
benchmarks/loss_memory.py and for the memory estimate's tests).

torch exposes no CPU counterpart of ``torch.cuda.max_memory_allocated``; its profiler, with
``profile_memory=True``, records every allocation and free with its size. Replaying those
events in time order gives the running total of live bytes, and its maximum. Only tensors
allocated inside the block count; frees of older ones lower the total (start it early).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


@dataclass
class Peak:
    bytes: int = 0  # filled when the block exits


@contextlib.contextmanager
def cpu_peak_bytes() -> Iterator[Peak]:
    """``with cpu_peak_bytes() as peak: ...`` then ``peak.bytes``."""
    peak = Peak()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield peak
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == DeviceType.CPU), key=lambda e: e.start_ns())
    total = 0
    for event in events:
        total += event.nbytes()
        peak.bytes = max(peak.bytes, total)
