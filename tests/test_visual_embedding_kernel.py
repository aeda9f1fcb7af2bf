"""The fused visual embedding (kernels/visual_embedding.py) against lxmert_fast.reference.

Forward and every gradient are compared with the reference on copies of the same inputs:
fp32 within 1e-5 of the largest reference magnitude; fp16/bf16 by the flash-attention
rule |fast - ref32| <= 2 |ref_lowp - ref32| + atol, where ref32 is the reference run in
fp32 on the upcast low-precision inputs; under autocast, ref_lowp is the reference under the
same autocast and the output dtype must be eager's. Dropout is compared exactly by handing the
reference the keep-mask the kernels draw (``dropout_keep_mask``), and that mask is pinned to
an independent Philox implementation (lxmert_fast.philox). Runs under the Triton
interpreter without a GPU (small hidden sizes keep it fast).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import triton
from lxmert_testing import torch_sum_forbidden

import lxmert_fast
from lxmert_fast import backend, ops, reference
from lxmert_fast.kernels import visual_embedding as ve
from lxmert_fast.philox import draw_seed, philox_bits

EPS = 1e-12
NAMES = (
    "features",
    "boxes",
    "feat_weight",
    "feat_bias",
    "feat_ln_weight",
    "feat_ln_bias",
    "box_weight",
    "box_bias",
    "box_ln_weight",
    "box_ln_bias",
)
LOW_PRECISION = [
    pytest.param(torch.float16, 2e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1.6e-2, id="bf16"),
]
# (batch, objects, dropout_p): rows B*N in {1, 36, 37, 100}, with and without dropout.
ROW_CASES = [(1, 1, 0.0), (1, 36, 0.1), (37, 1, 0.0), (4, 25, 0.1)]


def make_inputs(
    batch: int,
    objects: int,
    feat_dim: int,
    hidden: int,
    device: torch.device,
    pos_dim: int = 4,
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """Inputs in the order of the op's signature, scaled like a trained model's."""

    def rand(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, device=device) * scale + shift).to(dtype)

    return [
        rand(batch, objects, feat_dim),
        torch.rand(batch, objects, pos_dim, device=device).to(dtype),
        rand(hidden, feat_dim, scale=feat_dim**-0.5),
        rand(hidden, scale=0.1),
        rand(hidden, scale=0.1, shift=1.0),
        rand(hidden, scale=0.1),
        rand(hidden, pos_dim, scale=pos_dim**-0.5),
        rand(hidden, scale=0.1),
        rand(hidden, scale=0.1, shift=1.0),
        rand(hidden, scale=0.1),
    ]


def run(fn, inputs, grad_out, dropout_p=0.0, **kwargs) -> list[torch.Tensor]:
    """[out, *grads of every input] of ``fn`` on fresh leaf copies of ``inputs``."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves, EPS, dropout_p, **kwargs)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]


def run_fast(inputs, grad_out, dropout_p=0.0, seed=1234, offset=0):
    return run(ve.visual_embedding, inputs, grad_out, dropout_p, seed=seed, offset=offset)


def run_reference(inputs, grad_out, dropout_p=0.0, seed=1234, offset=0, dtype=None):
    inputs = [t.to(dtype) for t in inputs] if dtype is not None else inputs
    grad_out = grad_out.to(dtype) if dtype is not None else grad_out
    keep = None
    if dropout_p > 0:
        keep = ve.dropout_keep_mask(seed, offset, tuple(grad_out.shape), dropout_p, grad_out.device)
    return run(reference.visual_embedding, inputs, grad_out, dropout_p, keep_mask=keep)


def where_worst(name: str, diff: torch.Tensor, fast: torch.Tensor, ref: torch.Tensor) -> str:
    idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    return f"{name}: max error {diff.max().item():.3e} at {idx} (fast {fast[idx].item():.6g}, ref {ref[idx].item():.6g})"


