"""Print a short table of pytest-benchmark JSON results; optionally merge them into one file.

Usage::

    python benchmarks/summarize.py RESULT.json [MORE.json ...] [--merge OUT.json] [--markdown]

One row per benchmark: its name, mean time in ms, the time ratio ours / baseline where the
same test has a baseline with the same other parameters (``impl`` fused|cpp|cpp_inplace|ours
against eager|reference|torch_reference|sdpa|transformers; below 1 means ours is faster),
and the throughput or memory numbers found in ``extra_info`` (``gb_per_s``, ``gpu_us``,
any ``peak*`` key, and ``ratio`` from an interleaved measurement). ``--markdown`` prints a
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


def ratios(bench: dict, by_key: dict[tuple, dict[str, dict]]) -> str:
    """``0.45 eager, 0.80 sdpa``: this benchmark's mean over each baseline's, if it is ours."""
    if (bench.get("params") or {}).get("impl") not in OURS:
        return ""
    siblings = by_key.get(_pair_key(bench), {})
    mean = bench["stats"]["mean"]
    parts = [
        f"{mean / siblings[impl]['stats']['mean']:.2f} {label}"
        for impl, label in BASELINES.items()
        if impl in siblings
    ]
    return ", ".join(parts)


def extras(info: dict) -> str:
    parts = []
    if "ratio" in info:
        parts.append(f"interleaved ratio {info['ratio']:.3f}")
    if info.get("gb_per_s") is not None:
        parts.append(f"{info['gb_per_s']:.1f} GB/s")
    if info.get("gpu_us") is not None:
        parts.append(f"gpu {info['gpu_us']:.1f} us")
    for key, value in info.items():
        if key.startswith("peak") and value is not None:
            parts.append(f"peak {value:.0f} MiB")
    return ", ".join(parts)


def rows(benchmarks: list[dict]) -> list[tuple[str, str, str, str]]:
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
        table.append(
            (
                name,
                f"{bench['stats']['mean'] * 1e3:.3f}",
                ratios(bench, by_key),
                extras(bench.get("extra_info") or {}),
            )
        )
    return table


HEADER = ("benchmark", "mean ms", "ours/baseline", "extra_info")


def format_text(table: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in [HEADER, *table]) for i in range(len(HEADER))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in [HEADER, *table]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def format_markdown(table: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
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
