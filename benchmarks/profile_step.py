"""Profile one pre-training step, eager and captured: where the device time goes and how busy it is.

    python benchmarks/profile_step.py OUT_DIR [--size paper|tiny] [--batch B]

On CUDA (paper config, bf16 autocast, sparse heads, fused AdamW) it profiles one eager step and one
step of the model compiled with ``mode="reduce-overhead"`` (CUDA graphs) under ``torch.profiler``,
after warm-up, and writes for each: the top 25 kernels by device time, kernel launches per step,
and the GPU-busy fraction (union of kernel intervals over the step's wall time). Without CUDA it
profiles the tiny config's CPU ops instead, so a dry run exercises the script. Writes
``OUT_DIR/profile.json`` and ``OUT_DIR/profile.txt`` and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_pretrain_step import CONFIGS, build_step

from lxmert_fast.atomic import atomic_write_text

TOP = 25


def busy_fraction(intervals: list[tuple[float, float]], wall_us: float) -> float:
    """Union length of ``intervals`` (start, end) in µs over ``wall_us``."""
    busy, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        busy += stop - max(start, end)
        end = stop
    return busy / wall_us if wall_us > 0 else 0.0


def profile(step, cuda: bool) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with torch_profile(activities=activities) as prof:
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        wall_us = (time.perf_counter() - start) * 1e6
    events = prof.events()
    if cuda:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        spans = [(e.time_range.start, e.time_range.end) for e in kernels]
        totals: dict[str, float] = {}
        for e in kernels:
            totals[e.name] = totals.get(e.name, 0.0) + e.time_range.elapsed_us()
    else:
        kernels = [e for e in events if e.name.startswith("aten::") and e.cpu_parent is None]
        spans = [(e.time_range.start, e.time_range.end) for e in kernels]
        totals = {}
        for e in kernels:
            totals[e.name] = totals.get(e.name, 0.0) + e.time_range.elapsed_us()
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:TOP]
    return {
        "wall_ms": round(wall_us / 1e3, 3),
        "launches": len(kernels),
        "busy_fraction": round(busy_fraction(spans, wall_us), 4),
        "top": [{"name": n[:120], "us": round(t, 1)} for n, t in top],
    }


def profile_mode(mode: str, config: dict, size: str, device: str, cuda: bool) -> dict:
    """Warm up (compile, record the CUDA graphs) then profile one full step of ours."""
    step, _ = build_step(config, size, "ours", "compiled" if mode == "captured" else "eager", device)
    for _ in range(3):
        step()
    return profile(step, cuda)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir")
    parser.add_argument("--size", choices=("paper", "tiny"), default=None)
    parser.add_argument("--batch", type=int, default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    size = args.size or ("paper" if cuda else "tiny")
    size = "paper-b256" if size == "paper" else size
    config = dict(CONFIGS[size])
    if args.batch is not None:
        config["batch"] = args.batch
    results = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "size": size,
        "batch": config["batch"],
    }
    for mode in ("eager", "captured"):
        results[mode] = profile_mode(mode, config, size, device, cuda)
    os.makedirs(args.out_dir, exist_ok=True)
    atomic_write_text(os.path.join(args.out_dir, "profile.json"), json.dumps(results, indent=1))
    lines = [f"profile: {results['device']}, {size}, B={config['batch']}"]
    for mode in ("eager", "captured"):
        r = results[mode]
        lines.append(
            f"  {mode}: wall {r['wall_ms']} ms, {r['launches']} launches/step, busy {100 * r['busy_fraction']:.1f}%"
        )
        lines.extend(f"    {t['us']:>10.1f} us  {t['name']}" for t in r["top"][:10])
    text = "\n".join(lines)
    atomic_write_text(
        os.path.join(args.out_dir, "profile.txt"), text + "\n\nfull top-25 lists in profile.json\n"
    )
    print(text)


if __name__ == "__main__":
    main()
