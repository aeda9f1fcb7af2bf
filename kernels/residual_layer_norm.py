"""Fused residual + dropout + LayerNorm (forward and backward) in Triton.

Computes, over the last dimension of ``hidden`` and ``residual`` (any leading shape, ``R`` rows
of ``N`` features once flattened)::

    x   = dropout(hidden, p) + residual          rounded to promote(hidden, residual), like eager
    out = (x - mean(x)) * rstd(x) * weight + bias      statistics in fp32, out in the input dtype

exactly :func:`lxmert_fast.reference.residual_dropout_layer_norm`: the tail of every
attention-output and FFN-output block of LXMERT (eps 1e-12 there).

Layouts and dtypes
    ``hidden``, ``residual``: [R, N] views with unit stride along N and any row stride (the
    launcher copies only inputs whose last dimension is not contiguous); fp32, fp16 or bf16 each:
    a half ``hidden`` with an fp32 ``residual`` is what an autocast step passes (the residual
    stream stays fp32). ``x`` and ``out`` take ``promote(hidden, residual)``, gradients the dtype
    of their input. ``weight``, ``bias``: [N], the dtype of ``x`` or fp32. ``out`` is a new
    contiguous tensor of the input's shape. ``N <= 4096`` (one row in one block).

    A row is a 1-D block of ``BLOCK_N = 4 * BLOCK_Q`` features, the next power of two of ``N``
    (at least 128), masked past ``N``: LXMERT's 768 takes 1024 (25% idle lanes, a power of two
    being what ``tl.arange`` allows). With 16-byte-aligned pointers and row strides divisible by
    16 elements (what the launcher passes at 768) the compiler emits 16-byte loads and stores
    (``ld.global.v4.b32``, seen in the sm_90 PTX); ``num_warps = BLOCK_N / 256`` in 1..8.

Dropout randomness
    Philox4x32-10 keyed by ``seed``, the project's convention (:mod:`lxmert_fast.philox`):
    row ``r`` uses counters ``offset + r * W + q`` for ``q < W = ceil(N / 4)`` and element
    ``(r, c)`` takes word ``c % 4`` of counter ``offset + r * W + c // 4``; it is dropped when
    its word ``>> 8`` (24 bits) is below ``floor(p * 2**24)`` (the rule of
    ``reference.probability_threshold``), so the drop rate is ``p`` to within 6e-8. One Philox
    call feeds four elements: ``_keep_mask`` draws the ``BLOCK_Q`` counters of a row once and
    lays the four words out as the 1-D row with ``tl.join`` + ``tl.reshape`` (drawing counter
    ``c // 4`` per element would do the Philox work four times, and the 10 rounds of integer
    multiplies would then cost more than the memory traffic). The backward regenerates the mask
    from (seed, offset); nothing of it is stored.
    :func:`dropout_keep_mask` rebuilds the same mask in PyTorch for tests. The seed is an int64
    ``[1]`` tensor the kernels load: the dispatcher's entry point draws it per call ON THE DEVICE
    (:func:`lxmert_fast.philox.draw_seed`, offset 0), so there is no host draw or sync, a captured
    CUDA graph draws anew at every replay, and ``torch.manual_seed`` reproduces eager and compiled
    runs alike.

Registration
    ``lxmert_fast::residual_dropout_layer_norm_fwd`` (out, x, mean, rstd) and ``..._bwd`` are
    ``torch.library`` custom ops with fake kernels; autograd is registered on the forward op, so
    ``torch.compile(fullgraph=True)`` traces a call as one node each way.

Saved for backward
    ``x`` in the input dtype plus per-row fp32 ``mean`` and ``rstd``: the backward needs
    ``x_hat`` and recomputing it from ``x`` costs one read of ``N`` input-dtype values per row,
    where saving ``x_hat`` in fp32 would double that for half inputs, and re-reading
    ``hidden`` and ``residual`` would need both plus the mask. Rounding ``x`` to the input dtype
    before the statistics (as the eager add does) keeps forward and backward on the very same
    ``x``. The public entry point saves nothing when autograd is off or no input needs a gradient.

Grids
    Each program of the forward and the backward walks a contiguous range of ``rows_per_program``
    rows (the last range may be shorter; no program is empty) and loads ``weight`` (and ``bias``)
    once. Forward: ``rows_per_program = ceil(R / (16 * SMs))`` (16 four-warp programs fill an
    SM), backward: ``ceil(R / (4 * SMs))``; 8 programs when interpreted. Row range, row count
    and offset are not specialised (``do_not_specialize``): a new batch size compiles nothing.
    dW/db reduction: ``ceil(N / 32)`` programs of 4 warps.

Backward
    ``dx = rstd * (w*dy - mean(w*dy) - x_hat * mean(w*dy * x_hat))``; ``d residual = dx``,
    ``d hidden = dx * keep / (1 - p)``. Each program writes one fp32 partial row of
    ``dW = sum dy * x_hat`` and ``db = sum dy`` over its rows into ``[P, N]`` buffers; a second
    kernel (``_residual_dropout_layer_norm_bwd_reduce``, on the shared
    :func:`lxmert_fast.kernels.partial_sums.sum_partials`) sums the ``P`` partials of 32 columns per
    program, 64 partial rows at a time in a fixed order, and writes dW/db in the dtypes of
    ``weight`` and ``bias`` (zeros when ``R == 0``). No atomics and no torch ops after the
    kernels: bitwise reproducible on a given device.

Not supported (``supports`` says why): fp64, ``N > 4096``, ``weight`` of a dtype other than
``x``'s or fp32, ``bias`` of another dtype than ``weight``, CPU tensors unless
``TRITON_INTERPRET=1``.

Hazards
    ``p == 1`` drops every element (scale 0, never ``inf``). ``x`` is rounded to the input
    dtype before normalising, so half-precision results follow eager PyTorch's rounding, not an
    fp32 add; tests bound the error against an fp32 reference by twice the eager error. Two
    backward runs are bitwise equal on one device; a GPU with another SM count splits the dW/db
    sums differently (last-bit differences), and so does the interpreter's 8 programs. The
    ``[P, N]`` partials are written whole by the first kernel and read by the second on the same
    stream: nothing else orders them. A mixed-dtype row (half ``hidden``, fp32 ``residual``)
    and the backward convert layouts through shared memory (4 KiB per program at 768, at most 8 KiB
    at 4096; sm_90 compile figures).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from lxmert_fast import ops
from lxmert_fast.backend import register_fast_path
from lxmert_fast.kernels.partial_sums import REDUCE_COLS, REDUCE_ROWS, REDUCE_WARPS, sum_partials
from lxmert_fast.kernels.sm90 import KernelVariant
from lxmert_fast.philox import draw_seed, philox_bits, seed_tensor
from lxmert_fast.reference import probability_threshold

Tensor = torch.Tensor

MAX_HIDDEN = 4096
# A row block holds 4 * BLOCK_Q features (BLOCK_Q Philox counters): the next power of two of N, at
# least MIN_BLOCK_N so that narrow rows share the few variants to compile. LXMERT's 768 takes 1024.
MIN_BLOCK_N = 128
BLOCK_QS = tuple(2**k // 4 for k in range(MIN_BLOCK_N.bit_length() - 1, MAX_HIDDEN.bit_length()))
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Programs per SM. Forward: a 1024-wide row takes 4 warps, 16 such programs fill an SM's 64 warps.
# Backward: each program adds one fp32 partial row to the dW/db reduction, so fewer, longer ones.
_FWD_PROGRAMS_PER_SM = 16
_BWD_PROGRAMS_PER_SM = 4
# Interpreted: few programs, so that small test shapes still run several rows per program.
_INTERPRETER_PROGRAMS = 8


@triton.jit
def _keep_mask(seed, offset, row, n_words, threshold, BLOCK_Q: tl.constexpr):
    """Dropout keep-mask of one row (int64) as a 1-D [4 * BLOCK_Q] block.

    One Philox call per counter ``q`` yields the words of features ``4q .. 4q+3``; joining the four
    words along new minor dimensions and flattening puts word ``c % 4`` of counter ``c // 4`` at
    ``c`` without drawing any counter twice.
    """
    counter = offset + row * n_words + tl.arange(0, BLOCK_Q)
    c0 = counter.to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
    # join(join(r0, r2), join(r1, r3))[q, i, j] is word 2 * i + j of counter q.
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [4 * BLOCK_Q])
    return (words >> 8).to(tl.int32) >= threshold


@triton.jit(do_not_specialize=["n_rows", "rows_per_program", "offset", "save"])
def _residual_dropout_layer_norm_fwd(
    out_ptr,  # [R, N] contiguous, x dtype
    x_ptr,  # [R, N] contiguous, x dtype: dropout(hidden) + residual (written if save)
    mean_ptr,  # [R] fp32 (written if save)
    rstd_ptr,  # [R] fp32 (written if save)
    hidden_ptr,  # [R, N], unit stride along N
    hidden_row_stride,
    residual_ptr,  # [R, N], unit stride along N, fp32/fp16/bf16
    residual_row_stride,
    weight_ptr,  # [N]
    bias_ptr,  # [N]
    n_cols,
    n_words,  # ceil(N / 4): Philox counters per row
    n_rows,
    rows_per_program,  # program p normalises rows [p * rows_per_program, ...) below n_rows
    eps,
    seed_ptr,  # [1] int64 on the device: the Philox key (read only with dropout)
    offset,
    threshold,  # drop when the 24-bit draw is below this
    scale,  # 1 / (1 - p), 0 when p == 1
    save,  # 1 when a backward will run; a uniform branch, not a specialisation to compile
    BLOCK_Q: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, 4 * BLOCK_Q)
    mask = cols < n_cols
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)

    row_start = pid * rows_per_program
    for row in range(row_start, tl.minimum(row_start + rows_per_program, n_rows)):
        h = tl.load(hidden_ptr + row * hidden_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            keep = _keep_mask(seed, offset, row, n_words, threshold, BLOCK_Q)
            h = tl.where(keep, h * scale, 0.0)
        x_io = (h + r).to(x_ptr.dtype.element_ty)
        x = x_io.to(tl.float32)

        mean = tl.sum(x) / n_cols
        xc = tl.where(mask, x - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc) / n_cols + eps)
        y = xc * rstd * w + b
        tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)
        if save != 0:
            tl.store(x_ptr + row * n_cols + cols, x_io, mask=mask)
            tl.store(mean_ptr + row, mean)
            tl.store(rstd_ptr + row, rstd)


@triton.jit(do_not_specialize=["n_rows", "rows_per_program", "offset"])
def _residual_dropout_layer_norm_bwd(
    grad_hidden_ptr,  # [R, N] contiguous, hidden's dtype
    grad_residual_ptr,  # [R, N] contiguous, residual's dtype
    dw_partial_ptr,  # [P, N] fp32, one row per program
    db_partial_ptr,  # [P, N] fp32
    grad_out_ptr,  # [R, N], unit stride along N
    grad_out_row_stride,
    x_ptr,  # [R, N] contiguous, x dtype (saved by the forward)
    mean_ptr,  # [R] fp32
    rstd_ptr,  # [R] fp32
    weight_ptr,  # [N]
    n_cols,
    n_words,
    n_rows,
    rows_per_program,
    seed_ptr,  # [1] int64: the forward's key
    offset,
    threshold,
    scale,
    BLOCK_Q: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, 4 * BLOCK_Q)
    mask = cols < n_cols
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    dw_acc = tl.zeros([4 * BLOCK_Q], dtype=tl.float32)
    db_acc = tl.zeros([4 * BLOCK_Q], dtype=tl.float32)

    row_start = pid * rows_per_program
    for row in range(row_start, tl.minimum(row_start + rows_per_program, n_rows)):
        dy = tl.load(grad_out_ptr + row * grad_out_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
        wdy = w * dy
        c1 = tl.sum(x_hat * wdy) / n_cols
        c2 = tl.sum(wdy) / n_cols
        dx = (wdy - (x_hat * c1 + c2)) * rstd
        dw_acc += dy * x_hat
        db_acc += dy
        tl.store(
            grad_residual_ptr + row * n_cols + cols, dx.to(grad_residual_ptr.dtype.element_ty), mask=mask
        )
        if HAS_DROPOUT:
            keep = _keep_mask(seed, offset, row, n_words, threshold, BLOCK_Q)
            dx = tl.where(keep, dx * scale, 0.0)
        tl.store(grad_hidden_ptr + row * n_cols + cols, dx.to(grad_hidden_ptr.dtype.element_ty), mask=mask)

    tl.store(dw_partial_ptr + pid * n_cols + cols, dw_acc, mask=mask)
    tl.store(db_partial_ptr + pid * n_cols + cols, db_acc, mask=mask)


@triton.jit(do_not_specialize=["n_partials"])
def _residual_dropout_layer_norm_bwd_reduce(
    grad_weight_ptr,  # [N], weight's dtype
    grad_bias_ptr,  # [N], bias's dtype
    dw_partial_ptr,  # [P, N] fp32 contiguous, written by _residual_dropout_layer_norm_bwd
    db_partial_ptr,  # [P, N] fp32 contiguous
    n_cols,
    n_partials,  # P; 0 writes zeros
    BLOCK_P: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = cols < n_cols
    dw = sum_partials(dw_partial_ptr, n_cols, n_partials, cols, col_mask, BLOCK_P, BLOCK_COLS)
    db = sum_partials(db_partial_ptr, n_cols, n_partials, cols, col_mask, BLOCK_P, BLOCK_COLS)
    tl.store(grad_weight_ptr + cols, dw.to(grad_weight_ptr.dtype.element_ty), mask=col_mask)
    tl.store(grad_bias_ptr + cols, db.to(grad_bias_ptr.dtype.element_ty), mask=col_mask)


def _block_q(n_cols: int) -> int:
    return max(triton.next_power_of_2(n_cols), MIN_BLOCK_N) // 4


def _num_warps(block_q: int) -> int:
    return min(8, max(1, block_q * 4 // 256))


def _as_rows(t: Tensor) -> Tensor:
    """[..., N] -> a [R, N] view with unit stride along N (copying only when there is none)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else rows.contiguous()


