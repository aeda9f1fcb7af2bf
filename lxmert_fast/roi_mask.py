"""The C++/CUDA RoI-feature masking op (masked-object pre-training): loading, fake kernels, fast path.

Computes exactly :func:`lxmert_fast.reference.roi_feature_mask` with the random bits of
:func:`lxmert_fast.philox.philox_bits` at ``(seed, offset)``, in one pass, bit for bit, on CPU
(``at::parallel_for`` over rows) and CUDA (one block per row, 16-byte accesses where aligned).

Ops (namespace ``lxmert_fast``, defined in ``csrc/roi_mask.cpp``)::

    roi_feature_mask(Tensor features, int seed, int offset=0, float p_select=0.15,
                     float p_zero=0.8, float p_replace=0.1) -> (Tensor, Tensor)
    roi_feature_mask_(Tensor(a!) features, int seed, int offset=0, ...) -> Tensor

* ``features``: ``[B, N, D]``, contiguous, float32/float16/bfloat16/float64 (rows are moved
  as bytes, so every float format is exact). ``B * N < 2**31``.
* Returns (corrupted features, a new tensor of the same dtype; action int8 ``[B, N]``: 0
  unselected, 1 zeroed, 2 replaced, 3 kept). The in-place op returns the action only.
* Replaced rows read the ORIGINAL features of their source object in both variants: the
  in-place op first gathers the source rows into a small buffer ``[R, D]`` (R = replaced
  rows, about ``p_select * p_replace * B * N``), then writes. It moves only the selected rows.
* ``seed``: any value in ``[-2**63, 2**64)``, reduced to its 64 bits (as ``philox_bits``);
  ``offset``: the Philox counter of object 0, ``>= 0``; the next call advances it by ``B * N``.

No autograd: the RoI features are data, not trained. :func:`supports` sends a call whose
features require grad to the differentiable reference instead.

Loading: the ops live in the extension ``lxmert_fast._C`` that ``setup.py`` builds. When the
package was installed without it (a source tree on ``PYTHONPATH``, an editable install made
before ``csrc/`` existed, or a torch changed since the build), the first use JIT-builds
``csrc/`` with :func:`torch.utils.cpp_extension.load` (needs ninja and a C++ compiler, about a
minute) and logs that it does so, where, and why. The CUDA kernel is built when the toolchain
(``CUDA_HOME``) and the torch build (``torch.version.cuda``) both have CUDA.

Registered as the fast path of :data:`lxmert_fast.ops.ROI_FEATURE_MASK` with ``on_cpu=True``:
it is exact, so backend ``auto`` uses it on the CPU too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from lxmert_fast import ops
from lxmert_fast.backend import register_fast_path

Tensor = torch.Tensor

logger = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_OBJECTS = 2**31 - 1
OP = "lxmert_fast::roi_feature_mask"
INPLACE_OP = "lxmert_fast::roi_feature_mask_"
CSRC = Path(__file__).resolve().parent.parent / "csrc"
JIT_NAME = "lxmert_fast_roi_mask"


def _openmp_flags() -> list[str]:
    """``-fopenmp`` where torch itself runs on OpenMP: ``at::parallel_for`` is a header template
    that only runs in parallel when the extension is compiled with it."""
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    return []


def _ensure_ninja_on_path() -> None:
    """torch looks for ``ninja`` on PATH; the pip package puts it next to the interpreter,
    which is not on PATH when a venv's python is run without activating the venv."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _jit_build(why: str) -> None:
    from torch.utils import cpp_extension

    sources = [CSRC / "roi_mask.cpp"]
    with_cuda = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    if with_cuda:
        sources.append(CSRC / "cuda" / "roi_mask.cu")
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise RuntimeError(
            f"{why} and the sources to build it are missing ({', '.join(missing)}): "
            "reinstall with `pip install --no-build-isolation .` from the source tree to build it"
        )
    tag = re.sub(
        r"[^0-9A-Za-z]+", "_", f"py{sys.version_info[0]}{sys.version_info[1]}_torch{torch.__version__}"
    )
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    build_dir = Path(root) / f"{JIT_NAME}_{tag}"
    build_dir.mkdir(parents=True, exist_ok=True)
    logger.warning(
        "lxmert_fast: %s; JIT-building the C++%s RoI-masking op with torch.utils.cpp_extension.load "
        "in %s (about a minute the first time; later runs reuse the build). "
        "`pip install --no-build-isolation .` builds it ahead of time.",
        why,
        "/CUDA" if with_cuda else "",
        build_dir,
    )
    _ensure_ninja_on_path()
    openmp = _openmp_flags()
    cpp_extension.load(
        name=JIT_NAME,
        sources=[str(s) for s in sources],
        extra_cflags=["-O3", *openmp],
        extra_cuda_cflags=["-O3", *(f for flag in openmp for f in ("-Xcompiler", flag))],
        extra_ldflags=openmp,
        extra_include_paths=[str(CSRC)],
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        is_python_module=False,
    )