def assert_fp32_close(
    fast: list[torch.Tensor],
    ref: list[torch.Tensor],
    rtol: float = 1e-5,
    names: tuple[str, ...] = ("out", *NAMES),
) -> None:
    for name, a, b in zip(names, fast, ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        diff = (a.double() - b.double()).abs()
        scale = b.double().abs().max().item()
        assert diff.max().item() <= rtol * max(scale, 1e-6), (
            where_worst(name, diff, a, b) + f", scale {scale:.3e}"
        )


def assert_lowp_close(fast, ref_lowp, ref32, atol_rel: float) -> None:
    for name, a, b, c in zip(("out", *NAMES), fast, ref_lowp, ref32, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        err = (a.double() - c.double()).abs()
        bound = 2 * (b.double() - c.double()).abs() + atol_rel * max(c.double().abs().max().item(), 1e-6)
        excess = err - bound
        assert excess.max().item() <= 0, (
            where_worst(name, err, a, c) + f", bound there {bound.flatten()[excess.argmax()]:.3e}"
        )


@pytest.mark.parametrize(("batch", "objects", "dropout_p"), ROW_CASES)
def test_fp32_matches_reference(batch, objects, dropout_p, kernel_device):
    inputs = make_inputs(batch, objects, feat_dim=64, hidden=96, device=kernel_device)
    grad_out = torch.randn(batch, objects, 96, device=kernel_device)
    assert_fp32_close(run_fast(inputs, grad_out, dropout_p), run_reference(inputs, grad_out, dropout_p))


@pytest.mark.parametrize(("dtype", "atol_rel"), LOW_PRECISION)
@pytest.mark.parametrize(("batch", "objects", "dropout_p"), ROW_CASES)
def test_low_precision_matches_reference(batch, objects, dropout_p, dtype, atol_rel, kernel_device):
    inputs = make_inputs(batch, objects, feat_dim=64, hidden=96, device=kernel_device, dtype=dtype)
    grad_out = torch.randn(batch, objects, 96, device=kernel_device).to(dtype)
    fast = run_fast(inputs, grad_out, dropout_p)
    ref_lowp = run_reference(inputs, grad_out, dropout_p)
    ref32 = run_reference(inputs, grad_out, dropout_p, dtype=torch.float32)
    assert_lowp_close(fast, ref_lowp, [t.to(dtype) for t in ref32], atol_rel)


@pytest.mark.parametrize(
    ("dtype", "dropout_p"), [(torch.float32, 0.1), (torch.bfloat16, 0.0)], ids=["fp32-dropout", "bf16"]
)
def test_lxmert_size(dtype, dropout_p, kernel_device):
    """The real 2048 -> 768 projection on a few rows (one full and one partial 4-row tile)."""
    inputs = make_inputs(1, 5, feat_dim=2048, hidden=768, device=kernel_device, dtype=dtype)
    grad_out = torch.randn(1, 5, 768, device=kernel_device).to(dtype)
    fast = run_fast(inputs, grad_out, dropout_p)
    if dtype == torch.float32:
        assert_fp32_close(fast, run_reference(inputs, grad_out, dropout_p))
    else:
        ref32 = run_reference(inputs, grad_out, dropout_p, dtype=torch.float32)
        assert_lowp_close(
            fast, run_reference(inputs, grad_out, dropout_p), [t.to(dtype) for t in ref32], 1.6e-2
        )


@pytest.mark.parametrize(
    ("hidden", "pos_dim"),
    [(16, 1), (96, 3), (130, 7), (520, 8), (1000, 4)],
    ids=["h16-p1", "h96-p3", "h130-p7", "h520-p8", "h1000-p4"],
)
def test_block_sizes_and_pos_dims(hidden, pos_dim, kernel_device):
    """Narrow to full 1024-wide rows and both BLOCK_P (4, 8), with masked columns and box dims."""
    inputs = make_inputs(3, 7, feat_dim=32, hidden=hidden, device=kernel_device, pos_dim=pos_dim)
    grad_out = torch.randn(3, 7, hidden, device=kernel_device)
    assert_fp32_close(run_fast(inputs, grad_out, 0.2), run_reference(inputs, grad_out, 0.2))


def test_non_contiguous_inputs_and_offset(kernel_device):
    base = make_inputs(5, 3, feat_dim=48, hidden=96, device=kernel_device)
    inputs = list(base)
    inputs[0] = base[0].transpose(0, 1).contiguous().transpose(0, 1)
    inputs[1] = base[1].transpose(0, 1).contiguous().transpose(0, 1)
    assert not inputs[0].is_contiguous() and not inputs[1].is_contiguous()
    grad_out = torch.randn(5, 3, 96, device=kernel_device)
    fast = run_fast(inputs, grad_out, 0.5, seed=77, offset=1000)
    assert_fp32_close(fast, run_reference(base, grad_out, 0.5, seed=77, offset=1000))


def test_partial_input_grads(kernel_device):
    """Only features and the box LayerNorm need grads: the others come back as None."""
    inputs = make_inputs(2, 9, feat_dim=32, hidden=96, device=kernel_device)
    leaves = [
        t.detach().clone().requires_grad_(name in ("features", "box_ln_weight"))
        for name, t in zip(NAMES, inputs, strict=True)
    ]
    out = ve.visual_embedding(*leaves, EPS, 0.0)
    out.backward(torch.ones_like(out))
    ref = run_reference(inputs, torch.ones_like(out))
    assert [t.grad is None for t in leaves] == [name not in ("features", "box_ln_weight") for name in NAMES]
    assert_fp32_close([leaves[0].grad, leaves[8].grad], [ref[1], ref[9]], names=("features", "box_ln_weight"))


def test_dropout_all_dropped(kernel_device):
    inputs = make_inputs(2, 4, feat_dim=32, hidden=96, device=kernel_device)
    grad_out = torch.randn(2, 4, 96, device=kernel_device)
    fast = run_fast(inputs, grad_out, 1.0)
    assert torch.count_nonzero(fast[0]) == 0
    assert all(torch.count_nonzero(g) == 0 for g in fast[1:])


def test_dropout_same_seed_identical_other_seed_differs(kernel_device):
    inputs = make_inputs(2, 36, feat_dim=32, hidden=96, device=kernel_device)
    first = ve.visual_embedding(*inputs, EPS, 0.1, seed=9)
    assert torch.equal(first, ve.visual_embedding(*inputs, EPS, 0.1, seed=9))
    assert not torch.equal(first, ve.visual_embedding(*inputs, EPS, 0.1, seed=10))


def test_dropout_seed_comes_from_torch_generator(kernel_device):
    inputs = make_inputs(2, 36, feat_dim=32, hidden=96, device=kernel_device)
    torch.manual_seed(123)
    first = ve.visual_embedding(*inputs, EPS, 0.1)
    torch.manual_seed(123)
    assert torch.equal(first, ve.visual_embedding(*inputs, EPS, 0.1))
    torch.manual_seed(124)
    assert not torch.equal(first, ve.visual_embedding(*inputs, EPS, 0.1))


@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_keep_rate_within_binomial_bounds(dropout_p, kernel_device):
    n = 64 * 768
    keep = ve.dropout_keep_mask(2024, 0, (64, 768), dropout_p, kernel_device)
    expected = n * (1 - dropout_p)
    sigma = math.sqrt(n * dropout_p * (1 - dropout_p))
    assert abs(keep.sum().item() - expected) <= 5 * sigma


@pytest.mark.parametrize(
    ("seed", "offset", "dropout_p"), [(0, 0, 0.1), (2**31 - 2, 12345, 0.5), (77, 3, 0.9)]
)
def test_keep_mask_is_documented_philox_mapping(seed, offset, dropout_p, kernel_device):
    """keep = u >= p with u = triton's uint_to_uniform_float(Philox4x32-10 word 0 at offset + i)."""
    n = 3000
    word = philox_bits(seed, offset, n)[:, 0]
    folded = torch.where(word >= 2**31, 2**32 - 1 - word, word)
    uniform = folded.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)
    expected = uniform >= torch.tensor(dropout_p, dtype=torch.float32)
    assert torch.equal(ve.dropout_keep_mask(seed, offset, (n,), dropout_p, kernel_device).cpu(), expected)


def test_backward_is_deterministic(kernel_device):
    inputs = make_inputs(4, 25, feat_dim=64, hidden=96, device=kernel_device, dtype=torch.bfloat16)
    grad_out = torch.randn(4, 25, 96, device=kernel_device).to(torch.bfloat16)
    first = run_fast(inputs, grad_out, 0.1)
    for _ in range(20 if kernel_device.type == "cuda" else 1):
        again = run_fast(inputs, grad_out, 0.1)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_parameter_grads_come_from_the_kernels_in_their_dtypes(dtype, monkeypatch, kernel_device):
    """Every parameter gradient but dW_v leaves the reduction kernel in its parameter's dtype: no
    torch reduction runs after the kernels (the GEMMs d features and dW_v are matmuls)."""
    inputs = make_inputs(3, 13, feat_dim=32, hidden=96, device=kernel_device, pos_dim=3, dtype=dtype)
    grad_out = torch.randn(3, 13, 96, device=kernel_device).to(dtype)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = ve.visual_embedding(*leaves, EPS, 0.1, seed=4)
    with torch_sum_forbidden(monkeypatch):
        grads = torch.autograd.grad(out, leaves, grad_out)
    assert [g.dtype for g in grads] == [dtype] * len(NAMES)
    fast = [out.detach(), *grads]
    if dtype == torch.float32:
        assert_fp32_close(fast, run_reference(inputs, grad_out, 0.1, seed=4))
    else:
        ref32 = run_reference(inputs, grad_out, 0.1, seed=4, dtype=torch.float32)
        ref_lowp = run_reference(inputs, grad_out, 0.1, seed=4)
        assert_lowp_close(fast, ref_lowp, [t.to(dtype) for t in ref32], 1.6e-2)


@pytest.mark.parametrize("n_partials", [0, 130])
def test_reduce_kernel_over_many_partials(n_partials, kernel_device):
    """The second stage alone, past one 64-row step of kernels/partial_sums.py (an H100 has 132
    backward programs; the interpreter runs 4) and with none (zeros); W_b's columns land in its
    [hidden, pos_dim] layout, dβ in both LayerNorm biases."""
    hidden, pos_dim = 40, 3
    partials = torch.randn(n_partials, 5 + pos_dim, hidden, device=kernel_device)
    grads = [torch.full((hidden,), float("nan"), device=kernel_device) for _ in range(7)]
    grads[3] = torch.full((hidden, pos_dim), float("nan"), device=kernel_device, dtype=torch.bfloat16)
    grid = (triton.cdiv(hidden, ve.REDUCE_COLS), 5 + pos_dim)
    ve._visual_embedding_bwd_reduce_kernel[grid](
        *grads,
        partials[:, :5].contiguous(),
        partials[:, 5:].contiguous(),
        n_partials,
        hidden,
        pos_dim,
        BLOCK_P=ve.REDUCE_ROWS,
        BLOCK_COLS=ve.REDUCE_COLS,
    )
    sums = partials.double().sum(0)
    expected = [sums[2], sums[0], sums[1], sums[5:].t(), sums[4], sums[3], sums[1]]
    for got, want in zip(grads, expected, strict=True):
        rtol = 1e-5 if got.dtype == torch.float32 else 2**-7  # one bf16 ulp: the fp32 sum, converted
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=rtol)


