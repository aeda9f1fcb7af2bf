"""RoI-feature masking: the C++/CUDA op vs the eager torch composition (the reference path).

Shape: features [256, 36, 2048] fp32 (a pre-training batch of RoI features, 75.5 MB), the
pre-training probabilities (0.15, 0.8, 0.1). Implementations:

* ``cpp``: ``lxmert_fast::roi_feature_mask`` (one pass: Philox per row, copy or zero the row);
* ``cpp_inplace``: ``lxmert_fast::roi_feature_mask_`` (writes only the ~15% selected rows);
* ``torch_reference``: ``lxmert_fast.ops.roi_feature_mask`` under ``use_backend("reference")``,
  i.e. Philox in torch ops + masked_fill + gather + where, as every non-fast path runs it;
* ``torch_clone``: ``features.clone()``, the floor of any out-of-place op (allocate + copy).
  On the CPU the fresh 75 MB output costs page faults that dominate both ``clone`` and ``cpp``.

``extra_info``: ``gb_per_s`` = (read + write of the features, 2 x 75.5 MB, the bytes the
out-of-place op must move) / mean time; for ``cpp_inplace`` the same nominal bytes, so the
number is comparable, not the bytes it moves. On CUDA also ``peak_mem_mb`` (allocation peak
of one call above what was allocated before it); the CPU allocator has no peak counter
(the out-of-place op allocates the output and a [B, N] int8 action, nothing else).
On CUDA also ``device_ms`` (one call inside a captured CUDA graph, benchmarks/conftest.py
``device_time``; the mean stays wall time) and, for the same nominal bytes, ``gbps``,
``clone_gbps`` (a ``clone()`` moving as many bytes, this run) and ``pct_of_clone``.
"""

from __future__ import annotations

import pytest
import torch

from lxmert_fast import ops, roi_mask, use_backend

SHAPE = (256, 36, 2048)
SEED, OFFSET = 1234, 0
HAS_CUDA_KERNEL = (
    torch.cuda.is_available()
    and roi_mask.supports(torch.empty(1, 1, 1, device="cuda"), 0, 0, 0.15, 0.8, 0.1) is None
)


def _reference(x: torch.Tensor):
    with use_backend("reference"):
        return ops.roi_feature_mask(x, SEED, OFFSET)


IMPLS = {
    "cpp": lambda x: roi_mask.roi_feature_mask(x, SEED, OFFSET),
    "cpp_inplace": lambda x: roi_mask.roi_feature_mask_(x, SEED, OFFSET),
    "torch_reference": _reference,
    "torch_clone": torch.clone,
}
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not HAS_CUDA_KERNEL, reason="no CUDA device, or lxmert_fast._C was built without CUDA"
        ),
    ),
]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("device", DEVICES)
def test_roi_mask(benchmark, device_time, device, impl):
    roi_mask.load_extension()
    fn = IMPLS[impl]
    x = torch.randn(SHAPE, device=device)
    cuda = device == "cuda"

    def step():
        result = fn(x)
        if cuda:
            torch.cuda.synchronize()
        return result

    step()
    if cuda:
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        benchmark.extra_info["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        device_time(lambda: fn(x), 2 * x.numel() * x.element_size())
    benchmark.group = f"roi_feature_mask {device} {list(SHAPE)} fp32"
    benchmark.pedantic(step, rounds=20 if device == "cpu" else 200, warmup_rounds=2)
    moved = 2 * x.numel() * x.element_size()
    benchmark.extra_info["gb_per_s"] = moved / benchmark.stats.stats.mean / 1e9