def _op_registered() -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CPU")
    except RuntimeError:
        return False


def _check_fake_args(features: Tensor, offset: int, p_select: float, p_zero: float, p_replace: float) -> None:
    """The checks of ``check_roi_mask_args`` (csrc/roi_mask.cpp) with its exception types, so that
    FakeTensor, meta tensors and torch.compile raise the ValueError/TypeError eager raises
    (``torch._check`` would raise RuntimeError)."""
    torch._check_value(
        features.dim() == 3,
        lambda: f"features: expected a 3-D tensor [B, N, D], got shape {list(features.shape)}",
    )
    torch._check_type(
        features.dtype in SUPPORTED_DTYPES,
        lambda: f"features: expected dtype float32, float16, bfloat16 or float64, got {features.dtype}",
    )
    torch._check_value(
        features.is_contiguous(),
        lambda: (
            "features: expected a contiguous tensor (call .contiguous()), "
            f"got shape {list(features.shape)} with strides {list(features.stride())}"
        ),
    )
    for name, p in (("p_select", p_select), ("p_zero", p_zero), ("p_replace", p_replace)):
        torch._check_value(
            0.0 <= p <= 1.0, lambda name=name, p=p: f"{name}: expected a probability in [0, 1], got {p}"
        )
    torch._check_value(
        p_zero + p_replace <= 1.0 + 1e-9,
        lambda: f"p_zero + p_replace: expected at most 1, got {p_zero} + {p_replace}",
    )
    torch._check_value(offset >= 0, lambda: f"offset: expected a non-negative Philox counter, got {offset}")


# Defaults as in the schema: callers (and torch.compile's normalisation) omit trailing defaults.
def _roi_feature_mask_fake(
    features: Tensor,
    seed: int,
    offset: int = 0,
    p_select: float = 0.15,
    p_zero: float = 0.8,
    p_replace: float = 0.1,
) -> tuple[Tensor, Tensor]:
    _check_fake_args(features, offset, p_select, p_zero, p_replace)
    action = features.new_empty(features.shape[:2], dtype=torch.int8)
    return torch.empty_like(features, memory_format=torch.contiguous_format), action


def _roi_feature_mask_inplace_fake(
    features: Tensor,
    seed: int,
    offset: int = 0,
    p_select: float = 0.15,
    p_zero: float = 0.8,
    p_replace: float = 0.1,
) -> Tensor:
    _check_fake_args(features, offset, p_select, p_zero, p_replace)
    return features.new_empty(features.shape[:2], dtype=torch.int8)


def _register_fakes() -> None:
    """Fake kernels for FakeTensor/torch.compile; torch.library needs the ops to exist first."""
    torch.library.register_fake(OP)(_roi_feature_mask_fake)
    torch.library.register_fake(INPLACE_OP)(_roi_feature_mask_inplace_fake)


