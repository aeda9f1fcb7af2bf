"""The backend switch: environment variable, context manager, fallback and forced kernels."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
from lxmert_testing import allow_auto

import lxmert_fast
from lxmert_fast import backend, ops


def test_default_is_auto_and_context_manager_nests():
    assert lxmert_fast.current_backend() == os.environ.get("LXMERT_FAST_BACKEND", "auto")
    with lxmert_fast.use_backend("reference"):
        assert lxmert_fast.current_backend() == "reference"
        with lxmert_fast.use_backend("triton"):
            assert lxmert_fast.current_backend() == "triton"
        assert lxmert_fast.current_backend() == "reference"


def test_unknown_backend_names_the_source():
    with (
        pytest.raises(ValueError, match=r"use_backend\(name\): unknown backend 'cuda'"),
        lxmert_fast.use_backend("cuda"),
    ):
        pass
    script = "import lxmert_fast"
    env = dict(os.environ, LXMERT_FAST_BACKEND="fast")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "LXMERT_FAST_BACKEND" in proc.stderr


def test_environment_variable_selects_the_backend():
    script = "import lxmert_fast; print(lxmert_fast.current_backend())"
    env = dict(os.environ, LXMERT_FAST_BACKEND="Reference")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "reference"


@pytest.fixture
def fake_op(monkeypatch):
    """A registered fast path that serves only even-sized inputs, with a call counter."""
    calls = []

    def impl(x):
        calls.append(x)
        return x + 1

    def supports(x):
        return None if x.shape[0] % 2 == 0 else "odd sizes are not supported"

    monkeypatch.setitem(backend._fast_paths, "fake", backend.FastPath(impl, supports))
    allow_auto(monkeypatch, "fake", "cuda")
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.setattr(backend, "_fallbacks", {})
    return calls


def test_auto_uses_the_reference_for_cpu_tensors(fake_op):
    assert backend.choose("fake", torch.device("cpu"), torch.zeros(2)) is None


def test_auto_on_cuda_falls_back_with_one_warning(fake_op):
    cuda = torch.device("cuda")
    assert backend.choose("fake", cuda, torch.zeros(2)) is not None
    with pytest.warns(RuntimeWarning, match="odd sizes are not supported"):
        assert backend.choose("fake", cuda, torch.zeros(3)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.choose("fake", cuda, torch.zeros(5)) is None
    assert backend.fallback_counts() == {"fake: odd sizes are not supported": 2}
    backend.reset_fallback_counts()
    assert backend.fallback_counts() == {}


def test_a_traced_fallback_is_counted_without_a_graph_break(fake_op):
    def pick(x):
        return x * 2 if backend.choose("fake", torch.device("cuda"), x) is None else x

    compiled = torch.compile(pick, backend="eager", fullgraph=True)
    with pytest.warns(RuntimeWarning, match="odd sizes"):
        assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 2.0))
    assert backend.fallback_counts() == {"fake: odd sizes are not supported": 1}


def test_triton_forces_the_fast_path_or_raises(fake_op):
    with lxmert_fast.use_backend("triton"):
        assert backend.choose("fake", torch.device("cpu"), torch.zeros(2)) is not None
        with pytest.raises(lxmert_fast.BackendUnavailableError, match=r"fake: .*odd sizes"):
            backend.choose("fake", torch.device("cpu"), torch.zeros(3))
        with pytest.raises(lxmert_fast.BackendUnavailableError, match="no fast path is registered"):
            backend.choose("missing", torch.device("cpu"), torch.zeros(2))
        assert backend.choose("missing", torch.device("cpu"), torch.zeros(2), optional=True) is None


def test_reference_backend_never_calls_a_fast_path(fake_op):
    with lxmert_fast.use_backend("reference"):
        assert backend.choose("fake", torch.device("cuda"), torch.zeros(2)) is None
    assert not fake_op


def test_dispatcher_reference_and_auto_agree_on_cpu():
    qkv = torch.randn(2, 9, 3 * 64)
    with lxmert_fast.use_backend("reference"):
        ref, _ = ops.bidirectional_cross_attention(qkv, 4, 2, None, None)
    auto, _ = ops.bidirectional_cross_attention(qkv, 4, 2, None, None)
    assert torch.equal(ref, auto)


def test_source_tree_without_install_serves_the_triton_kernels(tmp_path):
    # PYTHONPATH=<a copy of the source tree>, with the editable install's finder removed: the
    # top-level kernels/ must still import as lxmert_fast.kernels and register its fast paths.
    pytest.importorskip("triton")
    import shutil
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    for name in ("lxmert_fast", "kernels"):
        shutil.copytree(repo / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    script = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
        "sys.path[:] = [p for p in sys.path if '__editable__' not in p]\n"
        "import lxmert_fast, lxmert_fast.kernels.cross_attention as k\n"
        "print(lxmert_fast.__file__)\nprint(k.__file__)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path), TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    package, kernel = result.stdout.split()
    assert package == str(tmp_path / "lxmert_fast" / "__init__.py")
    assert kernel == str(tmp_path / "kernels" / "cross_attention.py")
