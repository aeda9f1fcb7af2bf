"""Which implementation of an op runs: the pure-PyTorch reference or a fast path.

Three backends:

* ``auto`` (default): the fast path of an op only on a kind of device (``cuda``, ``cpu``) where
  a recorded measurement (:data:`MEASUREMENTS`, each entry an entry of benchmarks/RESULTS.md)
  shows it at least as fast as the reference, of the kernel source that is installed now
  (see :func:`auto_decision`), and only when it supports the case; otherwise the reference.
  A call the policy allows but the kernel cannot serve warns once per (op, reason) and is
  counted (:func:`fallback_counts`, logged by train.py), so a slowdown is never silent.
* ``reference``: always the reference.
* ``triton``: always the fast path, also for CPU tensors (run the Triton kernels under
  ``TRITON_INTERPRET=1``). A case the fast path cannot serve raises
  :class:`BackendUnavailableError` instead of falling back: asking for a kernel and silently
  not getting it would make every parity test pass vacuously. An op registered as
  ``optional`` whose fast path is missing runs the reference (self-attention's fast path is
  torch's SDPA, :mod:`lxmert_fast.sdpa`, which serves CPU tensors too).

Chosen by the environment variable ``LXMERT_FAST_BACKEND`` at import time and overridden,
per thread and per context, by ``with lxmert_fast.use_backend(name):``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

BACKENDS = ("auto", "reference", "triton")
ENV_VAR = "LXMERT_FAST_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The ``triton`` backend was forced for a case its kernels cannot serve."""