def _dropout_constants(dropout_p: float) -> tuple[int, float]:
    if dropout_p >= 1.0:
        return probability_threshold(1.0), 0.0
    return probability_threshold(dropout_p), 1.0 / (1.0 - dropout_p)


def _row_split(n_rows: int, device: torch.device, programs_per_sm: int) -> tuple[int, int]:
    """(programs, rows_per_program): contiguous row ranges, none empty; (0, 1) for no rows."""
    if device.type == "cuda":
        cap = torch.cuda.get_device_properties(device).multi_processor_count * programs_per_sm
    else:
        cap = _INTERPRETER_PROGRAMS
    rows_per_program = max(1, triton.cdiv(n_rows, cap))
    return triton.cdiv(n_rows, rows_per_program), rows_per_program


def dropout_keep_mask(
    seed: int, offset: int, shape: tuple[int, ...] | torch.Size, p: float, device: torch.device | str = "cpu"
) -> Tensor:
    """The keep-mask (bool, ``shape``) the kernels draw for (seed, offset, p), rebuilt in PyTorch.

    For tests: ``reference.residual_dropout_layer_norm(..., keep_mask=dropout_keep_mask(...))``
    must match the fused op run with the same (seed, offset).
    """
    n_cols = shape[-1]
    n_rows = math.prod(shape[:-1])
    n_words = triton.cdiv(n_cols, 4)
    bits = philox_bits(seed, offset, n_rows * n_words, device).view(n_rows, n_words * 4)[:, :n_cols]
    return ((bits >> 8) >= probability_threshold(p)).view(shape)


