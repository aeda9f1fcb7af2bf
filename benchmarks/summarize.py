"""Print a short table of pytest-benchmark JSON results; optionally merge them into one file.

Usage::

    python benchmarks/summarize.py RESULT.json [MORE.json ...] [--merge OUT.json] [--markdown]

One row per benchmark: its name, mean (wall) time in ms, the time ratio ours / baseline where
the same test has a baseline with the same other parameters (``impl`` fused|cpp|cpp_inplace|ours
against eager|reference|torch_reference|sdpa|transformers; below 1 means ours is faster),
and the throughput or memory numbers found in ``extra_info`` (``gb_per_s``, ``gpu_us``,
any ``peak*`` key, ``ratio`` from an interleaved measurement, and ``fused_over_gemms``: a fused
step's device time over that of the GEMMs it must run, its bound). When any result carries the
device time of benchmarks/conftest.py's ``device_time`` fixture, three more columns: ``device
ms``, the ratio ours / baseline in device time, and ``% clone`` (the op's bandwidth as a share of
a ``clone()`` of the same bytes in the same run, with its GB/s). ``--markdown`` prints a
Markdown table for ``benchmarks/RESULTS.md``. Exit status 1 when no results were found.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OURS = ("fused", "cpp", "cpp_inplace", "ours")
# Short labels of the baselines, in the order their ratios are listed.
BASELINES = {
    "transformers": "hf",
    "eager": "eager",
    "torch_reference": "eager",
    "reference": "ref",
    "sdpa": "sdpa",
}


def load(paths: list[Path]) -> tuple[list[dict], list[dict]]:
    """(benchmarks, the parsed files) of every readable file; unreadable ones are reported."""
    benchmarks, files = [], []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"summarize: skipping {path}: {exc}", file=sys.stderr)
            continue
        files.append(data)
        benchmarks.extend(data.get("benchmarks", []))
    return benchmarks, files


def _pair_key(bench: dict) -> tuple:
    params = {k: v for k, v in (bench.get("params") or {}).items() if k != "impl"}
    return bench["fullname"].split("[")[0], tuple(sorted((k, str(v)) for k, v in params.items()))


def _wall(bench: dict) -> float | None:
    return bench["stats"]["mean"]


def _device(bench: dict) -> float | None:
    return (bench.get("extra_info") or {}).get("device_ms")


def ratios(bench: dict, by_key: dict[tuple, dict[str, dict]], time=_wall) -> str:
    """``0.45 eager, 0.80 sdpa``: this benchmark's ``time`` (wall mean by default) over each
    baseline's, if it is ours and both times are known."""
    if (bench.get("params") or {}).get("impl") not in OURS or not time(bench):
        return ""
    siblings = by_key.get(_pair_key(bench), {})
    parts = [
        f"{time(bench) / time(siblings[impl]):.2f} {label}"
        for impl, label in BASELINES.items()
        if impl in siblings and time(siblings[impl])
    ]
    return ", ".join(parts)


def clone_share(info: dict) -> str:
    """``93.1% (2785 GB/s)``: the op's bandwidth as a share of the same run's clone()."""
    if info.get("pct_of_clone") is None:
        return ""
    return f"{info['pct_of_clone']:.1f}% ({info['gbps']:.0f} GB/s)"


def extras(info: dict) -> str:
    parts = []
    if "ratio" in info:
        parts.append(f"interleaved ratio {info['ratio']:.3f}")
    if info.get("gb_per_s") is not None:
        parts.append(f"{info['gb_per_s']:.1f} GB/s")
    if info.get("gpu_us") is not None:
        parts.append(f"gpu {info['gpu_us']:.1f} us")
    if info.get("fused_over_gemms") is not None:
        parts.append(
            f"fused {info['fused_device_ms']:.4f} ms = {info['fused_over_gemms']:.2f}x its GEMMs (device)"
        )
    for key, value in info.items():
        if key.startswith("peak") and value is not None:
            parts.append(f"peak {value:.0f} MiB")
    return ", ".join(parts)


def rows(benchmarks: list[dict]) -> list[tuple[str, ...]]:
    """The table's rows; the device-time columns only when some result has ``device_ms``."""
    with_device = any(_device(bench) is not None for bench in benchmarks)
    by_key: dict[tuple, dict[str, dict]] = {}
    for bench in benchmarks:
        impl = (bench.get("params") or {}).get("impl")
        if impl is not None:
            by_key.setdefault(_pair_key(bench), {})[impl] = bench
    table = []
    for bench in sorted(
        benchmarks, key=lambda b: (b["fullname"].split("::")[0], b.get("group") or "", b["name"])
    ):
        file = Path(bench["fullname"].split("::")[0]).stem.removeprefix("bench_")
        name = f"{file}: {bench['name'].removeprefix('test_')}"
        info = bench.get("extra_info") or {}
        row = (name, f"{bench['stats']['mean'] * 1e3:.3f}", ratios(bench, by_key))
        if with_device:
            device = _device(bench)
            row += (
                "" if device is None else f"{device:.4f}",
                ratios(bench, by_key, _device),
                clone_share(info),
            )
        table.append((*row, extras(info)))
    return table


HEADER = ("benchmark", "mean ms", "ours/baseline", "extra_info")
DEVICE_HEADER = (*HEADER[:3], "device ms", "ours/baseline (device)", "% clone", HEADER[3])


def _header(table: list[tuple[str, ...]]) -> tuple[str, ...]:
    return DEVICE_HEADER if table and len(table[0]) == len(DEVICE_HEADER) else HEADER


def format_text(table: list[tuple[str, ...]]) -> str:
    header = _header(table)
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in [header, *table]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def format_markdown(table: list[tuple[str, ...]]) -> str:
    header = _header(table)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark --benchmark-json files")
    parser.add_argument("--merge", type=Path, help="also write all benchmarks into this one JSON file")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)

    benchmarks, files = load(args.json)
    if args.merge is not None and files:
        merged = {**files[0], "benchmarks": benchmarks}
        args.merge.write_text(json.dumps(merged, indent=2))
    if not benchmarks:
        print("summarize: no benchmark results (every case skipped or failed)")
        return 1
    table = rows(benchmarks)
    print(format_markdown(table) if args.markdown else format_text(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
