"""The fused residual + dropout + LayerNorm kernels against lxmert_fast.reference.

Forward and all four gradients (hidden, residual, weight, bias) are compared on copied inputs.
fp32 must agree to 1e-5; fp16/bf16 are held to an fp32 reference run on the same (rounded)
inputs, within twice the error of the reference run in the low precision plus one unit in the
last place at the tensor's largest magnitude. Dropout is compared exactly: the keep-mask the
kernels draw is rebuilt with ``dropout_keep_mask`` and handed to the reference.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from lxmert_testing import torch_sum_forbidden

import lxmert_fast
from lxmert_fast import ops, reference
from lxmert_fast.kernels import residual_layer_norm as rln
from lxmert_fast.philox import draw_seed

EPS = 1e-12
LOW_PRECISION = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float32, *LOW_PRECISION)
NAMES = ("out", "grad_hidden", "grad_residual", "grad_weight", "grad_bias")


def make_inputs(shape: tuple[int, ...], device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """fp32 masters: a residual with an offset mean so the centring matters, weights around 1.

    Drawn on the CPU from a seeded generator, so every device tests the same numbers."""
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    masters = {
        "hidden": torch.randn(shape, generator=g),
        "residual": 2.0 * torch.randn(shape, generator=g) + 0.5,
        "weight": 1.0 + 0.5 * torch.randn(n, generator=g),
        "bias": 0.5 * torch.randn(n, generator=g),
        "grad_out": torch.randn(shape, generator=g),
    }
    return {name: t.to(device) for name, t in masters.items()}


def _leaves(inputs, dtype, weight_dtype):
    return [
        inputs["hidden"].to(dtype).requires_grad_(),
        inputs["residual"].to(dtype).requires_grad_(),
        inputs["weight"].to(weight_dtype).requires_grad_(),
        inputs["bias"].to(weight_dtype).requires_grad_(),
    ]


def run_fast(inputs, dtype, weight_dtype=None, p=0.0, seed=0, offset=0):
    """(out, grad_hidden, grad_residual, grad_weight, grad_bias) of the fused op."""
    leaves = _leaves(inputs, dtype, weight_dtype or dtype)
    out = rln.residual_dropout_layer_norm(*leaves, EPS, p, seed=seed, offset=offset)
    grads = torch.autograd.grad(out, leaves, inputs["grad_out"].to(dtype))
    return (out, *grads)


def run_reference(inputs, dtype, weight_dtype=None, p=0.0, keep_mask=None, compute_dtype=None):
    """The reference on the inputs rounded to ``dtype``, computed in ``compute_dtype`` or wider."""
    compute_dtype = compute_dtype or dtype
    weight_dtype = weight_dtype or dtype
    leaves = [
        t.detach().to(torch.promote_types(t.dtype, compute_dtype)).requires_grad_()
        for t in _leaves(inputs, dtype, weight_dtype)
    ]
    out = reference.residual_dropout_layer_norm(*leaves, EPS, p, keep_mask)
    grads = torch.autograd.grad(out, leaves, inputs["grad_out"].to(dtype).to(compute_dtype))
    return (out, *grads)


def _report(name: str, fast: torch.Tensor, ref: torch.Tensor, excess: torch.Tensor) -> str:
    worst = int(excess.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), excess.shape))
    bad = int((excess > 0).sum())
    return (
        f"{name}: {bad}/{excess.numel()} elements out of bounds; worst at {index}: "
        f"fast {fast.flatten()[worst].item():.6g}, reference {ref.flatten()[worst].item():.6g}, "
        f"max |diff| {(fast - ref).abs().max().item():.3g}"
    )


def assert_matches(fast_results, inputs, dtype, weight_dtype=None, p=0.0, keep_mask=None) -> dict[str, float]:
    """Check every output against the reference; returns the max |fast - ref32| per output."""
    ref32 = run_reference(inputs, dtype, weight_dtype, p, keep_mask, compute_dtype=torch.float32)
    low = None if dtype == torch.float32 else run_reference(inputs, dtype, weight_dtype, p, keep_mask)
    errors = {}
    for i, name in enumerate(NAMES):
        fast, ref = fast_results[i].float(), ref32[i].detach()
        assert fast.shape == ref.shape, f"{name}: shape {tuple(fast.shape)} != {tuple(ref.shape)}"
        diff = (fast - ref).abs()
        if low is None:
            bound = 1e-5 + 1e-5 * ref.abs()
        else:
            ulp_at_max = torch.finfo(dtype).eps * ref.abs().max().clamp(min=1.0)
            bound = 2.0 * (low[i].detach().float() - ref).abs() + ulp_at_max
        excess = diff - bound
        assert not (excess > 0).any(), _report(name, fast, ref, excess)
        errors[name] = diff.max().item() if diff.numel() else 0.0
    return errors


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("hidden_size", [32, 100, 768])
@pytest.mark.parametrize("rows", [1, 7, 36, 100])
def test_forward_and_grads_match_reference(rows, hidden_size, dtype, kernel_device):
    inputs = make_inputs((rows, hidden_size), kernel_device)
    assert_matches(run_fast(inputs, dtype), inputs, dtype)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_fp32_weight_with_half_inputs(dtype, kernel_device):
    inputs = make_inputs((7, 100), kernel_device)
    results = run_fast(inputs, dtype, weight_dtype=torch.float32)
    assert results[0].dtype == dtype
    assert results[3].dtype == results[4].dtype == torch.float32
    assert_matches(results, inputs, dtype, weight_dtype=torch.float32)


@pytest.mark.parametrize(
    ("shape", "dtype", "offset"),
    [
        ((7, 100), torch.float32, 77),
        ((36, 768), torch.float32, 77),
        ((2, 3, 33), torch.float32, 77),
        ((7, 100), torch.float32, 2**32 - 50),  # counters cross into the high Philox word
        ((7, 100), torch.float16, 77),
        ((7, 100), torch.bfloat16, 77),
    ],
    ids=str,
)
def test_dropout_matches_reference_with_exported_mask(shape, dtype, offset, kernel_device):
    p, seed = 0.1, 1234
    inputs = make_inputs(shape, kernel_device)
    results = run_fast(inputs, dtype, p=p, seed=seed, offset=offset)
    keep = rln.dropout_keep_mask(seed, offset, shape, p, kernel_device)
    # Every dropped element has a zero hidden gradient and no kept one does: the masks agree exactly.
    assert torch.equal(results[1] != 0, keep)
    assert_matches(results, inputs, dtype, p=p, keep_mask=keep)


def test_dropout_same_seed_identical_other_seed_differs(kernel_device):
    inputs = make_inputs((7, 100), kernel_device)
    first = run_fast(inputs, torch.float32, p=0.3, seed=42)
    again = run_fast(inputs, torch.float32, p=0.3, seed=42)
    other = run_fast(inputs, torch.float32, p=0.3, seed=43)
    shifted = run_fast(inputs, torch.float32, p=0.3, seed=42, offset=1)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first[1] != 0, other[1] != 0)
    assert not torch.equal(first[1] != 0, shifted[1] != 0)


def _assert_binomial(kept: int, n: int, p: float, sigmas: float = 5.0) -> None:
    expected, std = n * (1 - p), math.sqrt(n * p * (1 - p))
    assert abs(kept - expected) <= sigmas * std, f"kept {kept} of {n}, expected {expected:.0f} ± {std:.0f}"


def test_keep_rate_within_binomial_bounds(kernel_device):
    # The kernels draw exactly this mask (test_dropout_matches_reference_with_exported_mask).
    for p in (0.1, 0.5, 0.9):
        mask = rln.dropout_keep_mask(11, 0, (400, 1000), p, kernel_device)
        _assert_binomial(int(mask.sum()), mask.numel(), p)
        # Each of the four Philox words feeds one column class: all four must be unbiased.
        for word in range(4):
            column_class = mask[:, word::4]
            _assert_binomial(int(column_class.sum()), column_class.numel(), p)
        assert not torch.equal(mask[0], mask[1]), "rows must draw different masks"


def test_dropout_p_one_drops_everything(kernel_device):
    inputs = make_inputs((7, 100), kernel_device)
    results = run_fast(inputs, torch.float32, p=1.0, seed=5)
    assert torch.equal(results[1], torch.zeros_like(results[1]))
    assert all(torch.isfinite(r).all() for r in results)
    drop_all = torch.zeros(7, 100, dtype=torch.bool, device=kernel_device)
    assert_matches(results, inputs, torch.float32, p=1.0, keep_mask=drop_all)


def test_backward_twice_is_bitwise_equal(kernel_device):
    inputs = make_inputs((36, 100), kernel_device)
    leaves = _leaves(inputs, torch.bfloat16, torch.bfloat16)
    out = rln.residual_dropout_layer_norm(*leaves, EPS, 0.1, seed=99)
    grad_out = inputs["grad_out"].to(torch.bfloat16)
    first = torch.autograd.grad(out, leaves, grad_out, retain_graph=True)
    second = torch.autograd.grad(out, leaves, grad_out)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_no_grad_forward_saves_nothing_and_equals_training_forward(monkeypatch, kernel_device):
    inputs = make_inputs((7, 100), kernel_device)
    args = (inputs["hidden"], inputs["residual"], inputs["weight"], inputs["bias"], EPS, 0.2)
    saves = []
    launcher = rln.residual_dropout_layer_norm_forward

    def spy(*a):
        saves.append(a[-1])  # the launcher's last argument: save
        return launcher(*a)

    monkeypatch.setattr(rln, "residual_dropout_layer_norm_forward", spy)
    with torch.no_grad():
        plain = rln.residual_dropout_layer_norm(*args, seed=3)
    tracked = rln.residual_dropout_layer_norm(args[0].clone().requires_grad_(), *args[1:], seed=3)
    assert saves == [False, True]
    assert torch.equal(plain, tracked.detach())


def test_non_contiguous_inputs_and_grad(kernel_device):
    shape = (2, 5, 48)
    inputs = make_inputs(shape, kernel_device)
    hidden_wide = torch.cat((inputs["hidden"], torch.randn(shape, device=kernel_device)), dim=-1)
    hidden = hidden_wide[..., :48].requires_grad_()  # row-strided view: read in place
    residual = inputs["residual"].transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    weight = inputs["weight"].clone().requires_grad_()
    bias = inputs["bias"].clone().requires_grad_()
    grad_out = inputs["grad_out"].transpose(0, 1).contiguous().transpose(0, 1)
    assert not hidden.is_contiguous() and not residual.is_contiguous() and not grad_out.is_contiguous()
    out = rln.residual_dropout_layer_norm(hidden, residual, weight, bias, EPS)
    grads = torch.autograd.grad(out, (hidden, residual, weight, bias), grad_out)
    assert out.shape == shape and out.is_contiguous()
    assert_matches((out, *grads), inputs, torch.float32)


def test_column_major_hidden_is_copied(kernel_device):
    inputs = make_inputs((6, 40), kernel_device)
    hidden = inputs["hidden"].t().contiguous().t().requires_grad_()  # last dim not contiguous
    leaves = [hidden, *_leaves(inputs, torch.float32, torch.float32)[1:]]
    out = rln.residual_dropout_layer_norm(*leaves, EPS)
    grads = torch.autograd.grad(out, leaves, inputs["grad_out"])
    assert_matches((out, *grads), inputs, torch.float32)


def test_zero_rows(kernel_device):
    inputs = make_inputs((0, 32), kernel_device)
    results = run_fast(inputs, torch.float32)
    assert results[0].shape == (0, 32)
    zeros = torch.zeros(32, device=kernel_device)
    assert torch.equal(results[3], zeros) and torch.equal(results[4], zeros)


def test_dispatcher_uses_kernel_under_triton_backend(kernel_device):
    inputs = make_inputs((3, 4, 100), kernel_device)
    args = (inputs["hidden"], inputs["residual"], inputs["weight"], inputs["bias"], EPS)
    with lxmert_fast.use_backend("triton"):
        out = ops.residual_dropout_layer_norm(*args, 0.0)
        torch.manual_seed(123)
        dropped = ops.residual_dropout_layer_norm(*args, 0.25)
        torch.manual_seed(123)
        dropped_again = ops.residual_dropout_layer_norm(*args, 0.25)
    torch.testing.assert_close(out, reference.residual_dropout_layer_norm(*args), atol=1e-5, rtol=1e-5)
    assert torch.equal(dropped, dropped_again), "torch.manual_seed must reproduce the dropout draw"
    torch.manual_seed(123)
    seed = int(draw_seed(kernel_device))  # the entry point draws its seed on the device
    keep = rln.dropout_keep_mask(seed, 0, (3, 4, 100), 0.25, kernel_device)
    expected = reference.residual_dropout_layer_norm(*args, 0.25, keep)
    torch.testing.assert_close(dropped, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"dtype": torch.float64}, "fp32, fp16, bf16"),
        ({"hidden_size": 4097}, "last dimension 4097"),
        ({"residual_dtype": torch.float64}, "residual: dtype"),
        ({"weight_dtype": torch.float16}, "weight: dtype"),
        ({"bias_dtype": torch.float32}, "bias: dtype"),
    ],
    ids=["fp64", "too-wide", "residual-dtype", "weight-dtype", "bias-dtype"],
)
def test_unsupported_case_raises_under_triton_backend(change, reason, kernel_device):
    dtype = change.get("dtype", torch.bfloat16)
    n = change.get("hidden_size", 16)
    hidden = torch.randn(2, n, dtype=dtype, device=kernel_device)
    residual = torch.randn(2, n, dtype=change.get("residual_dtype", dtype), device=kernel_device)
    weight = torch.ones(n, dtype=change.get("weight_dtype", dtype), device=kernel_device)
    bias = torch.zeros(n, dtype=change.get("bias_dtype", weight.dtype), device=kernel_device)
    assert reason in rln.supports(hidden, residual, weight, bias, EPS, 0.0)
    with lxmert_fast.use_backend("triton"), pytest.raises(lxmert_fast.BackendUnavailableError, match=reason):
        ops.residual_dropout_layer_norm(hidden, residual, weight, bias, EPS, 0.0)


def test_bad_shape_names_the_argument(kernel_device):
    hidden = torch.randn(2, 16, device=kernel_device)
    residual = torch.randn(2, 8, device=kernel_device)
    weight, bias = torch.ones(16, device=kernel_device), torch.zeros(16, device=kernel_device)
    with lxmert_fast.use_backend("triton"), pytest.raises(ValueError, match="residual"):
        ops.residual_dropout_layer_norm(hidden, residual, weight, bias, EPS)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_fp32_residual_with_half_hidden_as_under_autocast(dtype, kernel_device):
    # Under autocast the residual stream stays fp32 while the dense output is half: served, in fp32.
    inputs = make_inputs((36, 100), kernel_device)
    leaves = [inputs["hidden"].to(dtype), inputs["residual"], inputs["weight"], inputs["bias"]]
    leaves = [t.clone().requires_grad_() for t in leaves]
    assert rln.supports(*leaves, EPS, 0.1) is None
    out = rln.residual_dropout_layer_norm(*leaves, EPS, 0.1, seed=5)
    grads = torch.autograd.grad(out, leaves, inputs["grad_out"])
    assert out.dtype == torch.float32
    assert [g.dtype for g in grads] == [dtype, torch.float32, torch.float32, torch.float32]
    # The half hidden is exact in fp32, so the fp32 reference on the same values is the oracle.
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    keep = rln.dropout_keep_mask(5, 0, (36, 100), 0.1, kernel_device)
    ref = reference.residual_dropout_layer_norm(*ref_leaves, EPS, 0.1, keep)
    ref_grads = torch.autograd.grad(ref, ref_leaves, inputs["grad_out"])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for name, g, r in zip(NAMES[1:], grads, ref_grads, strict=True):
        tol = torch.finfo(g.dtype).eps * r.abs().max().clamp(min=1.0).item()
        torch.testing.assert_close(g.float(), r, atol=max(tol, 1e-5), rtol=1e-5, msg=name)


def test_custom_ops_pass_opcheck(kernel_device):
    inputs = make_inputs((5, 48), kernel_device)
    seed = torch.tensor([77], dtype=torch.int64, device=kernel_device)
    hidden, residual, weight, bias = (
        inputs[k].clone().requires_grad_() for k in ("hidden", "residual", "weight", "bias")
    )
    for p in (0.0, 0.2):
        torch.library.opcheck(
            rln.residual_dropout_layer_norm_forward, (hidden, residual, weight, bias, EPS, p, seed, 0, True)
        )
    _out, x, mean, rstd = rln.residual_dropout_layer_norm_forward(
        hidden, residual, weight, bias, EPS, 0.2, seed, 0, True
    )
    args = (inputs["grad_out"], *(t.detach() for t in (x, mean, rstd, weight, bias)))
    torch.library.opcheck(
        rln.residual_dropout_layer_norm_backward, (*args, torch.float32, torch.float32, 0.2, seed, 0)
    )


def test_fullgraph_compile_draws_seeds_on_the_device(kernel_device):
    # The seed comes from the device generator inside the traced graph: no graph break, the same
    # torch.manual_seed reproduces the eager draw, and the next call draws a new mask.
    inputs = make_inputs((6, 64), kernel_device)
    leaves = [inputs[k].clone().requires_grad_() for k in ("hidden", "residual", "weight", "bias")]

    def step(hidden, residual, weight, bias):
        return ops.residual_dropout_layer_norm(hidden, residual, weight, bias, EPS, 0.3)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    with lxmert_fast.use_backend("triton"):
        for fn in (step, compiled):
            torch.manual_seed(11)
            out = fn(*leaves)
            results.append((out, *torch.autograd.grad(out, leaves, inputs["grad_out"])))
        again = compiled(*leaves)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(again, results[1][0])


@pytest.mark.parametrize("rows", [0, 1, 3, 7, 10])
def test_rows_per_program_edges(rows, monkeypatch, kernel_device):
    # Three programs at most: 7 and 10 rows leave the last program a short range, 1 row a single
    # program, 0 rows no forward program and an empty dW/db reduction.
    if kernel_device.type == "cuda":
        monkeypatch.setattr(
            torch.cuda, "get_device_properties", lambda _d: SimpleNamespace(multi_processor_count=1)
        )
        monkeypatch.setattr(rln, "_FWD_PROGRAMS_PER_SM", 3)
        monkeypatch.setattr(rln, "_BWD_PROGRAMS_PER_SM", 3)
    else:
        monkeypatch.setattr(rln, "_INTERPRETER_PROGRAMS", 3)
    programs, per_program = rln._row_split(rows, kernel_device, 3)
    assert (programs <= 3 and (programs - 1) * per_program < rows <= programs * per_program) or rows == 0
    inputs = make_inputs((rows, 100), kernel_device)
    p, seed = 0.2, 21
    results = run_fast(inputs, torch.float32, p=p, seed=seed, offset=5)
    keep = rln.dropout_keep_mask(seed, 5, (rows, 100), p, kernel_device)
    assert_matches(results, inputs, torch.float32, p=p, keep_mask=keep)


@pytest.mark.parametrize(
    ("dtype", "weight_dtype"),
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)],
    ids=str,
)
def test_weight_grads_come_from_the_kernels_in_the_weights_dtype(
    dtype, weight_dtype, monkeypatch, kernel_device
):
    # The backward's dW/db come out of the reduction kernel in their final dtype: no torch
    # reduction runs after the kernels (casts cannot be forbidden: the interpreter copies with .to).
    inputs = make_inputs((36, 100), kernel_device)
    leaves = _leaves(inputs, dtype, weight_dtype)
    out = rln.residual_dropout_layer_norm(*leaves, EPS, 0.1, seed=8)
    with torch_sum_forbidden(monkeypatch):
        grads = torch.autograd.grad(out, leaves, inputs["grad_out"].to(dtype))
    assert grads[2].dtype == grads[3].dtype == weight_dtype
    keep = rln.dropout_keep_mask(8, 0, (36, 100), 0.1, kernel_device)
    assert_matches((out, *grads), inputs, dtype, weight_dtype=weight_dtype, p=0.1, keep_mask=keep)