# Registration: the two launchers are torch.library custom ops, so torch.compile sees each launch as
# one node (its fake gives the shapes) and autograd connects them; the Python entry point below only
# draws the seed.
@torch.library.custom_op("lxmert_fast::residual_dropout_layer_norm_fwd", mutates_args=())
def residual_dropout_layer_norm_forward(
    hidden: Tensor,
    residual: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    dropout_p: float,
    seed: Tensor,
    offset: int,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the forward kernel: (out, x [R, N], mean [R], rstd [R]); the last three empty unless ``save``.

    ``out`` and ``x`` take the promoted dtype of ``hidden`` and ``residual`` (eager PyTorch's add).
    """
    n_cols = hidden.shape[-1]
    h2, r2 = _as_rows(hidden), _as_rows(residual)
    n_rows = h2.shape[0]
    device = hidden.device
    x_dtype = torch.promote_types(hidden.dtype, residual.dtype)
    out = torch.empty(hidden.shape, dtype=x_dtype, device=device)
    x = torch.empty((n_rows, n_cols) if save else (0, n_cols), dtype=x_dtype, device=device)
    mean = torch.empty((x.shape[0],), dtype=torch.float32, device=device)
    rstd = torch.empty_like(mean)
    threshold, scale = _dropout_constants(dropout_p)
    block_q = _block_q(n_cols)
    programs, rows_per_program = _row_split(n_rows, device, _FWD_PROGRAMS_PER_SM)
    if programs > 0:
        _residual_dropout_layer_norm_fwd[(programs,)](
            out,
            x,
            mean,
            rstd,
            h2,
            h2.stride(0),
            r2,
            r2.stride(0),
            weight,
            bias,
            n_cols,
            triton.cdiv(n_cols, 4),
            n_rows,
            rows_per_program,
            float(eps),
            seed,
            offset,
            threshold,
            scale,
            int(save),
            BLOCK_Q=block_q,
            HAS_DROPOUT=dropout_p > 0.0,
            num_warps=_num_warps(block_q),
        )
    return out, x, mean, rstd


@torch.library.custom_op("lxmert_fast::residual_dropout_layer_norm_bwd", mutates_args=())
def residual_dropout_layer_norm_backward(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor,
    bias: Tensor,
    hidden_dtype: torch.dtype,
    residual_dtype: torch.dtype,
    dropout_p: float,
    seed: Tensor,
    offset: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the backward kernel and the dW/db reduction: (grad_hidden, grad_residual, grad_weight,
    grad_bias), the last two in the dtypes of ``weight`` and ``bias``."""
    n_rows, n_cols = x.shape
    device = x.device
    dy = _as_rows(grad_out)
    grad_hidden = torch.empty(grad_out.shape, dtype=hidden_dtype, device=device)
    grad_residual = torch.empty(grad_out.shape, dtype=residual_dtype, device=device)
    grad_weight = torch.empty_like(weight)
    grad_bias = torch.empty_like(bias)
    programs, rows_per_program = _row_split(n_rows, device, _BWD_PROGRAMS_PER_SM)
    # One fp32 partial row per program, each written whole by its program (none without rows).
    dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=device)
    db_partial = torch.empty_like(dw_partial)
    threshold, scale = _dropout_constants(dropout_p)
    block_q = _block_q(n_cols)
    if programs > 0:
        _residual_dropout_layer_norm_bwd[(programs,)](
            grad_hidden,
            grad_residual,
            dw_partial,
            db_partial,
            dy,
            dy.stride(0),
            x,
            mean,
            rstd,
            weight,
            n_cols,
            triton.cdiv(n_cols, 4),
            n_rows,
            rows_per_program,
            seed,
            offset,
            threshold,
            scale,
            BLOCK_Q=block_q,
            HAS_DROPOUT=dropout_p > 0.0,
            num_warps=_num_warps(block_q),
        )
    _residual_dropout_layer_norm_bwd_reduce[(triton.cdiv(n_cols, REDUCE_COLS),)](
        grad_weight,
        grad_bias,
        dw_partial,
        db_partial,
        n_cols,
        programs,
        BLOCK_P=REDUCE_ROWS,
        BLOCK_COLS=REDUCE_COLS,
        num_warps=REDUCE_WARPS,
    )
    return grad_hidden, grad_residual, grad_weight, grad_bias


@residual_dropout_layer_norm_forward.register_fake
def _fwd_fake(hidden, residual, weight, bias, eps, dropout_p, seed, offset, save):
    n_cols = hidden.shape[-1]
    x_dtype = torch.promote_types(hidden.dtype, residual.dtype)
    rows = hidden.numel() // n_cols if save else 0
    out = hidden.new_empty(hidden.shape, dtype=x_dtype)
    x = hidden.new_empty((rows, n_cols), dtype=x_dtype)
    mean = hidden.new_empty((rows,), dtype=torch.float32)
    return out, x, mean, torch.empty_like(mean)


@residual_dropout_layer_norm_backward.register_fake
def _bwd_fake(grad_out, x, mean, rstd, weight, bias, hidden_dtype, residual_dtype, dropout_p, seed, offset):
    return (
        grad_out.new_empty(grad_out.shape, dtype=hidden_dtype),
        grad_out.new_empty(grad_out.shape, dtype=residual_dtype),
        torch.empty_like(weight),
        torch.empty_like(bias),
    )


def _setup_context(ctx, inputs, output) -> None:
    hidden, residual, weight, bias, _eps, dropout_p, seed, offset, _save = inputs
    _out, x, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, weight, bias, seed)
    ctx.dtypes = (hidden.dtype, residual.dtype)
    ctx.dropout = (dropout_p, offset)


