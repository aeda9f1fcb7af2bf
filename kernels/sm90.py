"""Ahead-of-time compilation of kernel variants for the H100/H200 (sm_90), without a GPU.

Each kernel module lists, in ``sm90_variants()``, every specialisation the dispatcher can
launch, each with the arguments its launcher passes at a representative shape (LXMERT
pre-training, the constants below). :func:`compile_variant` builds one of them to PTX and a
cubin for ``GPUTarget("cuda", 90, 32)``, which catches what the interpreter lets through
(unsupported ops, type errors) on a machine with no GPU, and reports the registers, the
spilled (local-memory) words and the shared memory of the code the card runs.

Compile what runs: a launch ``kernel[grid](*args)`` does not compile the bare signature. Its
binder specialises the arguments first: a pointer whose address is a multiple of 16, and an
int divisible by 16, get ``tt.divisibility = 16`` (which is what lets the compiler emit
16-byte loads); an int equal to 1 becomes a constexpr; a ``do_not_specialize`` argument gets
nothing; and the launch options take the backend's defaults (``num_stages`` included).
:func:`specialise` runs the same binder — triton's ``create_function_from_signature`` built for
the kernel's own parameters and the sm_90 backend, the code ``JITFunction.run`` calls on every
launch — on the variant's arguments, so the compile check and the runtime cannot disagree on
what they compile. Its ``key`` is what ``JITFunction.run`` keys its kernel cache on: two calls
with the same key share one compiled kernel (tests/test_kernel_specialisation.py uses it to
show that per-call seeds and offsets never trigger a compile).

Must run in a process where ``TRITON_INTERPRET`` is unset: the interpreter replaces
``@triton.jit`` functions.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any

H100_SHARED_MEMORY_BYTES = 232448  # opt-in maximum per block on sm_90
H100_SMS = 132  # H100 SXM and H200: the launchers size persistent grids by it

# The shapes the variants are specialised for: LXMERT pre-training (DESIGN.md §8).
BATCH = 256
WORDS = 20
BOXES = 36
HIDDEN = 768
HEADS = 12
POS_DIM = 4
DROPOUT_P = 0.1


@dataclass(frozen=True)
class KernelVariant:
    """One launchable specialisation and what its launcher passes.

    ``args`` holds every kernel argument by name, constexprs included, with the value the
    launcher passes at the representative shape; a ``torch.dtype`` stands for a tensor of that
    dtype at a 16-byte-aligned address (as every fresh torch allocation is). ``options`` holds
    the launch options the launcher passes (``num_warps``); the rest take triton's defaults,
    as they do at runtime.
    """

    name: str
    fn: Any
    args: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Specialisation:
    """What a launch with given arguments compiles: its cache ``key``, the ``signature``
    (argument types), ``constexprs``, ``attrs`` (``tt.divisibility`` hints) and ``options``."""

    key: str
    signature: dict[str, str]
    constexprs: dict[tuple[int, ...], Any]
    attrs: dict[tuple[int, ...], list]
    options: Any


def _target():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", 90, 32)


def specialise(fn: Any, args: dict[str, Any], options: dict[str, Any] | None = None) -> Specialisation:
    """Specialise ``fn`` for ``args`` exactly as a launch on an sm_90 card would, without one."""
    from triton import knobs
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    backend = make_backend(_target())
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {name: MockTensor.wrap_dtype(value) for name, value in args.items()}
    kwargs.update(options or {})
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug  # as JITFunction.run
    bound_args, specialization, extra_options = binder(**kwargs)
    # Packed as JITFunction.run packs them (inline in older releases, ``_pack_args`` in 3.9).
    names = [param.name for param in fn.params]
    signature = {name: spec[0] for name, spec in zip(names, specialization, strict=True)}
    values = list(bound_args.values())
    constexprs = {(i,): values[i] for i, spec in enumerate(specialization) if spec[0] == "constexpr"}
    attrs = {
        (i,): backend.parse_attr(spec[1])
        for i, spec in enumerate(specialization)
        if spec[0] != "constexpr" and isinstance(spec[1], str)
    }
    return Specialisation(
        # JITFunction.run's cache key (3.9 first replaces JIT-function arguments by their hash).
        key=str(specialization) + str(extra_options),
        signature=signature,
        constexprs=constexprs,
        attrs=attrs,
        options=backend.parse_options(kwargs),
    )


def _resource_usage(cubin: bytes, kernel: str) -> dict[str, int]:
    """REG/STACK/SHARED/LOCAL of ``kernel`` in ``cubin``, read by the cuobjdump triton ships.

    The driver needs a GPU to report ``n_regs``/``n_spills``; this reads the same numbers from
    the cubin: registers per thread, and local memory per thread (stack frame plus local), of
    which triton's ``n_spills`` is the count of 4-byte words.
    """
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    match = re.search(rf"Function {re.escape(kernel)}:\s*\n\s*(.*)", report)
    if match is None:
        raise RuntimeError(f"cuobjdump reports no function {kernel}:\n{report}")
    return {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", match.group(1))}


def compile_variant(variant: KernelVariant) -> dict[str, Any]:
    """Compile ``variant`` for sm_90 as its launcher would; returns its resource use."""
    import triton
    from triton.compiler import ASTSource

    spec = specialise(variant.fn, variant.args, variant.options)
    src = ASTSource(variant.fn, spec.signature, spec.constexprs, spec.attrs)
    compiled = triton.compile(src, target=_target(), options=spec.options.__dict__)
    usage = _resource_usage(compiled.asm["cubin"], compiled.metadata.name)
    local_bytes = usage["STACK"] + usage["LOCAL"]
    return {
        "name": variant.name,
        "regs": usage["REG"],
        "spills": local_bytes // 4,
        "shared_bytes": int(compiled.metadata.shared),
        "num_warps": spec.options.num_warps,
        "num_stages": spec.options.num_stages,
        "aligned_args": sum(1 for hints in spec.attrs.values() if hints),
    }
