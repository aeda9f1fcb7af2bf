"""Self-attention's SDPA fast path (lxmert_fast/sdpa.py) against the reference.

Forward and d(qkv) in fp32 (≤1e-6) and bf16 (no worse than 2× a bf16 reference against fp32), with
and without a key bias; fully masked rows under a finite ``finfo.min`` bias (uniform attention) and
under ``-inf`` (zero context, zero gradients), as the reference gives them; dropout reproducible
under one ``torch.manual_seed``; the dispatcher's path traced by ``torch.compile(fullgraph=True)``.
Tensors live on ``kernel_device``, so on a GPU (``pytest -m cuda``) SDPA's CUDA kernels are held to
the same reference.
"""

from __future__ import annotations

import pytest
import torch

from lxmert_fast import backend, ops, reference, sdpa, use_backend

HEADS, HEAD_DIM = 3, 16
HIDDEN = HEADS * HEAD_DIM
# Batch 0: keys 3.. masked; batch 1: every key masked (a fully masked row); batch 2: no masking.
BIAS_KINDS = ["none", "partial", "finite_all", "inf_all"]


def _bias(kind: str, batch: int, length: int, device: torch.device) -> torch.Tensor | None:
    if kind == "none":
        return None
    bias = torch.zeros(batch, length, device=device)
    bias[0, 3:] = torch.finfo(torch.float32).min
    if kind == "finite_all":
        bias[1] = torch.finfo(torch.float32).min
    elif kind == "inf_all":
        bias[1] = float("-inf")
        bias[0, 3:] = float("-inf")
    return bias


def _run(fn, qkv: torch.Tensor, bias, dout: torch.Tensor, dtype: torch.dtype):
    x = qkv.detach().to(dtype).requires_grad_()
    out = fn(x, HEADS, None if bias is None else bias, 0.0)
    (grad,) = torch.autograd.grad(out, x, dout.to(dtype))
    return out.float(), grad.float()


def _reference(x, heads, bias, p):
    return reference.self_attention(x, heads, bias, p)[0]