def test_dispatcher_runs_the_kernel_under_triton_backend(kernel_device):
    inputs = make_inputs(2, 18, feat_dim=64, hidden=96, device=kernel_device)
    grad_out = torch.randn(2, 18, 96, device=kernel_device)
    torch.manual_seed(5)
    with lxmert_fast.use_backend("triton"):
        assert backend.choose(ops.VISUAL_EMBEDDING, kernel_device, *inputs, EPS, 0.1) is ve.visual_embedding
        fast = run(ops.visual_embedding, inputs, grad_out, 0.1)
    torch.manual_seed(5)
    seed = int(draw_seed(kernel_device))
    assert_fp32_close(fast, run_reference(inputs, grad_out, 0.1, seed=seed))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("fp64", "features: dtype torch.float64"),
        ("pos_dim", "boxes: pos_dim 9"),
        ("hidden", "hidden size 1032"),
        ("mixed", "box_ln_bias: dtype torch.float16"),
        ("ln_shape", "feat_ln_weight: expected shape [96]"),
    ],
)
def test_unsupported_cases(change, reason, kernel_device):
    hidden = 1032 if change == "hidden" else 96
    inputs = make_inputs(
        1, 2, feat_dim=8, hidden=hidden, device=kernel_device, pos_dim=9 if change == "pos_dim" else 4
    )
    if change == "fp64":
        inputs = [t.double() for t in inputs]
    if change == "mixed":
        inputs[9] = inputs[9].half()
    if change == "ln_shape":
        inputs[4] = inputs[4][:95]
    assert reason in ve.supports(*inputs, EPS, 0.0)
    with (
        lxmert_fast.use_backend("triton"),
        pytest.raises(lxmert_fast.BackendUnavailableError, match=re.escape(reason)),
    ):
        ops.visual_embedding(*inputs, EPS, 0.0)


