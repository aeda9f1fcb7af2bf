"""Build and install lxmert_fast.

The Triton kernels live in the top-level ``kernels/`` folder and install as the subpackage
``lxmert_fast.kernels`` (a top-level package named ``kernels`` would clash with an unrelated
PyPI project).

The C++ RoI-masking op (``csrc/``) builds as the extension ``lxmert_fast._C``: always for the
CPU, and with its CUDA kernel when the CUDA toolchain (``CUDA_HOME``) and the installed torch
(``torch.version.cuda``) both have CUDA. Whether a GPU is visible does not matter: a build
machine often has none. This file imports torch, so install torch first and build without
isolation::

    pip install torch==2.13.0 && pip install --no-build-isolation -e ".[test]"
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:
    sys.exit(
        f"lxmert_fast: setup.py needs torch to build its C++ extension ({exc}). Install torch first, "
        'then build without isolation: pip install torch && pip install --no-build-isolation -e ".[test]"'
    )

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _ensure_ninja_on_path() -> None:
    """BuildExtension looks for ``ninja`` on PATH; the pip package installs it next to the
    interpreter, which is not on PATH when a venv's python runs without activating the venv."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _extension():
    # at::parallel_for is a header template: it only runs in parallel when the extension is
    # compiled with OpenMP, as torch itself is on Linux.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") and torch.backends.openmp.is_available() else []
    sources = [str(CSRC / "roi_mask.cpp")]
    extra_compile_args = {"cxx": ["-O3", *openmp]}
    # Absolute paths: ninja runs from the build directory.
    common = dict(include_dirs=[str(CSRC)], extra_link_args=openmp)
    if CUDA_HOME is not None and torch.version.cuda is not None:
        sources.append(str(CSRC / "cuda" / "roi_mask.cu"))
        extra_compile_args["nvcc"] = ["-O3", *(f for flag in openmp for f in ("-Xcompiler", flag))]
        return CUDAExtension("lxmert_fast._C", sources, extra_compile_args=extra_compile_args, **common)
    return CppExtension("lxmert_fast._C", sources, extra_compile_args=extra_compile_args, **common)


_ensure_ninja_on_path()

setup(
    name="lxmert_fast",
    version="0.1.0",
    description="Fast LXMERT: fused Triton kernels, exact Hugging Face/authors' checkpoint compatibility, DeepSpeed pre-training",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["lxmert_fast", "lxmert_fast.kernels"],
    package_dir={"lxmert_fast": "lxmert_fast", "lxmert_fast.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    # ninja: torch.utils.cpp_extension.load needs it for the JIT fallback in lxmert_fast/roi_mask.py
    # (an install without lxmert_fast._C, or a torch changed since the build), and it makes any
    # later `pip install --no-build-isolation` build in parallel. Build requirements are not
    # installed before a --no-build-isolation build, so the first build may fall back to the
    # slower setuptools compiler; the result is the same.
    install_requires=["torch>=2.4", "numpy", "safetensors", "packaging", "ninja"],
    extras_require={
        "triton": ["triton>=3.1"],
        # train.py: DeepSpeed ZeRO pre-training, WordPiece tokenisation, the progress bar.
        "train": ["deepspeed>=0.19", "tokenizers>=0.15", "tqdm"],
        # pybind11 (with ninja above): the torch C++-extension toolchain, so a test environment can
        # rebuild the op; this extension creates its module with the Python C API and torch also
        # bundles pybind11's headers, so a plain install does not need it.
        "test": [
            "pytest",
            "pytest-benchmark",
            # README's test command runs the suite in parallel (-n auto --dist loadfile).
            "pytest-xdist",
            "transformers>=4.40",
            "triton>=3.1",
            "ruff",
            "pybind11",
            "deepspeed>=0.19",
            "tokenizers>=0.15",
            "tqdm",
        ],
    },
)
