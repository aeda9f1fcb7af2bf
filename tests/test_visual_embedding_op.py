"""The fused visual embedding as registered torch.library ops (kernels/visual_embedding.py).

``lxmert_fast::visual_embedding_fwd`` / ``_bwd`` pass ``torch.library.opcheck`` (schema, fake
kernels, autograd registration, AOT dispatch), and a training step through the dispatcher
compiles with ``fullgraph=True``: its dropout seed is drawn on the device inside the graph, so
the compiled step equals the eager one under the same ``torch.manual_seed`` and every call
draws a fresh mask. Numerics against the reference: tests/test_visual_embedding_kernel.py.
"""

from __future__ import annotations

import pytest
import torch
from test_visual_embedding_kernel import EPS, make_inputs, run

import lxmert_fast
from lxmert_fast import ops
from lxmert_fast.kernels import visual_embedding as ve
from lxmert_fast.philox import seed_tensor


@pytest.mark.parametrize(
    ("dropout_p", "gemm_dtype"),
    [(0.0, torch.float32), (0.1, torch.float32), (0.1, torch.bfloat16)],
    ids=["eval", "dropout", "bf16-gemm-fp32-norm"],
)
def test_opcheck(dropout_p, gemm_dtype, kernel_device):
    """bf16-gemm-fp32-norm: the dtypes CUDA autocast hands the op (fp32 output)."""
    inputs = make_inputs(2, 5, feat_dim=16, hidden=32, device=kernel_device)
    inputs[:4] = [t.to(gemm_dtype) for t in inputs[:4]]
    inputs[6:8] = [t.to(gemm_dtype) for t in inputs[6:8]]
    leaves = [t.requires_grad_() for t in inputs]
    seed = seed_tensor(99, kernel_device) if dropout_p > 0 else None
    fwd_args = (*leaves, EPS, dropout_p, seed, 3)
    torch.library.opcheck(ve.visual_embedding_fwd, fwd_args)

    out, proj, stats = ve.visual_embedding_fwd(*fwd_args)
    assert out.dtype == torch.float32 and proj.dtype == gemm_dtype
    _, boxes, _, _, feat_ln_weight, _, box_weight, box_bias, box_ln_weight, _ = inputs
    grad_out = torch.randn_like(out)
    bwd_args = (grad_out, proj, boxes, box_weight, box_bias, feat_ln_weight, box_ln_weight, stats)
    torch.library.opcheck(ve.visual_embedding_bwd, (*[t.detach() for t in bwd_args], dropout_p, seed, 3))


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fullgraph_compile_equals_eager_and_redraws(autocast, kernel_device):
    inputs = make_inputs(2, 9, feat_dim=32, hidden=96, device=kernel_device)
    out_dtype = torch.bfloat16 if autocast and kernel_device.type == "cpu" else torch.float32
    grad_out = torch.randn(2, 9, 96, device=kernel_device).to(out_dtype)

    def step(*args):
        return ops.visual_embedding(*args)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with (
        lxmert_fast.use_backend("triton"),
        torch.autocast(kernel_device.type, dtype=torch.bfloat16, enabled=autocast),
    ):
        torch.manual_seed(11)
        eager = run(step, inputs, grad_out, 0.1)
        torch.manual_seed(11)
        first = run(compiled, inputs, grad_out, 0.1)
        second = run(compiled, inputs, grad_out, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(eager, first, strict=True))
    assert not torch.equal(first[0] == 0, second[0] == 0), "two compiled calls drew one mask"