def _validate(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def _from_env() -> str:
    return _validate(
        os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", f"environment variable {ENV_VAR}"
    )


_DEFAULT_BACKEND = _from_env()
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("lxmert_fast_backend", default=None)


# torch.compile cannot trace a ContextVar read: it takes the backend as a constant of the graph
# it traces (a later switch applies to graphs traced after it, e.g. after torch._dynamo.reset()).
@torch.compiler.assume_constant_result
def current_backend() -> str:
    """The backend in force for this thread/context: ``auto``, ``reference`` or ``triton``."""
    return _current.get() or _DEFAULT_BACKEND


def set_backend(name: str) -> None:
    """Set the backend for the current context (prefer :func:`use_backend` where a scope exists)."""
    _current.set(_validate(name, "set_backend(name)"))


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed block with backend ``name`` (``auto``, ``reference`` or ``triton``)."""
    token = _current.set(_validate(name, "use_backend(name)"))
    try:
        yield
    finally:
        _current.reset(token)


@dataclass(frozen=True)
class FastPath:
    """A fast implementation of one op.

    ``supports(*args, **kwargs)`` returns ``None`` when the implementation can serve the call,
    else a short reason (shown in the fallback warning or the error). ``on_cpu``: it can serve
    CPU tensors outside the Triton interpreter (a compiled C++ op), so ``auto`` may pick it there
    where :data:`MEASUREMENTS` allows.
    """

    impl: Callable
    supports: Callable[..., str | None]
    on_cpu: bool = False


_fast_paths: dict[str, FastPath] = {}
_warned: set[str] = set()
_fallbacks: dict[str, int] = {}


def register_fast_path(
    op: str, impl: Callable, supports: Callable[..., str | None], *, on_cpu: bool = False
) -> None:
    """Register ``impl`` as the fast path of ``op``; the dispatcher alone decides when it runs."""
    _fast_paths[op] = FastPath(impl, supports, on_cpu)


def fast_path_of(op: str) -> FastPath | None:
    return _fast_paths.get(op)


def choose(op: str, device: torch.device, *args, optional: bool = False, **kwargs) -> Callable | None:
    """The fast implementation to run for this call of ``op``, or ``None`` for the reference.

    ``optional``: the op has no kernel of its own by design (it is GEMM/SDPA-bound), so
    with none registered it runs the reference under every backend, ``triton`` included.
    """
    backend = current_backend()
    if backend == "reference":
        return None
    fast = _fast_paths.get(op)
    if fast is None and optional:
        return None
    if backend == "auto":
        if device.type != "cuda" and (fast is None or not fast.on_cpu):
            return None
        if fast is not None and not _auto_allows(op, device.type):
            return None
    reason = "no fast path is registered for it" if fast is None else fast.supports(*args, **kwargs)
    if reason is None:
        return fast.impl
    if backend == "triton":
        raise BackendUnavailableError(
            f"{op}: the triton backend cannot serve this call: {reason}. "
            f"Use backend 'auto' to fall back to the reference."
        )
    _record_fallback(op, device.type, reason)
    return None


# Called with constants only, so torch.compile runs it while tracing instead of breaking the graph
# on the warning: a compiled step counts each fallback once per trace, an eager one once per call.
@torch.compiler.assume_constant_result
def _record_fallback(op: str, device_type: str, reason: str) -> bool:
    key = f"{op}: {reason}"
    _fallbacks[key] = _fallbacks.get(key, 0) + 1
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"{op}: using the PyTorch reference on {device_type}: {reason}", RuntimeWarning, stacklevel=4
        )
    return True


def fallback_counts() -> dict[str, int]:
    """How often ``auto`` fell back to the reference on an accelerator, per ``"op: reason"``, since
    the last :func:`reset_fallback_counts` (train.py logs them). Compiled code counts per trace."""
    return dict(_fallbacks)


def reset_fallback_counts() -> None:
    _fallbacks.clear()


# ---------------------------------------------------------------------------------------------
# The auto policy: which fast paths ``auto`` may pick, from recorded measurements only.


@dataclass(frozen=True)
class Measurement:
    """A benchmark of one op's fast path against the reference on one kind of device.

    ``entry``: the start of the benchmarks/RESULTS.md heading (after ``## ``) of the run, whose
    heading also names ``commit``. ``rows``: (benchmark row as printed there, baseline column,
    ours/baseline ratio as printed); the baseline is the reference ``auto`` runs otherwise.
    ``sources``: (path in the repository, git blob id of that file at ``commit``): the kernel
    version measured. ``auto`` trusts the measurement only while every source is that blob
    (``git rev-parse COMMIT:PATH``); a kernel changed since counts as unmeasured.
    """

    op: str
    device_type: str
    entry: str
    commit: str
    rows: tuple[tuple[str, str, float], ...]
    sources: tuple[tuple[str, str], ...]

    @property
    def at_least_as_fast(self) -> bool:
        return all(ratio <= 1.0 for _, _, ratio in self.rows)


_H200 = "2026-11-27, GPU: NVIDIA H200"
_ROI_SOURCES = (
    ("csrc/roi_mask_kernel.h", "76aeea065b76042c9b3746fd35a712228c956979"),
    ("csrc/philox.h", "513316d62a5d35278572191607e50eccd26d6ab3"),
    ("lxmert_fast/roi_mask.py", "fc55bb0ab3ab2869ee18976c1a1108b51ff52fa3"),
)

# One entry per (op, device kind): the newest measurement. Update an entry (rows, commit,
# blob ids: :func:`print_auto_policy` prints the installed ones) only together with the
# RESULTS.md entry it cites; tests/test_backend_policy.py checks the two agree.
MEASUREMENTS: tuple[Measurement, ...] = (
    Measurement(
        "bidirectional_cross_attention", "cuda", _H200, "be8a23f",
        (
            ("cross_attention: cross_attention[256-fused-forward]", "ref", 0.30),
            ("cross_attention: cross_attention[256-fused-forward_backward]", "ref", 0.31),
            ("cross_attention: cross_attention[32-fused-forward]", "ref", 0.20),
            ("cross_attention: cross_attention[32-fused-forward_backward]", "ref", 0.23),
        ),
        (("kernels/cross_attention.py", "0378c3ed610d0c333dfb4b9f8881d5266d49f20a"),),
    ),
    Measurement(
        "residual_dropout_layer_norm", "cuda", _H200, "be8a23f",
        (
            ("residual_layer_norm: residual_layer_norm[fused-256-forward]", "eager", 1.39),
            ("residual_layer_norm: residual_layer_norm[fused-256-forward_backward]", "eager", 2.07),
            ("residual_layer_norm: residual_layer_norm[fused-256-inference]", "eager", 1.50),
            ("residual_layer_norm: residual_layer_norm[fused-32-forward]", "eager", 2.37),
            ("residual_layer_norm: residual_layer_norm[fused-32-forward_backward]", "eager", 2.52),
            ("residual_layer_norm: residual_layer_norm[fused-32-inference]", "eager", 2.16),
        ),
        (("kernels/residual_layer_norm.py", "32cbe2bc76bd48acf4c71cb77a936fbd6a641806"),),
    ),
    Measurement(
        "visual_embedding", "cuda", _H200, "be8a23f",
        (
            ("visual_embedding: visual_embedding_fwd_bwd[fused-256]", "eager", 1.02),
            ("visual_embedding: visual_embedding_fwd_bwd[fused-32]", "eager", 1.12),
        ),
        (("kernels/visual_embedding.py", "45c64fca5978402b48f5dd1b59f2a8f651ff9285"),),
    ),
    Measurement(
        "roi_feature_mask", "cuda", _H200, "be8a23f",
        (("roi_mask: roi_mask[cuda-cpp]", "eager", 0.02),),
        (("csrc/cuda/roi_mask.cu", "eea5968f2ba31a1e87392ebf141e899e3d6a3985"), *_ROI_SOURCES),
    ),
    # The CPU rows of the same run (the H200 machine's 16 cores).
    Measurement(
        "roi_feature_mask", "cpu", _H200, "be8a23f",
        (("roi_mask: roi_mask[cpu-cpp]", "eager", 0.16),),
        (("csrc/roi_mask.cpp", "07d259db07dbf46af91a881e0e869bc246259c7d"), *_ROI_SOURCES),
    ),
)  # fmt: skip

_PACKAGE = Path(__file__).resolve().parent


def git_blob_id(data: bytes) -> str:
    """The id git gives a file with these bytes (``git hash-object``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@functools.cache
def source_blob_id(path: str) -> str | None:
    """The git blob id of the installed file that was ``path`` in the repository, or None if it is
    not here (e.g. ``csrc/`` in a wheel; the Triton kernels install as ``lxmert_fast/kernels``)."""
    candidates = [_PACKAGE.parent / path]
    if path.startswith("kernels/"):
        candidates.append(_PACKAGE / path)
    for candidate in candidates:
        if candidate.is_file():
            return git_blob_id(candidate.read_bytes())
    return None


def auto_decision(op: str, device_type: str) -> tuple[bool, str]:
    """Whether ``auto`` may run the fast path of ``op`` on ``device_type``, and why.

    Yes only when :data:`MEASUREMENTS` holds a measurement of that op on that kind of device,
    every row of it at least as fast as the reference (ratio <= 1), and the kernel sources are
    the ones measured. Unmeasured (no entry, a source changed since, or not found) means no:
    the reference is known, a kernel that has not been timed is not known to help.
    """
    found = [m for m in MEASUREMENTS if m.op == op and m.device_type == device_type]
    if not found:
        return False, f"no measurement of {op} on {device_type}"
    m = found[-1]
    ratios = [ratio for _, _, ratio in m.rows]
    where = f"{m.entry} at {m.commit}"
    if not m.at_least_as_fast:
        return False, f"measured slower than the reference ({min(ratios):.2f}-{max(ratios):.2f}x) on {where}"
    changed = [path for path, blob in m.sources if source_blob_id(path) != blob]
    if changed:
        return False, f"{', '.join(changed)} changed since (or missing): unmeasured since {where}"
    return True, f"measured {min(ratios):.2f}-{max(ratios):.2f}x the reference's time on {where}"


# Constant arguments only, so torch.compile evaluates it while tracing (no file reads in a graph).
@torch.compiler.assume_constant_result
def _auto_allows(op: str, device_type: str) -> bool:
    return auto_decision(op, device_type)[0]


def auto_policy() -> dict[tuple[str, str], tuple[bool, str]]:
    """:func:`auto_decision` for every registered op on ``cuda`` and ``cpu``."""
    return {(op, dev): auto_decision(op, dev) for op in sorted(_fast_paths) for dev in ("cuda", "cpu")}


def print_auto_policy() -> None:
    """Print :func:`auto_policy` and the installed kernel sources' blob ids (for a new
    :data:`MEASUREMENTS` entry): ``python -c "import lxmert_fast; lxmert_fast.backend.print_auto_policy()"``."""
    for (op, dev), (use, why) in auto_policy().items():
        print(f"{op:30s} {dev:5s} {'fast path' if use else 'reference':9s} {why}")
    print("installed kernel sources (git blob ids):")
    for path in sorted({p for m in MEASUREMENTS for p, _ in m.sources}):
        print(f"  {path}: {source_blob_id(path)}")
