"""Ahead-of-time compilation of kernel variants for the H100 (sm_90), without a GPU.

Each kernel module lists, in ``sm90_variants()``, every specialisation the dispatcher can
launch (dtypes, block sizes, constexpr switches). :func:`compile_variant` builds one of
them to PTX and a cubin with ``triton.compile(..., target=GPUTarget("cuda", 90, 32))``,
which catches what the interpreter lets through (unsupported ops, type errors, shared
memory overflow) on a machine with no GPU. Must run in a process where
``TRITON_INTERPRET`` is unset: the interpreter replaces ``@triton.jit`` functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

H100_SHARED_MEMORY_BYTES = 232448  # opt-in maximum per block on sm_90


@dataclass(frozen=True)
class KernelVariant:
    """One launchable specialisation: ``signature`` maps argument names to Triton types
    (``"*fp32"``, ``"i32"``, ``"fp32"``, ``"constexpr"``); ``constexprs`` gives their values."""

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2


def compile_variant(variant: KernelVariant) -> dict[str, Any]:
    """Compile ``variant`` for sm_90; returns its shared-memory bytes and register count."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(variant.fn, variant.signature, variant.constexprs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": variant.num_warps, "num_stages": variant.num_stages},
    )
    shared = int(compiled.metadata.shared)
    if shared > H100_SHARED_MEMORY_BYTES:
        raise RuntimeError(
            f"{variant.name}: needs {shared} bytes of shared memory, sm_90 has {H100_SHARED_MEMORY_BYTES}"
        )
    return {"name": variant.name, "shared_bytes": shared, "has_cubin": "cubin" in compiled.asm}
