"""Fixtures shared by the benchmarks: CPU thread count, device peak memory, device time.

``LXMERT_BENCH_THREADS`` (default 1) sets torch's intra-op threads for the CPU cases that
request ``cpu_threads``: on a small, shared CPU machine two OpenMP threads competing with
other processes make a step up to ten times slower and far noisier than one thread, which
hides the difference being measured. The count is recorded in ``extra_info``.

``device_time`` (CUDA cases): the time the GPU spends on one call, without the host's launch
cost that wall time includes (DESIGN.md §7: the H200 run's wall times could not tell a fast kernel
from a slow one), and, given the bytes the op must move, its bandwidth against a ``clone()`` of the
same bytes timed the same way in the same run — the card's practical ceiling, not a datasheet's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from functools import cache

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


def _graph_replay_ms(fn: Callable[[], object], calls: int = 20, replays: int = 10) -> float:
    """Median ms per call of ``replays`` replays of a CUDA graph holding ``calls`` calls of ``fn``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up on the side stream, as capture requires
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    return _median_event_ms(graph.replay, replays) / calls


def _median_event_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median ms of ``fn`` between CUDA events, one pair per call."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def device_ms(fn: Callable[[], object]) -> tuple[float, str]:
    """(median device ms per call of ``fn``, the method that measured it).

    ``fn`` must not synchronise (a capture forbids it). Tried in order: triton's
    ``do_bench_cudagraph`` (calls unrolled into one graph), our own graph capture and replay, and
    CUDA events around plain calls when the step cannot be captured — the last includes any
    time the GPU waits for the host, so the method is recorded beside the number.
    """
    from triton.testing import do_bench_cudagraph

    attempts = (
        ("do_bench_cudagraph", lambda: do_bench_cudagraph(fn, rep=50, return_mode="median")),
        ("cuda_graph_events", lambda: _graph_replay_ms(fn)),
        ("events_no_capture", lambda: _warm_then(fn, lambda: _median_event_ms(fn, 50))),
    )
    errors = []
    for method, measure in attempts:
        try:
            ms = float(measure())
        except Exception as exc:  # any capture failure falls through to the next method
            errors.append(f"{method}: {type(exc).__name__}: {exc}")
            torch.cuda.synchronize()
            continue
        return ms, method if not errors else f"{method} ({'; '.join(e[:200] for e in errors)})"
    raise RuntimeError("no method could time the step on the device: " + " | ".join(errors))


def _warm_then(fn: Callable[[], object], measure: Callable[[], float]) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    return measure()


@cache
def clone_gbps(nbytes: int) -> float:
    """GB/s of ``clone()`` moving ``nbytes`` in all (reading and writing ``nbytes / 2``), timed as
    :func:`device_ms` times the kernels; once per size per run. Neither flushes the L2 between
    calls, so below the L2's size both run partly from it: compare at equal bytes only."""
    source = torch.empty(max(nbytes // 2, 1), dtype=torch.uint8, device="cuda")
    ms, _ = device_ms(source.clone)
    return nbytes / (ms * 1e-3) / 1e9


def clone_bandwidth(nbytes: int, ms: float) -> dict[str, float | int]:
    """The bandwidth figures of an op that must move ``nbytes`` (reads + writes) in ``ms`` of device
    time: ``bytes``, ``gbps``, ``clone_gbps`` (a clone of the same bytes, this run, this card) and
    ``pct_of_clone`` (how close the op comes to that ceiling)."""
    gbps, ceiling = nbytes / (ms * 1e-3) / 1e9, clone_gbps(nbytes)
    return {
        "bytes": int(nbytes),
        "gbps": round(gbps, 1),
        "clone_gbps": round(ceiling, 1),
        "pct_of_clone": round(100.0 * gbps / ceiling, 1),
    }


@pytest.fixture
def device_time(benchmark) -> Callable[..., float]:
    """``measure(fn, nbytes=None)``: device ms per call of ``fn`` (which must not synchronise),
    recorded in ``benchmark.extra_info`` as ``device_ms`` with ``device_time_method``; with
    ``nbytes`` (what the op must read and write) also :func:`clone_bandwidth`'s figures."""

    def measure(fn: Callable[[], object], nbytes: int | None = None) -> float:
        ms, method = device_ms(fn)
        benchmark.extra_info.update({"device_ms": round(ms, 5), "device_time_method": method})
        if nbytes is not None:
            benchmark.extra_info.update(clone_bandwidth(nbytes, ms))
        return ms

    return measure


@pytest.fixture
def step_timer(benchmark, cpu_threads) -> Callable[..., None]:
    """``time(step, device, batch_size, flops, mode)``: :func:`time_training_step` for this test."""
    return lambda step, device, batch_size, flops, mode: time_training_step(
        benchmark, step, device, batch_size, flops, mode, cpu_threads
    )


def time_training_step(
    benchmark,
    step: Callable[[], None],
    device: str,
    batch_size: int,
    flops: Callable[[], int],
    mode: str,
    cpu_threads: int,
) -> None:
    """Time a whole training ``step`` (forward, loss, backward, optimizer): warm-up (compile and
    graph capture when ``mode`` is compiled), then on CUDA ``device_ms`` over 20 steps between
    CUDA events, ``tflops``/``peak_pct`` from ``flops()`` (the dense step's FLOPs) and
    ``peak_mem_mb``; wall time by pytest-benchmark; ``samples_per_s`` from its mean."""
    from lxmert_fast.metrics import bf16_peak_flops

    for _ in range(3 if mode == "compiled" else 1):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            step()
        end.record()
        end.synchronize()
        device_s = start.elapsed_time(end) / 1e3 / 20
        work = flops()
        peak = bf16_peak_flops(torch.device(device))
        benchmark.extra_info["device_ms"] = round(device_s * 1e3, 3)
        benchmark.extra_info["tflops"] = round(work / device_s / 1e12, 1)
        if peak:
            benchmark.extra_info["peak_pct"] = round(100 * work / device_s / peak, 2)
        benchmark.extra_info["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20

    def timed_step() -> None:
        step()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(timed_step, rounds=5 if device == "cpu" else 20, warmup_rounds=1)
    benchmark.extra_info["samples_per_s"] = batch_size / benchmark.stats.stats.mean
    benchmark.extra_info["cpu_threads"] = cpu_threads