@pytest.mark.parametrize(("dtype", "atol_rel"), LOW_PRECISION)
def test_autocast_matches_eager_autocast(dtype, atol_rel, kernel_device):
    """fp32 inputs under autocast: both Linears in ``dtype``, the LayerNorms (and so the output)
    in fp32 on CUDA and in ``dtype`` on the CPU, as eager autocast runs them there."""
    inputs = make_inputs(4, 25, feat_dim=64, hidden=96, device=kernel_device)
    out_dtype = torch.float32 if kernel_device.type == "cuda" else dtype
    grad_out = torch.randn(4, 25, 96, device=kernel_device).to(out_dtype)
    with torch.autocast(kernel_device.type, dtype=dtype):
        assert ve.supports(*inputs, EPS, 0.1) is None
        fast = run_fast(inputs, grad_out, 0.1)
        ref_autocast = run_reference(inputs, grad_out, 0.1)
    ref32 = run_reference(inputs, grad_out.float(), 0.1)
    assert fast[0].dtype == out_dtype
    assert_lowp_close(
        fast, ref_autocast, [c.to(b.dtype) for b, c in zip(ref_autocast, ref32, strict=True)], atol_rel
    )


def test_supports_serves_autocast_rejects_empty_input(kernel_device):
    inputs = make_inputs(1, 2, feat_dim=8, hidden=96, device=kernel_device)
    assert ve.supports(*inputs, EPS, 0.1) is None
    mixed = [*inputs[:9], inputs[9].half()]
    assert "mixed dtypes" in ve.supports(*mixed, EPS, 0.1)
    with torch.autocast(kernel_device.type, dtype=torch.bfloat16):
        # Autocast casts every input: mixed dtypes are its normal case.
        assert ve.supports(*mixed, EPS, 0.1) is None
    empty = [inputs[0][:0], inputs[1][:0], *inputs[2:]]
    assert "no rows" in ve.supports(*empty, EPS, 0.1)


def test_seed_and_offset_out_of_int32_range_are_errors(kernel_device):
    inputs = make_inputs(1, 2, feat_dim=8, hidden=96, device=kernel_device)
    with pytest.raises(ValueError, match="offset"):
        ve.visual_embedding(*inputs, EPS, 0.1, seed=1, offset=2**31 - 100)
    with pytest.raises(ValueError, match="seed"):
        ve.visual_embedding(*inputs, EPS, 0.1, seed=2**31)
