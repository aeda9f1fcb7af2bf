"""No recompiles in the middle of training: a kernel compiled once serves every dropout seed and
Philox offset.

Triton keys its cache of compiled kernels on how a launch specialises its arguments: an int
divisible by 16 gets a divisibility hint, an int equal to 1 becomes a constexpr, so an integer
that changes from call to call at fixed shapes would compile a new kernel at random steps unless
the kernel lists it in ``do_not_specialize``. The dropout seed is no host integer at all: every
kernel loads it from a device tensor (``seed_ptr``, drawn on the device), so no seed value can
reach the specialisation; a kernel that still takes an integer ``seed`` fails this test. The
Philox offset stays an integer and must be ``do_not_specialize``. Shapes, strides and the dropout
threshold (fixed by p) are fine to specialise: they do not change between steps.

Method, without a GPU: ``lxmert_fast.kernels.sm90.specialise`` computes a launch's cache key with
the kernel's own launch binder for the sm_90 backend (triton's ``create_function_from_signature``,
the code ``JITFunction.run`` runs before it looks up its cache), from the arguments the launcher
passes (each kernel module's ``sm90_variants()``). For every launched kernel of the three kernel
modules, offsets 0, 1, 16, 17, 2**20 must give one key. As a control, changing a specialised
integer argument from 768 to 769 must change the key, which shows the comparison sees
specialisation. Removing the offset from a kernel's ``do_not_specialize`` makes this test fail
(checked when it was written). It runs in a subprocess because this session has
``TRITON_INTERPRET=1`` set, under which ``@triton.jit`` functions are interpreted and have no
compile cache.

On a GPU (no interpreter) a second test counts the entries of the real cache,
``JITFunction.device_caches[device][0]``, while warming a kernel up with those offsets.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

MODULES = ("cross_attention", "residual_layer_norm", "visual_embedding")
# Integer arguments that change from call to call at fixed shapes.
PER_CALL = ("offset", "drop_offset")
OFFSETS = (0, 1, 16, 17, 2**20)

SCRIPT = textwrap.dedent(
    """
    import importlib, json, re, sys

    from triton.runtime.jit import JITFunction

    from lxmert_fast.kernels.sm90 import specialise

    modules, per_call, offsets = json.loads(sys.argv[1])
    problems, checked = [], []

    def launched_kernels(module):
        # A kernel is a JITFunction of the module that no other JITFunction of it calls.
        jitted = {n: f for n, f in vars(module).items() if isinstance(f, JITFunction) and f.__module__ == module.__name__}
        called = {n for n in jitted for f in jitted.values() if f is not jitted[n] and re.search(rf"\\b{n}\\(", f.src)}
        return {n: f for n, f in jitted.items() if n not in called}

    def key(variant, **changes):
        return specialise(variant.fn, {**variant.args, **changes}, variant.options).key

    for name in modules:
        module = importlib.import_module(f"lxmert_fast.kernels.{name}")
        variants = module.sm90_variants()
        for kernel_name, kernel in launched_kernels(module).items():
            listed = [v for v in variants if v.fn is kernel]
            if not listed:
                problems.append(f"{name}.{kernel_name}: launched but not listed by sm90_variants()")
                continue
            # Dropout on, if the kernel has such a switch: the seed and offset are then used.
            variant = next((v for v in listed if any(v.args.get(k) is True for k in ("DROPOUT", "HAS_DROPOUT"))), listed[0])
            args = [p.name for p in kernel.params]
            if "seed" in args:
                problems.append(f"{variant.name}: takes the seed as a host integer; it must load it (seed_ptr)")
            offset_arg = next((a for a in per_call if a in args), None)
            if offset_arg is None:
                continue
            keys = {key(variant, **{offset_arg: o}) for o in offsets}
            if len(keys) != 1:
                problems.append(
                    f"{variant.name}: {len(keys)} compiled kernels for {offset_arg} {offsets}; "
                    f"do_not_specialize is {kernel.do_not_specialize}"
                )
            control = next(
                (
                    p.name for p in kernel.params
                    if not p.is_constexpr and p.name not in per_call
                    and type(variant.args[p.name]) is int
                ),
                None,
            )
            if control is None:
                problems.append(f"{variant.name}: no specialised int argument to run the control on")
            elif key(variant, **{control: 768}) == key(variant, **{control: 769}):
                problems.append(f"{variant.name}: control {control} = 768 vs 769 gave one key: the check sees nothing")
            checked.append(f"{variant.name} ({offset_arg}; control {control})")
    print(json.dumps({"problems": problems, "checked": checked}))
    """
)


def test_seed_and_offset_never_change_the_compiled_kernel():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps([MODULES, PER_CALL, OFFSETS])],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print("\n" + "\n".join(report["checked"]))
    assert not report["problems"], "\n".join(report["problems"])
    assert len(report["checked"]) >= len(MODULES), report["checked"]


def test_one_compiled_kernel_serves_every_offset_on_the_gpu(kernel_device):
    if kernel_device.type != "cuda":
        pytest.skip("the interpreter has no compile cache: counting compiled kernels needs a GPU")
    from lxmert_fast.kernels import residual_layer_norm

    variant = next(
        v for v in residual_layer_norm.sm90_variants() if v.args["HAS_DROPOUT"] and v.args["BLOCK_Q"] == 256
    )
    kernel = variant.fn
    ordered = [variant.args[p.name] for p in kernel.params]
    offset_at = [p.name for p in kernel.params].index("offset")
    device = kernel_device.index if kernel_device.index is not None else torch.cuda.current_device()
    counts = []
    for offset in OFFSETS:
        ordered[offset_at] = offset
        kernel.warmup(*ordered, grid=(1,), **variant.options)
        counts.append(len(kernel.device_caches[device][0]))
    assert len(set(counts)) == 1, f"cache entries after each offset: {counts}"