def _import_or_build() -> str | None:
    if _op_registered():
        return None
    try:
        import lxmert_fast._C  # noqa: F401  (importing it registers the ops)
    except ImportError as exc:
        try:
            _jit_build(f"lxmert_fast._C could not be imported ({exc})")
        except Exception as build_exc:
            return f"the C++ extension could not be built ({type(build_exc).__name__}: {build_exc})"
    return None


# Plain globals (not functools.cache) so that torch.compile, tracing supports() or a wrapper,
# reads `_loaded` and skips the loader once the ops exist.
_loaded = False
_load_error: str | None = None


@torch.compiler.disable  # importing or building a library is not traceable: run it eagerly
def _load() -> str | None:
    """Make the ops available once (import ``lxmert_fast._C`` or JIT-build it); the error, or None."""
    global _loaded, _load_error
    if not _loaded:
        _load_error = _import_or_build()
        if _load_error is None:
            _register_fakes()
        _loaded = True
    return _load_error


def load_extension() -> None:
    """Load the compiled ops, building them on first use if needed; raise if that fails."""
    error = _load_error if _loaded else _load()
    if error is not None:
        raise RuntimeError(f"lxmert_fast: {error}")


def _seed_int64(seed: int) -> int:
    """The 64 bits of ``seed`` as the signed value the ``int`` schema argument carries."""
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed: expected a 64-bit value in [-2**63, 2**64), got {seed}")
    return seed - 2**64 if seed >= 2**63 else seed


def roi_feature_mask(
    features: Tensor,
    seed: int,
    offset: int = 0,
    p_select: float = 0.15,
    p_zero: float = 0.8,
    p_replace: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """The C++/CUDA op on ``features`` [B, N, D]: (corrupted copy, action int8 [B, N])."""
    load_extension()
    return torch.ops.lxmert_fast.roi_feature_mask(
        features, _seed_int64(seed), offset, p_select, p_zero, p_replace
    )


def roi_feature_mask_(
    features: Tensor,
    seed: int,
    offset: int = 0,
    p_select: float = 0.15,
    p_zero: float = 0.8,
    p_replace: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """In-place variant: corrupts ``features`` and returns (features, action int8 [B, N]).

    Same result as :func:`roi_feature_mask`, bit for bit: replaced rows read the original rows.
    """
    load_extension()
    action = torch.ops.lxmert_fast.roi_feature_mask_(
        features, _seed_int64(seed), offset, p_select, p_zero, p_replace
    )
    return features, action


def supports(
    features: Tensor, seed: int, offset: int, p_select: float, p_zero: float, p_replace: float
) -> str | None:
    """None when the C++/CUDA op can serve this dispatcher call, else the reason it cannot."""
    if features.device.type not in ("cpu", "cuda"):
        return f"the C++ op has no kernel for device {features.device.type}"
    if features.requires_grad and torch.is_grad_enabled():
        return "features require grad and the C++ op has no backward"
    error = _load_error if _loaded else _load()
    if error is not None:
        return error
    if features.device.type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CUDA"):
        return "lxmert_fast._C was built without CUDA (no CUDA toolchain or a CPU-only torch at build time)"
    if features.shape[0] * features.shape[1] > MAX_OBJECTS:
        return "B * N >= 2**31 objects"
    return None


def impl(
    features: Tensor, seed: int, offset: int, p_select: float, p_zero: float, p_replace: float
) -> tuple[Tensor, Tensor]:
    """Fast path of :func:`lxmert_fast.ops.roi_feature_mask` (arguments already checked there)."""
    return torch.ops.lxmert_fast.roi_feature_mask(
        features.contiguous(), _seed_int64(seed), offset, p_select, p_zero, p_replace
    )


# An installed extension registers everything at import; otherwise the first use builds it.
with contextlib.suppress(ImportError):
    import lxmert_fast._C  # noqa: F401
if _op_registered():
    _load()

register_fast_path(ops.ROI_FEATURE_MASK, impl, supports, on_cpu=True)
