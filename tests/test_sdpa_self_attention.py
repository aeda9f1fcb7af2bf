"""Self-attention's SDPA fast path (lxmert_fast/sdpa.py) against the reference.

Forward and d(qkv) in fp32 (≤1e-5) and in bf16/fp16 (no worse than 2× the plain low-precision
reference against fp64), with and without a key bias, in batches mixing normal rows, rows whose
every key has the finite ``finfo.min`` bias (uniform attention, with the reference's gradients),
rows all ``-inf`` (zero context, zero gradients) and rows of ``-inf`` and ``finfo.min`` keys;
the same under ``torch.compile(fullgraph=True)``; the kernel pinning in force eager and compiled;
dropout reproducible under one ``torch.manual_seed``. Tensors live on ``kernel_device``, so on a
GPU (``pytest -m cuda``) SDPA's CUDA kernels are held to the same reference, and
``test_unguarded_kernels_mishandle_dead_rows`` checks there the kernel behaviour the correction
exists for.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from lxmert_fast import BackendUnavailableError, backend, ops, reference, sdpa, use_backend

HEADS, HEAD_DIM = 3, 16
HIDDEN = HEADS * HEAD_DIM
MIN = torch.finfo(torch.float32).min
BATCH = 5
# Per batch element of "mixed": keys 3.. masked; every key masked (finite: uniform attention);
# every key -inf (zero row); keys :2 -inf and the rest finite-masked (uniform over those); none.
BIAS_KINDS = ["none", "partial", "finite_all", "inf_all", "mixed"]


def _bias(kind: str, length: int, device: torch.device, low: float = MIN) -> torch.Tensor | None:
    if kind == "none":
        return None
    bias = torch.zeros(BATCH, length, device=device)
    bias[0, 3:] = low
    if kind == "finite_all":
        bias[1] = low
    elif kind == "inf_all":
        bias[1] = float("-inf")
        bias[0, 3:] = float("-inf")
    elif kind == "mixed":
        bias[1] = low
        bias[2] = float("-inf")
        bias[3] = low
        bias[3, :2] = float("-inf")
    return bias


def _run(fn, qkv: torch.Tensor, bias, dout: torch.Tensor, dtype: torch.dtype, p: float = 0.0):
    x = qkv.detach().to(dtype).requires_grad_()
    out = fn(x, HEADS, bias, p)
    (grad,) = torch.autograd.grad(out, x, dout.to(dtype))
    return out.float(), grad.float()


def _reference(x, heads, bias, p):
    return reference.self_attention(x, heads, bias, p)[0]


def _inputs(length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(BATCH, length, 3 * HIDDEN, device=device), torch.randn(
        BATCH, length, HIDDEN, device=device
    )


def _assert_matches_reference(fn, kind: str, length: int, device: torch.device) -> None:
    qkv, dout = _inputs(length, device)
    bias = _bias(kind, length, device)
    out, grad = _run(fn, qkv, bias, dout, torch.float32)
    ref_out, ref_grad = _run(_reference, qkv, bias, dout, torch.float32)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", BIAS_KINDS)
@pytest.mark.parametrize("length", [1, 7, 20])
def test_fp32_matches_reference(kind, length, kernel_device):
    _assert_matches_reference(sdpa.self_attention, kind, length, kernel_device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", [*BIAS_KINDS, "mixed_dtype_min"])
def test_half_no_worse_than_twice_the_plain_reference(kind, dtype, kernel_device):
    # "mixed_dtype_min": masked keys at finfo(dtype).min, a bf16 or fp16 model's own convention. In
    # bf16 that is a dead element as in fp32; in fp16 (-65504) the kernels' fp32 arithmetic is not
    # absorbed by it and attends by the scores, as the fp64 truth does (sdpa.py's docstring).
    length = 36
    qkv, dout = _inputs(length, kernel_device)
    if kind == "mixed_dtype_min":
        bias = _bias("mixed", length, kernel_device, torch.finfo(dtype).min)
    else:
        bias = _bias(kind, length, kernel_device)
    truth = _run(_reference, qkv.double(), None if bias is None else bias.double(), dout, torch.float64)
    ours = _run(sdpa.self_attention, qkv, bias, dout, dtype)
    plain = _run(_reference, qkv, bias, dout, dtype)
    for name, mine, low, exact in zip(("out", "d(qkv)"), ours, plain, truth, strict=True):
        assert torch.isfinite(mine).all(), name
        err, bound = (mine - exact).abs().max().item(), (low - exact).abs().max().item()
        assert err <= 2 * bound + 1e-6, f"{name}: max error {err:.3g} > 2 x {dtype} reference's {bound:.3g}"


def test_fully_masked_rows_as_the_reference(kernel_device):
    """Finite ``finfo.min`` everywhere: uniform attention (the mean of V) with nonzero gradients;
    ``-inf`` and ``finfo.min`` keys: uniform over the finite ones; ``-inf`` everywhere: a zero
    context and zero gradients. In bf16 an fp32 ``finfo.min`` bias becomes ``-inf`` (the cast
    rounds it up), so it gives the zero row there, in both paths."""
    length = 6
    qkv, dout = _inputs(length, kernel_device)
    v = qkv[..., 2 * HIDDEN :]
    out, grad = _run(sdpa.self_attention, qkv, _bias("mixed", length, kernel_device), dout, torch.float32)
    torch.testing.assert_close(out[1], v[1].mean(0).expand(length, HIDDEN), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[3], v[3, 2:].mean(0).expand(length, HIDDEN), atol=1e-6, rtol=1e-6)
    assert (grad[1, :, : 2 * HIDDEN] != 0).any() and (grad[3, 2:, HIDDEN:] != 0).all()
    assert (out[2] == 0).all() and (grad[2] == 0).all()
    bias = _bias("finite_all", length, kernel_device)
    out, grad = _run(sdpa.self_attention, qkv, bias, dout, torch.bfloat16)
    ref_out, ref_grad = _run(_reference, qkv, bias, dout, torch.bfloat16)
    assert (out[1] == 0).all() and (grad[1] == 0).all()
    assert (ref_out[1] == 0).all() and (ref_grad[1] == 0).all()


def test_unguarded_kernels_mishandle_dead_rows(kernel_device):
    """Why sdpa.py rewrites a dead element: SDPA's fused kernel, handed the finite ``finfo.min``
    bias itself, does not give the reference. The CPU flash kernel attends uniformly but returns
    T times the reference's d(q, k, v); the CUDA memory-efficient kernel overflows ``finfo.min *
    log2(e)`` to ``-inf`` and returns a zero row. If this fails, the kernels changed: revisit the
    docstring (the correction does not depend on it)."""
    length = 6
    qkv, dout = _inputs(length, kernel_device)
    bias = _bias("finite_all", length, kernel_device)

    def unguarded(x, heads, bias, p):
        q, k, v = (reference.split_heads(t, heads) for t in x.chunk(3, dim=-1))
        with torch.nn.attention.sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias[:, None, None, :], scale=1 / math.sqrt(HEAD_DIM)
            )
        return reference.merge_heads(context)

    out, grad = _run(unguarded, qkv, bias, dout, torch.float32)
    ref_out, ref_grad = _run(_reference, qkv, bias, dout, torch.float32)
    if kernel_device.type == "cuda":
        assert (out[1] == 0).all()
    else:
        torch.testing.assert_close(out[1], ref_out[1], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(grad[1], length * ref_grad[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad[0], ref_grad[0], atol=1e-5, rtol=1e-5)


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


@pytest.mark.filterwarnings("ignore:.*(Flash attention kernel not used|do not support non-zero dropout)")
def test_pinned_kernels_refuse_and_hold_under_compile(monkeypatch):
    """The CUDA pinning, emulated on the CPU by pinning its flash kernel alone: ``supports``
    refuses what the pinned kernels cannot take (the dispatcher then falls back, or under
    ``triton`` raises), and the pin reaches SDPA eager and under ``torch.compile(fullgraph=True)``
    — the CPU flash kernel takes no dropout, so a pinned call with dropout fails in both."""
    monkeypatch.setitem(sdpa.FUSED_KERNELS, "cpu", [SDPBackend.FLASH_ATTENTION])
    qkv = torch.randn(2, 5, 3 * HIDDEN)
    assert sdpa.supports(qkv, HEADS, None, 0.0) is None
    assert "float64" in sdpa.supports(qkv.double(), HEADS, None, 0.0)
    assert "head size 6" in sdpa.supports(torch.randn(2, 5, 3 * 24), 4, None, 0.0)
    assert "multiple of 8" in sdpa.supports(torch.randn(2, 5, 3 * 48, dtype=torch.bfloat16), 4, None, 0.0)
    with use_backend("triton"), pytest.raises(BackendUnavailableError, match="float64"):
        ops.self_attention(qkv.double(), HEADS, None, 0.0)
    torch._dynamo.reset()
    compiled = torch.compile(sdpa.self_attention, backend="aot_eager", fullgraph=True)
    _assert_matches_reference(compiled, "mixed", 5, torch.device("cpu"))
    bias = _bias("mixed", 5, torch.device("cpu"))[:2]
    for fn in (sdpa.self_attention, compiled):
        with pytest.raises(RuntimeError, match="No available kernel"):
            fn(qkv, HEADS, bias, 0.3)
    torch._dynamo.reset()


def test_dropout_same_seed_same_result(kernel_device):
    qkv = torch.randn(BATCH, 9, 3 * HIDDEN, device=kernel_device)
    bias = _bias("mixed", 9, kernel_device)

    def run(seed):
        torch.manual_seed(seed)
        return sdpa.self_attention(qkv, HEADS, bias, 0.3)

    first, again, other = run(5), run(5), run(6)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, sdpa.self_attention(qkv, HEADS, bias, 0.0))


def test_compiled_fullgraph_matches_reference(kernel_device):
    """The dispatcher's path (kernel pinning and the dead-element rewrite included) traced as one
    graph equals eager and the reference, fully masked rows of every kind included."""
    torch._dynamo.reset()
    with use_backend("triton"):
        step = torch.compile(
            lambda x, heads, bias, p: ops.self_attention(x, heads, bias, p)[0],
            backend="aot_eager",
            fullgraph=True,
        )
        _assert_matches_reference(step, "mixed", 9, kernel_device)
    torch._dynamo.reset()
