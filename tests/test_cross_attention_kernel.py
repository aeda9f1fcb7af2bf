"""The fused bidirectional cross-attention kernel against lxmert_fast.reference.

Forward context and d(qkv) are compared with the pure-PyTorch reference on copied inputs:
fp32 to 1e-5, half precision against an fp32 reference within twice the error of a plain
half-precision reference. Awkward lengths (1, 7, 20, 33 words x 1, 10, 36, 50 objects), masks
(partial, fully masked with a finite minimum and with -inf, one stream only), dropout (same seed
-> same result, keep rate, masks equal to the torch Philox, exact reference given the masks),
bitwise reproducible backward, non-contiguous qkv views and the dispatcher. Runs under the
Triton interpreter without a GPU (small heads, so the file stays under three minutes).
"""

from __future__ import annotations

import math

import pytest
import torch

import lxmert_fast
from lxmert_fast import ops, reference
from lxmert_fast.backend import fast_path_of
from lxmert_fast.kernels import cross_attention as xattn
from lxmert_fast.philox import draw_seed, philox_bits

Tensor = torch.Tensor
FP32_TOL = 1e-5
# Slack added to the "twice the half-precision reference error" bound, per dtype.
LOW_PRECISION_ATOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _qkv(
    batch: int,
    lang_len: int,
    vis_len: int,
    heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    return torch.randn(batch, lang_len + vis_len, 3 * heads * head_dim, device=device).to(dtype)


def _biases(batch: int, lang_len: int, vis_len: int, dtype: torch.dtype, which: str, device: torch.device):
    """Additive biases: batch row 0 partially masked (finite min), row 1 fully masked with the
    finite minimum, row 2 fully masked with -inf (for both streams); ``which`` picks the streams."""
    lowest = torch.finfo(dtype).min

    def bias(length: int) -> Tensor:
        b = torch.zeros(batch, length, device=device, dtype=dtype)
        b[0, length // 2 + 1 :] = lowest
        if batch > 1:
            b[1] = lowest
        if batch > 2:
            b[2] = float("-inf")
        return b

    lang = bias(lang_len) if which in ("both", "lang") else None
    vis = bias(vis_len) if which in ("both", "visual") else None
    return lang, vis


def _fused(qkv, lang_len, heads, lang_bias, vis_bias, dout, p=0.0, seed=None):
    x = qkv.detach().clone().requires_grad_()
    out = xattn.cross_attention(x, lang_len, heads, lang_bias, vis_bias, p, seed=seed)
    out.backward(dout)
    return out.detach(), x.grad


def _reference(qkv, lang_len, heads, lang_bias, vis_bias, dout, dtype, p=0.0, keep_masks=None):
    """Reference context and d(qkv) with every input cast to ``dtype``."""
    x = qkv.detach().to(dtype).requires_grad_()
    cast = [None if b is None else b.to(dtype) for b in (lang_bias, vis_bias)]
    out, _, _ = reference.bidirectional_cross_attention(x, lang_len, heads, *cast, p, keep_masks)
    out.backward(dout.to(dtype))
    return out.detach(), x.grad


def _report(name: str, actual: Tensor, expected: Tensor, bad: Tensor, allowed: Tensor) -> str:
    err = (actual.double() - expected.double()).abs()
    idx = tuple(int(i) for i in torch.nonzero(bad)[0])
    return (
        f"{name}: {int(bad.sum())} of {bad.numel()} elements out of bounds; first at {idx}: "
        f"got {actual[idx].item()}, expected {expected[idx].item()}, allowed {allowed[idx].item():.3g}; "
        f"max error {err.max().item():.3g}"
    )


def _check_fp32(name: str, actual: Tensor, expected: Tensor) -> None:
    assert not actual.isnan().any(), f"{name}: NaN in the kernel output"
    allowed = FP32_TOL + FP32_TOL * expected.abs()
    bad = (actual - expected).abs() > allowed
    assert not bad.any(), _report(name, actual, expected, bad, allowed)


def _check_low_precision(name: str, actual: Tensor, ref_low: Tensor, ref32: Tensor, atol: float) -> None:
    """|fast - ref32| <= 2 * |ref_low - ref32| + atol (ref_low: the reference run in the same dtype)."""
    assert not actual.isnan().any(), f"{name}: NaN in the kernel output"
    actual, ref_low = actual.float(), ref_low.float()
    allowed = 2 * (ref_low - ref32).abs().nan_to_num(nan=0.0) + atol
    bad = (actual - ref32).abs() > allowed
    assert not bad.any(), _report(name, actual, ref32, bad, allowed)


def _compare(qkv, lang_len, heads, lang_bias, vis_bias, p=0.0, seed=None, keep_masks=None):
    """Run fused and reference(s) on the same inputs and check context and d(qkv)."""
    dtype = qkv.dtype
    dout = torch.randn(qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3, device=qkv.device).to(dtype)
    out, grad = _fused(qkv, lang_len, heads, lang_bias, vis_bias, dout, p, seed)
    ref_out, ref_grad = _reference(
        qkv, lang_len, heads, lang_bias, vis_bias, dout, torch.float32, p, keep_masks
    )
    if dtype == torch.float32:
        _check_fp32("context", out, ref_out)
        _check_fp32("d(qkv)", grad, ref_grad)
    else:
        low_out, low_grad = _reference(qkv, lang_len, heads, lang_bias, vis_bias, dout, dtype, p, keep_masks)
        atol = LOW_PRECISION_ATOL[dtype]
        _check_low_precision("context", out, low_out, ref_out, atol)
        _check_low_precision("d(qkv)", grad, low_grad, ref_grad, 2 * atol)
    return out, grad


# Every language length meets several vision lengths (not the full product: interpreter time).
LENGTHS = [(1, 1), (1, 50), (7, 10), (7, 36), (20, 36), (20, 1), (33, 50), (33, 10)]


@pytest.mark.parametrize("lang_len, vis_len", LENGTHS)
def test_fp32_matches_reference(lang_len, vis_len, kernel_device):
    batch = 1 + lang_len % 3
    head_dim = 32 if vis_len % 2 else 64
    _compare(
        _qkv(batch, lang_len, vis_len, 2, head_dim, torch.float32, kernel_device), lang_len, 2, None, None
    )


@pytest.mark.parametrize("lang_len, vis_len", LENGTHS[1::2])
def test_fp16_within_twice_the_half_reference_error(lang_len, vis_len, kernel_device):
    batch = 1 + lang_len % 3
    _compare(_qkv(batch, lang_len, vis_len, 2, 32, torch.float16, kernel_device), lang_len, 2, None, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_head_dim_128(dtype, kernel_device):
    lang, vis = _biases(2, 20, 36, dtype, "both", kernel_device)
    _compare(_qkv(2, 20, 36, 1, 128, dtype, kernel_device), 20, 1, lang, vis)


def test_bf16_within_twice_the_bf16_reference_error(kernel_device):
    # The launcher upcasts bf16 dot operands under the interpreter (its bf16 tl.dot is wrong).
    lang, vis = _biases(2, 20, 36, torch.bfloat16, "visual", kernel_device)
    _compare(_qkv(2, 20, 36, 2, 64, torch.bfloat16, kernel_device), 20, 2, lang, vis)


def test_lengths_beyond_one_block_in_half_precision(kernel_device):
    # Half precision takes 64-blocks: 130 words and 70 objects loop over several key blocks.
    lang, vis = _biases(1, 130, 70, torch.float16, "both", kernel_device)
    _compare(_qkv(1, 130, 70, 1, 32, torch.float16, kernel_device), 130, 1, lang, vis)


@pytest.mark.parametrize("which", ["both", "lang", "visual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_masks(which, dtype, kernel_device):
    lang_len, vis_len = (7, 10) if dtype == torch.float32 else (20, 36)
    lang, vis = _biases(3, lang_len, vis_len, dtype, which, kernel_device)
    out, grad = _compare(_qkv(3, lang_len, vis_len, 2, 32, dtype, kernel_device), lang_len, 2, lang, vis)
    hidden = 64
    # Batch row 2 is fully masked with -inf: zero context and zero d(q), exactly, as the reference.
    if lang is not None:
        assert torch.equal(out[2, lang_len:], torch.zeros_like(out[2, lang_len:]))
        assert torch.equal(grad[2, lang_len:, :hidden], torch.zeros_like(grad[2, lang_len:, :hidden]))
    if vis is not None:
        assert torch.equal(out[2, :lang_len], torch.zeros_like(out[2, :lang_len]))
        assert torch.equal(grad[2, :lang_len, :hidden], torch.zeros_like(grad[2, :lang_len, :hidden]))


def test_finite_minimum_fully_masked_rows_attend_uniformly(kernel_device):
    lang, vis = _biases(2, 7, 10, torch.float32, "both", kernel_device)
    qkv = _qkv(2, 7, 10, 2, 32, torch.float32, kernel_device)
    out = xattn.cross_attention(qkv, 7, 2, lang, vis, 0.0)
    v = qkv[1, :, 128:]
    _check_fp32("language rows", out[1, :7], v[7:].mean(0).expand(7, -1))
    _check_fp32("vision rows", out[1, 7:], v[:7].mean(0).expand(10, -1))


def test_dropout_same_seed_same_result_and_deterministic_backward(kernel_device):
    qkv = _qkv(2, 7, 36, 2, 32, torch.float16, kernel_device)
    lang, vis = _biases(2, 7, 36, torch.float16, "both", kernel_device)
    dout = torch.randn(2, 43, 64, device=kernel_device).half()
    a = _fused(qkv, 7, 2, lang, vis, dout, p=0.3, seed=7)
    b = _fused(qkv, 7, 2, lang, vis, dout, p=0.3, seed=7)
    c = _fused(qkv, 7, 2, lang, vis, dout, p=0.3, seed=8)
    assert torch.equal(a[0], b[0]), "same seed, different context"
    assert torch.equal(a[1], b[1]), "backward is not bitwise reproducible"
    assert not torch.equal(a[0], c[0]), "another seed gave the same dropout"


def test_dropout_seed_drawn_on_the_device_from_torch_generator(kernel_device):
    qkv = _qkv(1, 7, 10, 2, 32, torch.float32, kernel_device)

    def seeded(manual_seed, **seed):
        torch.manual_seed(manual_seed)
        return xattn.cross_attention(qkv, 7, 2, None, None, 0.5, **seed)

    a = seeded(123)
    assert torch.equal(a, seeded(123)), "torch.manual_seed does not reproduce the dropout"
    torch.manual_seed(123)
    drawn = draw_seed(kernel_device)
    assert torch.equal(a, seeded(123, seed=drawn)), "the seed is not philox.draw_seed on the device"
    assert not torch.equal(a, seeded(124)), "another torch seed gave the same dropout"


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate_within_binomial_bounds(p, kernel_device):
    lang_keep, vis_keep = xattn.dropout_keep_masks(3, 0, 2, 3, 20, 36, p, kernel_device)
    assert lang_keep.shape == (2, 3, 20, 36) and vis_keep.shape == (2, 3, 36, 20)
    n = lang_keep.numel() + vis_keep.numel()
    kept = int(lang_keep.sum() + vis_keep.sum())
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(kept - n * (1 - p)) < 5 * sigma, f"kept {kept} of {n} at p={p}"
    assert not torch.equal(lang_keep[0, 0], lang_keep[0, 1]), "heads share a mask"


# The kernels key Philox with 32 bits: a seed above 2**31 shows the key is unsigned (high word 0).
@pytest.mark.parametrize("seed", [11, 2**32 - 5])
def test_dropout_masks_are_the_documented_philox_stream(seed, kernel_device):
    batch, heads, lang_len, vis_len, p, offset = 2, 2, 7, 10, 0.3, 5
    lang_keep, vis_keep = xattn.dropout_keep_masks(
        seed, offset, batch, heads, lang_len, vis_len, p, kernel_device
    )
    pair = lang_len * vis_len
    bits = philox_bits(seed, offset, batch * heads * 2 * pair, kernel_device)[:, 0]
    keep = ((bits >> 8) >= reference.probability_threshold(p)).view(batch, heads, 2, pair)
    assert torch.equal(lang_keep, keep[:, :, 0].reshape(batch, heads, lang_len, vis_len))
    assert torch.equal(vis_keep, keep[:, :, 1].reshape(batch, heads, vis_len, lang_len))


def test_explicit_seeds_must_fit_the_32_bit_key(kernel_device):
    qkv = _qkv(1, 7, 10, 2, 32, torch.float32, kernel_device)
    with pytest.raises(ValueError, match=r"2\*\*32"):
        xattn.cross_attention(qkv, 7, 2, None, None, 0.1, seed=2**32)
    with pytest.raises(ValueError, match=r"2\*\*32"):
        xattn.dropout_keep_masks(-1, 0, 1, 2, 7, 10, 0.1, kernel_device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropout_matches_reference_given_the_exported_masks(dtype, kernel_device):
    batch, heads, lang_len, vis_len, p, seed = 3, 2, 7, 36, 0.2, 99
    lang, vis = _biases(batch, lang_len, vis_len, dtype, "both", kernel_device)
    masks = xattn.dropout_keep_masks(seed, 0, batch, heads, lang_len, vis_len, p, kernel_device)
    qkv = _qkv(batch, lang_len, vis_len, heads, 32, dtype, kernel_device)
    _compare(qkv, lang_len, heads, lang, vis, p=p, seed=seed, keep_masks=masks)


def test_dropout_everything(kernel_device):
    qkv = _qkv(1, 7, 10, 2, 32, torch.float32, kernel_device)
    dout = torch.randn(1, 17, 64, device=kernel_device)
    out, grad = _fused(qkv, 7, 2, None, None, dout, p=1.0, seed=1)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("layout", ["slice", "token_major"])
def test_non_contiguous_qkv_views(layout, kernel_device):
    heads, head_dim, lang_len, vis_len = 2, 32, 7, 10
    width = 3 * heads * head_dim
    if layout == "slice":  # qkv as a column slice of a wider projection output
        base = torch.randn(2, lang_len + vis_len, width + 24, device=kernel_device)

        def view(x):
            return x[:, :, 5 : 5 + width]

    else:  # a [T, B, 3*hidden] tensor seen batch-first
        base = torch.randn(lang_len + vis_len, 2, width, device=kernel_device)

        def view(x):
            return x.transpose(0, 1)

    lang, vis = _biases(2, lang_len, vis_len, torch.float32, "both", kernel_device)
    vis = vis.t().contiguous().t()  # a bias with a non-unit token stride, too
    dout = torch.randn(2, lang_len + vis_len, width // 3, device=kernel_device)
    fused_base = base.clone().requires_grad_()
    qkv = view(fused_base)
    assert not qkv.is_contiguous() and qkv.stride(-1) == 1
    out = xattn.cross_attention(qkv, lang_len, heads, lang, vis, 0.0)
    out.backward(dout)
    ref_base = base.clone().requires_grad_()
    ref_out, _, _ = reference.bidirectional_cross_attention(view(ref_base), lang_len, heads, lang, vis)
    ref_out.backward(dout)
    _check_fp32("context", out.detach(), ref_out.detach())
    _check_fp32("d(qkv)", fused_base.grad, ref_base.grad)


def test_dispatcher_runs_the_kernel_under_the_triton_backend(kernel_device):
    assert fast_path_of(ops.CROSS_ATTENTION).impl is xattn.cross_attention
    qkv = _qkv(2, 7, 10, 2, 32, torch.float32, kernel_device)
    lang, vis = _biases(2, 7, 10, torch.float32, "both", kernel_device)
    with lxmert_fast.use_backend("triton"):
        out, probs = ops.bidirectional_cross_attention(qkv, 7, 2, lang, vis, 0.0)
    assert probs is None
    assert torch.equal(out, xattn.cross_attention(qkv, 7, 2, lang, vis, 0.0))


def test_unsupported_case_raises_under_the_triton_backend(kernel_device):
    qkv = torch.randn(1, 17, 3 * 48, device=kernel_device)
    with (
        lxmert_fast.use_backend("triton"),
        pytest.raises(lxmert_fast.BackendUnavailableError, match="head_dim"),
    ):
        ops.bidirectional_cross_attention(qkv, 7, 1, None, None, 0.0)


def test_supports_names_what_it_cannot_do(kernel_device):
    qkv = torch.randn(1, 17, 3 * 64, device=kernel_device)
    assert xattn.supports(qkv, 7, 2, None, None, 0.1) is None
    assert "dtype" in xattn.supports(qkv.double(), 7, 2, None, None, 0.0)
    assert "head_dim" in xattn.supports(qkv, 7, 4, None, None, 0.0)
    strided = torch.randn(1, 17, 3 * 64, 2, device=kernel_device)[..., 0]
    assert "stride" in xattn.supports(strided, 7, 2, None, None, 0.0)
    bias = torch.zeros(1, 7, device=kernel_device, requires_grad=True)
    assert "lang_bias" in xattn.supports(qkv, 7, 2, bias, None, 0.0)
