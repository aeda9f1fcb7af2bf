"""Which implementation of an op runs: the pure-PyTorch reference or a fast path.

Three backends:

* ``auto`` (default): the fast path for CUDA tensors when one is registered for the op and
  supports the case; otherwise the reference. A CUDA call that has to fall back warns once
  per (op, reason) and is counted (:func:`fallback_counts`, logged by train.py), so a
  slowdown on a GPU is never silent.
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
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

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
    else a short reason (shown in the fallback warning or the error). ``on_cpu``: ``auto``
    also picks it for CPU tensors (a compiled C++ op that is exact, not an interpreted kernel).
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
    if backend == "auto" and device.type != "cuda" and (fast is None or not fast.on_cpu):
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