def _backward(ctx, grad_out: Tensor, _grad_x, _grad_mean, _grad_rstd):
    x, mean, rstd, weight, bias, seed = ctx.saved_tensors
    dropout_p, offset = ctx.dropout
    grads = residual_dropout_layer_norm_backward(
        grad_out, x, mean, rstd, weight, bias, *ctx.dtypes, dropout_p, seed, offset
    )
    return (*grads, None, None, None, None, None)


residual_dropout_layer_norm_forward.register_autograd(_backward, setup_context=_setup_context)


def residual_dropout_layer_norm(
    hidden: Tensor,
    residual: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    dropout_p: float = 0.0,
    *,
    seed: int | Tensor | None = None,
    offset: int = 0,
) -> Tensor:
    """Fused ``LayerNorm(dropout(hidden) + residual)``; the dispatcher's fast path.

    ``dropout_p > 0`` means training: unless ``seed`` is given, a fresh one is drawn on the
    device (:func:`lxmert_fast.philox.draw_seed`). Without autograd (no grad mode, or no input
    requiring a gradient) nothing is saved for a backward.
    """
    if seed is None:
        seed = (
            draw_seed(hidden.device)
            if dropout_p > 0.0
            else torch.zeros(1, dtype=torch.int64, device=hidden.device)
        )
    else:
        seed = seed_tensor(seed, hidden.device)
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (hidden, residual, weight, bias))
    return residual_dropout_layer_norm_forward(
        hidden, residual, weight, bias, eps, dropout_p, seed, offset, save
    )[0]


