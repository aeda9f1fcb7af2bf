"""Fixtures shared by the benchmarks: CPU thread count and device peak memory.

``LXMERT_BENCH_THREADS`` (default 1) sets torch's intra-op threads for the CPU cases that
request ``cpu_threads``: on a small, shared CPU machine two OpenMP threads competing with
other processes make a step up to ten times slower and far noisier than one thread, which
hides the difference being measured. The count is recorded in ``extra_info``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch


def pytest_report_header(config) -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    threads = os.environ.get("LXMERT_BENCH_THREADS", "1")
    return f"lxmert_fast benchmarks: torch {torch.__version__}, GPU {device}, CPU threads {threads}"


@pytest.fixture
def cpu_threads() -> Iterator[int]:
    """Run the test with ``LXMERT_BENCH_THREADS`` torch threads, restoring the count after."""
    before = torch.get_num_threads()
    wanted = int(os.environ.get("LXMERT_BENCH_THREADS", "1"))
    torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def peak_memory_mib() -> Callable[[Callable[[], object], torch.device], float | None]:
    """``measure(step, device)``: the CUDA allocation peak of one ``step()`` above what was
    allocated before it, in MiB; None on the CPU, whose allocator keeps no peak counter."""

    def measure(step: Callable[[], object], device: torch.device) -> float | None:
        if device.type != "cuda":
            return None
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return round((torch.cuda.max_memory_allocated(device) - before) / 2**20, 1)

    return measure