@pytest.mark.parametrize("kind", BIAS_KINDS)
@pytest.mark.parametrize("length", [1, 7, 20])
def test_fp32_matches_reference(kind, length, kernel_device):
    batch = 3
    qkv = torch.randn(batch, length, 3 * HIDDEN, device=kernel_device)
    dout = torch.randn(batch, length, HIDDEN, device=kernel_device)
    bias = _bias(kind, batch, length, kernel_device)
    out, grad = _run(sdpa.self_attention, qkv, bias, dout, torch.float32)
    ref_out, ref_grad = _run(_reference, qkv, bias, dout, torch.float32)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-6)
    # A finite fully masked row (batch 1 of "finite_all"): forward only, see lxmert_fast/sdpa.py.
    rows = [0, 2] if kind == "finite_all" else slice(None)
    torch.testing.assert_close(grad[rows], ref_grad[rows], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", BIAS_KINDS)
def test_bf16_no_worse_than_twice_the_bf16_reference(kind, kernel_device):
    batch, length = 3, 36
    qkv = torch.randn(batch, length, 3 * HIDDEN, device=kernel_device)
    dout = torch.randn(batch, length, HIDDEN, device=kernel_device)
    bias = _bias(kind, batch, length, kernel_device)
    truth = _run(_reference, qkv.double(), None if bias is None else bias.double(), dout, torch.float64)
    ours = _run(sdpa.self_attention, qkv, bias, dout, torch.bfloat16)
    plain = _run(_reference, qkv, bias, dout, torch.bfloat16)
    for name, mine, low, exact in zip(("out", "d(qkv)"), ours, plain, truth, strict=True):
        assert torch.isfinite(mine).all(), name
        err, bound = (mine - exact).abs().max().item(), (low - exact).abs().max().item()
        assert err <= 2 * bound + 1e-6, f"{name}: max error {err:.3g} > 2 x bf16 reference's {bound:.3g}"


def test_fully_masked_rows_as_the_reference(kernel_device):
    """Finite ``finfo.min`` everywhere: uniform attention (the mean of V), forward only (its gradient
    is T times the reference's in a fused kernel, see lxmert_fast/sdpa.py). ``-inf`` everywhere: a
    zero context and zero gradients for that batch element. In bf16 an fp32 ``finfo.min`` bias
    becomes ``-inf`` (the cast rounds it up), so it gives the zero row there, in both paths."""
    batch, length = 3, 6
    qkv = torch.randn(batch, length, 3 * HIDDEN, device=kernel_device)
    dout = torch.randn(batch, length, HIDDEN, device=kernel_device)
    v = qkv[1, :, 2 * HIDDEN :]
    out, _ = _run(
        sdpa.self_attention, qkv, _bias("finite_all", batch, length, kernel_device), dout, torch.float32
    )
    torch.testing.assert_close(out[1], v.mean(0).expand(length, HIDDEN), atol=1e-6, rtol=1e-6)
    for dtype, kind in ((torch.float32, "inf_all"), (torch.bfloat16, "finite_all")):
        bias = _bias(kind, batch, length, kernel_device)
        out, grad = _run(sdpa.self_attention, qkv, bias, dout, dtype)
        ref_out, ref_grad = _run(_reference, qkv, bias, dout, dtype)
        assert (out[1] == 0).all() and (grad[1] == 0).all(), dtype
        assert (ref_out[1] == 0).all() and (ref_grad[1] == 0).all(), dtype


def test_dispatcher_runs_it_under_triton_only_on_cpu(kernel_device):
    assert backend.fast_path_of(ops.SELF_ATTENTION).impl is sdpa.self_attention
    assert not backend.fast_path_of(ops.SELF_ATTENTION).on_cpu
    qkv = torch.randn(2, 5, 3 * HIDDEN, device=kernel_device)
    with use_backend("triton"):
        assert backend.choose(ops.SELF_ATTENTION, qkv.device, qkv, HEADS, None, 0.0, optional=True) is (
            sdpa.self_attention
        )
        _, probs = ops.self_attention(qkv, HEADS, None, 0.0, need_probs=True)
    assert probs is not None  # the probabilities always come from the reference
    with use_backend("auto"):
        chosen = backend.choose(ops.SELF_ATTENTION, qkv.device, qkv, HEADS, None, 0.0, optional=True)
    # auto: on CUDA only, and only where a recorded measurement shows it faster (none yet).
    allowed = kernel_device.type == "cuda" and backend.auto_decision(ops.SELF_ATTENTION, "cuda")[0]
    assert chosen is (sdpa.self_attention if allowed else None)


def test_dropout_same_seed_same_result(kernel_device):
    qkv = torch.randn(2, 9, 3 * HIDDEN, device=kernel_device)
    bias = _bias("partial", 2, 9, kernel_device)

    def run(seed):
        torch.manual_seed(seed)
        return sdpa.self_attention(qkv, HEADS, bias, 0.3)

    first, again, other = run(5), run(5), run(6)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, sdpa.self_attention(qkv, HEADS, bias, 0.0))


def test_compiled_fullgraph_equals_eager(kernel_device):
    qkv = torch.randn(2, 9, 3 * HIDDEN, device=kernel_device)
    bias = _bias("partial", 2, 9, kernel_device)
    dout = torch.randn(2, 9, HIDDEN, device=kernel_device)

    def step(x):
        return ops.self_attention(x, HEADS, bias, 0.0)[0]

    torch._dynamo.reset()
    with use_backend("triton"):
        eager = _run(lambda x, *_: step(x), qkv, None, dout, torch.float32)
        compiled = _run(
            lambda x, *_: torch.compile(step, backend="aot_eager", fullgraph=True)(x),
            qkv,
            None,
            dout,
            torch.float32,
        )
    torch._dynamo.reset()
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