def supports(
    hidden: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, eps: float, dropout_p: float = 0.0
) -> str | None:
    """``None`` when the fused kernels can serve this call, else the reason they cannot."""
    if hidden.dtype not in KERNEL_DTYPES:
        return f"hidden: dtype {hidden.dtype} is not one of fp32, fp16, bf16"
    if residual.dtype not in KERNEL_DTYPES:
        return f"residual: dtype {residual.dtype} is not one of fp32, fp16, bf16"
    x_dtype = torch.promote_types(hidden.dtype, residual.dtype)
    if weight.dtype not in (x_dtype, torch.float32):
        return f"weight: dtype {weight.dtype} is neither the sum's {x_dtype} nor fp32"
    if bias.dtype != weight.dtype:
        return f"bias: dtype {bias.dtype} differs from weight's {weight.dtype}"
    n_cols = hidden.shape[-1]
    if not 0 < n_cols <= MAX_HIDDEN:
        return f"hidden: last dimension {n_cols} is outside 1..{MAX_HIDDEN}"
    if hidden.device.type == "cpu" and not _INTERPRETED:
        return "CPU tensors need TRITON_INTERPRET=1 set before the kernels are imported"
    if hidden.device.type not in ("cpu", "cuda"):
        return f"hidden: device {hidden.device} is neither CUDA nor CPU"
    return None


