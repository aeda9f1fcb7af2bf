"""The fused cross-attention as torch.library custom ops: registration and graph-safe dropout.

``lxmert_fast::cross_attention_fwd`` / ``cross_attention_bwd`` pass ``torch.library.opcheck``
(schema, fake kernel, autograd registration, AOT dispatch) with and without dropout and biases,
and ``torch.compile(fullgraph=True)`` traces the dispatcher's fused path with dropout without a
graph break: under one ``torch.manual_seed`` the compiled forward and d(qkv) equal eager bit for
bit, and successive compiled calls draw fresh masks. A seed read on the host (``int(tensor)``)
would break the graph, so the fullgraph test also shows that the seed stays on the device; the
kernel tests show it is ``philox.draw_seed``. Kernel correctness is tested in
tests/test_cross_attention_kernel.py.
"""

from __future__ import annotations

import pytest
import torch

import lxmert_fast
from lxmert_fast import ops
from lxmert_fast.kernels import cross_attention as xattn
from lxmert_fast.philox import seed_tensor

BATCH, LANG_LEN, VIS_LEN, HEADS, HEAD_DIM = 2, 5, 7, 2, 32


def _inputs(device: torch.device, biases: bool):
    qkv = torch.randn(BATCH, LANG_LEN + VIS_LEN, 3 * HEADS * HEAD_DIM, device=device)
    if not biases:
        return qkv, None, None
    lang = torch.zeros(BATCH, LANG_LEN, device=device)
    lang[0, 3:] = torch.finfo(torch.float32).min
    vis = torch.zeros(BATCH, VIS_LEN, device=device)
    vis[1, :] = float("-inf")
    return qkv, lang, vis


@pytest.mark.parametrize("biases", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_opcheck_forward_and_backward_ops(dropout_p, biases, kernel_device):
    qkv, lang, vis = _inputs(kernel_device, biases)
    seed = seed_tensor(17, kernel_device) if dropout_p else None
    launch = (LANG_LEN, HEADS, dropout_p, 3 if dropout_p else 0)
    fwd_args = (qkv.requires_grad_(), lang, vis, seed, *launch)
    torch.library.opcheck(torch.ops.lxmert_fast.cross_attention_fwd.default, fwd_args)
    with torch.no_grad():
        out, row_max, row_inv_sum = xattn.cross_attention_fwd(*fwd_args)
    dout = torch.randn_like(out)
    bwd_args = (qkv.detach(), lang, vis, seed, out, dout, row_max, row_inv_sum, *launch)
    torch.library.opcheck(torch.ops.lxmert_fast.cross_attention_bwd.default, bwd_args)


def test_compiled_fullgraph_equals_eager_and_draws_fresh_masks(kernel_device):
    qkv, lang, vis = _inputs(kernel_device, biases=True)
    dout = torch.randn(BATCH, LANG_LEN + VIS_LEN, HEADS * HEAD_DIM, device=kernel_device)

    def step(x):
        return ops.bidirectional_cross_attention(x, LANG_LEN, HEADS, lang, vis, 0.1)[0]

    def run(fn):
        x = qkv.clone().requires_grad_()
        out = fn(x)
        out.backward(dout)
        return out.detach(), x.grad

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with lxmert_fast.use_backend("triton"):
        torch.manual_seed(5)
        eager = run(step)
        torch.manual_seed(5)
        first = run(compiled)
        second = run(compiled)
    assert torch.equal(first[0], eager[0]), "compiled context differs from eager under one seed"
    assert torch.equal(first[1], eager[1]), "compiled d(qkv) differs from eager under one seed"
    assert not torch.equal(first[0], second[0]), "a second compiled call reused the dropout masks"
