"""The auto policy (issue #17 point 1): ``auto`` picks a fast path on a kind of device only where a
recorded measurement of the installed kernel shows it at least as fast as the reference, and the
recorded measurements are the ones benchmarks/RESULTS.md holds."""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

import lxmert_fast
from lxmert_fast import backend, ops

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
OPS = {
    ops.CROSS_ATTENTION,
    ops.SELF_ATTENTION,
    ops.RESIDUAL_LAYER_NORM,
    ops.VISUAL_EMBEDDING,
    ops.ROI_FEATURE_MASK,
}


def results_section(entry: str, commit: str) -> str:
    """The text of the RESULTS.md entry whose heading starts with ``entry`` and names ``commit``."""
    sections = re.split(r"^## ", RESULTS.read_text(encoding="utf-8"), flags=re.M)
    found = [s for s in sections if s.startswith(entry) and commit in s.splitlines()[0]]
    assert len(found) == 1, f"RESULTS.md: {len(found)} entries headed {entry!r} naming {commit}"
    return found[0]


@pytest.mark.parametrize("m", backend.MEASUREMENTS, ids=lambda m: f"{m.op}-{m.device_type}")
def test_each_measurement_is_the_one_recorded_in_results(m):
    assert m.op in OPS and m.device_type in ("cuda", "cpu") and m.rows and m.sources
    section = results_section(m.entry, m.commit)
    for row, baseline, ratio in m.rows:
        lines = [line for line in section.splitlines() if line.startswith(f"| {row} |")]
        assert len(lines) == 1, f"{row}: not in the RESULTS.md entry {m.entry} ({m.commit})"
        cell = lines[0].split("|")[3]
        assert f"{ratio:.2f} {baseline}" in cell, (
            f"{row}: RESULTS.md says {cell.strip()!r}, the table {ratio}"
        )


def test_one_measurement_per_op_and_device_kind():
    keys = [(m.op, m.device_type) for m in backend.MEASUREMENTS]
    assert len(keys) == len(set(keys))


@pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs the git history"
)
def test_recorded_kernel_versions_are_the_files_at_the_measured_commit():
    for m in backend.MEASUREMENTS:
        for path, blob in m.sources:
            found = subprocess.run(
                ["git", "rev-parse", f"{m.commit}:{path}"], cwd=ROOT, capture_output=True, text=True
            )
            if found.returncode != 0:
                pytest.skip(f"commit {m.commit} is not in this clone's history")
            assert found.stdout.strip() == blob, f"{m.op}/{m.device_type}: {path} at {m.commit}"


def test_blob_id_is_gits():
    assert backend.git_blob_id(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    assert backend.git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_auto_on_cuda_runs_the_reference_for_an_op_recorded_slower():
    # The residual+dropout+LayerNorm kernel measured 1.4-2.5x slower than the reference on the H200.
    use, why = backend.auto_decision(ops.RESIDUAL_LAYER_NORM, "cuda")
    assert not use and "slower" in why and "be8a23f" in why
    x = torch.randn(2, 3, 64)
    w, b = torch.ones(64), torch.zeros(64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a policy, not a fallback: no warning, nothing counted
        assert backend.choose(ops.RESIDUAL_LAYER_NORM, torch.device("cuda"), x, x, w, b, 1e-12, 0.1) is None
    assert not any(key.startswith(ops.RESIDUAL_LAYER_NORM) for key in backend.fallback_counts())


def fake_entry(ratio: float, sources: tuple = ()) -> backend.Measurement:
    return backend.Measurement("fake", "cuda", "test", "test", (("row", "ref", ratio),), sources)


@pytest.fixture
def fake_op(monkeypatch):
    monkeypatch.setitem(backend._fast_paths, "fake", backend.FastPath(lambda x: x + 1, lambda x: None))


@pytest.mark.parametrize(
    ("ratio", "source", "picked"),
    [(0.5, "current", True), (1.0, "current", True), (1.01, "current", False), (0.5, "changed", False),
     (0.5, "missing", False)],
)  # fmt: skip
def test_auto_follows_the_recorded_ratio_and_kernel_version(monkeypatch, fake_op, ratio, source, picked):
    path = "kernels/cross_attention.py"
    blob = {"current": backend.source_blob_id(path), "changed": "0" * 40, "missing": "0" * 40}[source]
    sources = ((path if source != "missing" else "kernels/no_such_kernel.py", blob),)
    monkeypatch.setattr(backend, "MEASUREMENTS", (fake_entry(ratio, sources),))
    chosen = backend.choose("fake", torch.device("cuda"), torch.zeros(2))
    assert (chosen is not None) == picked
    # Another kind of device is unmeasured: the reference.
    monkeypatch.setitem(backend._fast_paths, "fake", backend.FastPath(lambda x: x + 1, lambda x: None, True))
    assert backend.choose("fake", torch.device("cpu"), torch.zeros(2)) is None


def test_triton_backend_still_forces_every_fast_path(monkeypatch, fake_op):
    monkeypatch.setattr(backend, "MEASUREMENTS", (fake_entry(3.0),))
    with lxmert_fast.use_backend("triton"):
        assert backend.choose("fake", torch.device("cuda"), torch.zeros(2)) is not None
        assert backend.choose("fake", torch.device("cpu"), torch.zeros(2)) is not None


def test_policy_lists_every_registered_op():
    policy = backend.auto_policy()
    assert {op for op, _ in policy} == set(backend._fast_paths)
    for (op, dev), (use, why) in policy.items():
        assert isinstance(use, bool) and why, (op, dev)