_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def sm90_variants() -> list[KernelVariant]:
    """Every specialisation the launchers can pick: dtype x weight dtype x BLOCK_Q x dropout, fwd and
    bwd, each with the arguments of LXMERT pre-training (contiguous rows; the widest row a block
    serves where LXMERT's 768 picks another block), then the dW/db reduction per weight dtype."""
    # (hidden, residual, weight) dtypes: uniform, fp32 weights, and autocast's fp32 residual stream.
    combos = [(d, d, w) for d in KERNEL_DTYPES for w in dict.fromkeys((d, torch.float32))]
    combos += [(d, torch.float32, torch.float32) for d in (torch.float16, torch.bfloat16)]
    variants = []
    for dtype, res_dtype, w_dtype in combos:
        name = f"{_TRITON_DTYPES[dtype]}_r{_TRITON_DTYPES[res_dtype]}_w{_TRITON_DTYPES[w_dtype]}"
        for block_q, has_dropout in ((b, d) for b in BLOCK_QS for d in (False, True)):
            for direction, fn, args in (
                ("fwd", _residual_dropout_layer_norm_fwd, _fwd_args),
                ("bwd", _residual_dropout_layer_norm_bwd, _bwd_args),
            ):
                variants.append(
                    KernelVariant(
                        name=f"residual_ln_{direction}_{name}_n{4 * block_q}_drop{int(has_dropout)}",
                        fn=fn,
                        args=args(dtype, res_dtype, w_dtype, block_q, has_dropout),
                        options={"num_warps": _num_warps(block_q)},
                    )
                )
    for w_dtype in KERNEL_DTYPES:
        variants.append(
            KernelVariant(
                name=f"residual_ln_bwd_reduce_w{_TRITON_DTYPES[w_dtype]}",
                fn=_residual_dropout_layer_norm_bwd_reduce,
                args=_reduce_args(w_dtype),
                options={"num_warps": REDUCE_WARPS},
            )
        )
    return variants


