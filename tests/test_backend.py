"""The backend switch: environment variable, context manager, fallback and forced kernels."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

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
