"""Fused residual + dropout + LayerNorm vs eager PyTorch (dropout + add + F.layer_norm).

Shapes: [B * 56, 768] bf16 (LXMERT's 20 words + 36 objects per sample), B in {32, 256},
dropout 0.1 as in training. Modes: ``forward`` (training forward: inputs need gradients, so
both paths save what their backward needs), ``forward_backward`` (forward then the four
gradients via ``torch.autograd.grad``, no ``.grad`` accumulation) and ``inference`` (p = 0,
no grad).

``extra_info``: ``device_ms`` (median device time of one step inside a captured CUDA graph, see
benchmarks/conftest.py ``device_time``), ``bytes`` (what the op must move), ``gbps`` (``bytes`` /
``device_ms``), ``clone_gbps`` and ``pct_of_clone`` (against a ``clone()`` of the same bytes, this
run), ``peak_mem_mb`` (allocation peak of one step above what was allocated before it). The
benchmark's own mean is wall time (host launch cost included). Bytes that must move, with T = one
[B*56, 768] bf16 tensor:
inference 3T (hidden, residual in; out); training forward 4T (also the LayerNorm input that any
backward needs); forward+backward 8T (plus grad_out in, the saved input back, grad_hidden and
grad_residual out). The eager path moves more (mask, intermediate sums): that is the point.
"""

from __future__ import annotations

import pytest
import torch

from lxmert_fast import reference
from lxmert_fast.kernels import residual_layer_norm

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: the Triton kernels are timed on the device"
)

SEQ = 56
HIDDEN = 768
DROPOUT = 0.1
EPS = 1e-12
TENSORS_MOVED = {"inference": 3, "forward": 4, "forward_backward": 8}


IMPLS = {
    "fused": residual_layer_norm.residual_dropout_layer_norm,
    "eager": reference.residual_dropout_layer_norm,
}


def _make_step(impl: str, mode: str, batch: int):
    fn = IMPLS[impl]
    shape = (batch * SEQ, HIDDEN)
    needs_grad = mode != "inference"
    hidden, residual = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    weight = 1.0 + 0.1 * torch.randn(HIDDEN, device="cuda", dtype=torch.bfloat16)
    bias = 0.1 * torch.randn(HIDDEN, device="cuda", dtype=torch.bfloat16)
    leaves = [t.requires_grad_(needs_grad) for t in (hidden, residual, weight, bias)]
    grad_out = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    def step():
        if mode == "inference":
            with torch.no_grad():
                return fn(*leaves, EPS, 0.0)
        out = fn(*leaves, EPS, DROPOUT)
        if mode == "forward":
            return out
        return torch.autograd.grad(out, leaves, grad_out)

    return step, hidden.numel() * hidden.element_size()


@pytest.mark.parametrize("mode", list(TENSORS_MOVED))
@pytest.mark.parametrize("batch", [32, 256])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_residual_layer_norm(benchmark, device_time, impl, batch, mode):
    step, tensor_bytes = _make_step(impl, mode, batch)
    step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before

    device_time(step, TENSORS_MOVED[mode] * tensor_bytes)

    def timed():
        step()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=50, warmup_rounds=5)
    benchmark.extra_info.update(
        {
            "shape": [batch * SEQ, HIDDEN],
            "dtype": "bf16",
            "peak_mem_mb": round(peak / 2**20, 2),
            "device": torch.cuda.get_device_name(),
        }
    )
