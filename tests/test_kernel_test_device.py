"""Kernel tests take their device from the ``kernel_device`` fixture (tests/conftest.py) only.

A kernel test that picks its own device drifts: on a GPU machine the residual LayerNorm and
fused-model tests handed CPU tensors to compiled Triton kernels and failed (issue #10).
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import pick_kernel_device
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import KernelInterface

from lxmert_fast.kernels import cross_attention, residual_layer_norm, visual_embedding

TESTS = Path(__file__).parent
# Module-level only: a nested helper may name its own variable DEVICE without picking anything.
OWN_DEVICE = re.compile(r"torch\.cuda\.is_available\(|^DEVICE\s*[:=]")


def kernel_test_files() -> list[Path]:
    # This file matches the glob but names the patterns it looks for, so it leaves itself out.
    files = [p for p in TESTS.glob("test_*kernel*.py") if p.name != Path(__file__).name]
    return sorted([*files, TESTS / "test_fused_model.py"])


# The files whose every test launches kernels on tensors. Not the whole glob: a test that only
# inspects compiled kernels (their cache keys, say) has no tensors to place.
LAUNCHING = (
    "test_cross_attention_kernel.py",
    "test_residual_layer_norm_kernel.py",
    "test_visual_embedding_kernel.py",
    "test_fused_model.py",
)


def test_the_scan_covers_the_kernel_test_files():
    assert set(LAUNCHING) <= {p.name for p in kernel_test_files()}


def test_no_kernel_test_picks_its_own_device():
    offenders = [
        f"{path.relative_to(TESTS.parent)}:{number}: {line.strip()}"
        for path in kernel_test_files()
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if OWN_DEVICE.search(line)
    ]
    assert not offenders, "take the device from the kernel_device fixture instead:\n" + "\n".join(offenders)


def test_every_kernel_test_takes_the_fixture():
    # Tests without it built their tensors on the CPU by default: the issue #10 failures.
    missing = [
        f"{path.relative_to(TESTS.parent)}:{node.lineno}: {node.name}"
        for path in (TESTS / name for name in LAUNCHING)
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.FunctionDef)
        and node.name.startswith("test_")
        and "kernel_device" not in {arg.arg for arg in node.args.args}
    ]
    assert not missing, "these kernel tests do not take kernel_device:\n" + "\n".join(missing)


def test_fixture_is_cuda_when_present_else_the_interpreted_cpu(kernel_device):
    if torch.cuda.is_available():
        assert kernel_device == torch.device("cuda")
    else:
        assert kernel_device == torch.device("cpu")
        # @triton.jit reads TRITON_INTERPRET when the kernel modules are imported; kernels
        # compiled without it cannot take the CPU tensors this fixture hands out.
        assert os.environ.get("TRITON_INTERPRET") == "1"
        for module in (cross_attention, residual_layer_norm, visual_embedding):
            kernels = [v for v in vars(module).values() if isinstance(v, KernelInterface)]
            assert kernels, f"{module.__name__}: no Triton kernels found"
            compiled = [k for k in kernels if not isinstance(k, InterpretedFunction)]
            assert not compiled, f"{module.__name__}: not interpreted: {compiled}"


def test_pick_kernel_device_covers_every_machine():
    assert pick_kernel_device(cuda_available=True, interpreted=False) == torch.device("cuda")
    assert pick_kernel_device(cuda_available=True, interpreted=True) == torch.device("cuda")
    assert pick_kernel_device(cuda_available=False, interpreted=True) == torch.device("cpu")
    with pytest.raises(pytest.skip.Exception, match="TRITON_INTERPRET"):
        pick_kernel_device(cuda_available=False, interpreted=False)
