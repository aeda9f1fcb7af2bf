"""Test configuration shared by every test file.

Without a GPU the Triton kernels run under the interpreter, which must be switched on
before any ``@triton.jit`` function is defined, so it is set here, before the test modules
(and through them the kernel modules) are imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pick_kernel_device(cuda_available: bool, interpreted: bool) -> torch.device:
    """The device the Triton kernel tests run on, given what this machine offers.

    Triton launches only on CUDA tensors; on CPU tensors it runs only under the interpreter.
    Skips (rather than fails) on a CPU-only machine whose TRITON_INTERPRET is not "1".
    """
    if cuda_available:
        return torch.device("cuda")
    if not interpreted:
        pytest.skip(
            "no CUDA device and TRITON_INTERPRET is not '1': Triton kernels cannot run on CPU tensors "
            "without the interpreter (set TRITON_INTERPRET=1 or leave it unset)"
        )
    return torch.device("cpu")


@pytest.fixture(scope="session")
def kernel_device() -> torch.device:
    """The one device every Triton kernel test puts its tensors on: CUDA when present, else the CPU
    under the interpreter. Decided here only, so no kernel test can hand CPU tensors to a kernel
    compiled for the GPU (the 57 CUDA failures of issue #10)."""
    return pick_kernel_device(torch.cuda.is_available(), INTERPRETED)


def pytest_report_header(config):
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (Triton interpreter)"
    return f"lxmert_fast: torch {torch.__version__}, GPU {device}"


def pytest_collection_modifyitems(config, items) -> None:
    """Every test that places tensors on ``kernel_device`` touches CUDA where it is present: mark it
    ``cuda`` so benchmarks/gpu_check.sh (``pytest -m cuda``) runs it on the card."""
    for item in items:
        if "kernel_device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cuda)
