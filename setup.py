"""Build and install lxmert_fast.

The Triton kernels live in the top-level ``kernels/`` folder and install as the subpackage
``lxmert_fast.kernels`` (a top-level package named ``kernels`` would clash with an unrelated
PyPI project).
"""

from pathlib import Path

from setuptools import setup

setup(
    name="lxmert_fast",
    version="0.1.0",
    description="Fast LXMERT: fused Triton kernels, exact Hugging Face/authors' checkpoint compatibility, DeepSpeed pre-training",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["lxmert_fast", "lxmert_fast.kernels"],
    package_dir={"lxmert_fast": "lxmert_fast", "lxmert_fast.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy", "safetensors", "packaging"],
    extras_require={
        "triton": ["triton>=3.1"],
        "test": ["pytest", "pytest-benchmark", "transformers>=4.40", "triton>=3.1", "ruff"],
    },
)
