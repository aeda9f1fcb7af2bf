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


def pytest_report_header(config):
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (Triton interpreter)"
    return f"lxmert_fast: torch {torch.__version__}, GPU {device}"