def _row_args(block_q: int, has_dropout: bool, programs_per_sm: int) -> dict:
    """Row width, row split and dropout scalars as the launchers pass them at the vision stream's
    B * 36 rows; a fresh seed each call."""
    from lxmert_fast.kernels.sm90 import BATCH, BOXES, DROPOUT_P, H100_SMS, HIDDEN

    n_cols = HIDDEN if _block_q(HIDDEN) == block_q else 4 * block_q
    n_rows = BATCH * BOXES
    threshold, scale = _dropout_constants(DROPOUT_P if has_dropout else 0.0)
    return {
        "n_cols": n_cols,
        "n_words": triton.cdiv(n_cols, 4),
        "n_rows": n_rows,
        "rows_per_program": triton.cdiv(n_rows, H100_SMS * programs_per_sm),
        "seed_ptr": torch.int64,
        "offset": 0,
        "threshold": threshold,
        "scale": scale,
        "BLOCK_Q": block_q,
        "HAS_DROPOUT": has_dropout,
    }


def _fwd_args(
    dtype: torch.dtype, res_dtype: torch.dtype, w_dtype: torch.dtype, block_q: int, has_dropout: bool
) -> dict:
    rows = _row_args(block_q, has_dropout, _FWD_PROGRAMS_PER_SM)
    x_dtype = torch.promote_types(dtype, res_dtype)
    return {
        **rows,
        "out_ptr": x_dtype,
        "x_ptr": x_dtype,
        "mean_ptr": torch.float32,
        "rstd_ptr": torch.float32,
        "hidden_ptr": dtype,
        "hidden_row_stride": rows["n_cols"],
        "residual_ptr": res_dtype,
        "residual_row_stride": rows["n_cols"],
        "weight_ptr": w_dtype,
        "bias_ptr": w_dtype,
        "eps": 1e-12,
        "save": 1,
    }


def _bwd_args(
    dtype: torch.dtype, res_dtype: torch.dtype, w_dtype: torch.dtype, block_q: int, has_dropout: bool
) -> dict:
    rows = _row_args(block_q, has_dropout, _BWD_PROGRAMS_PER_SM)
    return {
        **rows,
        "grad_hidden_ptr": dtype,
        "grad_residual_ptr": res_dtype,
        "dw_partial_ptr": torch.float32,
        "db_partial_ptr": torch.float32,
        "grad_out_ptr": torch.promote_types(dtype, res_dtype),
        "grad_out_row_stride": rows["n_cols"],
        "x_ptr": torch.promote_types(dtype, res_dtype),
        "mean_ptr": torch.float32,
        "rstd_ptr": torch.float32,
        "weight_ptr": w_dtype,
    }


def _reduce_args(w_dtype: torch.dtype) -> dict:
    """LXMERT's 768 columns over the backward's one partial row per program."""
    from lxmert_fast.kernels.sm90 import H100_SMS, HIDDEN

    return {
        "grad_weight_ptr": w_dtype,
        "grad_bias_ptr": w_dtype,
        "dw_partial_ptr": torch.float32,
        "db_partial_ptr": torch.float32,
        "n_cols": HIDDEN,
        "n_partials": H100_SMS * _BWD_PROGRAMS_PER_SM,
        "BLOCK_P": REDUCE_ROWS,
        "BLOCK_COLS": REDUCE_COLS,
    }


register_fast_path(ops.RESIDUAL_LAYER_NORM, residual_dropout_layer_norm, supports)
