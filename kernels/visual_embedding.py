"""Fused LXMERT visual embedding, forward and backward.

Computes, for features ``[B, N, feat_dim]`` and boxes ``[B, N, pos_dim]``::

    out = dropout((LN_v(features·W_vᵀ + b_v) + LN_b(boxes·W_bᵀ + b_b)) / 2)   # [B, N, hidden]

exactly :func:`lxmert_fast.reference.visual_embedding`. Rows are ``M = B * N`` objects.

Forward: the ``feat_dim -> hidden`` projection is one cuBLAS ``addmm`` (``F.linear``); then
one row kernel reads each projected row once and does the ``pos_dim -> hidden`` box
projection as FMAs, both LayerNorms with fp32 statistics, the average and inverted
dropout, and writes the output plus the per-row ``mean``/``rstd`` of both LayerNorms (fp32).

Backward: one row kernel regenerates the dropout mask, runs both LayerNorm backwards and
writes ``d(features·W_vᵀ + b_v)`` (projection dtype) and ``d boxes`` (``pos_dim`` is tiny, so
``dy·W_b`` is an in-register reduction). Every program keeps fp32 partial rows of the
gradients of both LayerNorm weights, the (shared) LayerNorm bias gradient, ``b_v``, ``b_b``
and ``W_b`` and writes them to ``[programs, 5, hidden]`` and ``[programs, pos_dim, hidden]``
fp32 buffers; a second kernel (``_visual_embedding_bwd_reduce_kernel``, on the shared
:func:`lxmert_fast.kernels.partial_sums.sum_partials`) sums them, program ``(c, j)`` partial
row ``j`` of the ``5 + pos_dim`` over 32 columns, 64 partials at a time in a fixed order (one
launch of ``ceil(hidden / 32) x (5 + pos_dim)`` programs of 4 warps), and writes every parameter
gradient in its parameter's dtype (``W_b``'s transposed into its ``[hidden, pos_dim]``
layout, the LayerNorm bias gradient once per bias): deterministic, no atomics, no torch ops
after the kernels. So the box projection's output gradient never goes to memory (the brief's
``dproj_b`` GEMMs would write and re-read an ``[M, hidden]`` tensor for ``pos_dim`` MACs per
element). ``d features = dproj·W_v`` and ``dW_v = dprojᵀ·features`` are cuBLAS GEMMs, the only
torch work of the backward. Saved for backward: the
``[M, hidden]`` projection (as eager PyTorch saves it for its LayerNorm), the features (only
when ``W_v`` needs a gradient), the boxes and the ``[4, M]`` fp32 stats; the box projection is
recomputed.

Both row kernels are persistent: each program walks its rows in ``[BLOCK_M, BLOCK_H] = [4,
1024]`` tiles (several rows' loads in flight per program; one tile width for every hidden
size up to 1024, so the launcher picks among 40 variants) and re-reads the ``W_b`` column it
needs from L1 per tile rather than pinning a ``[BLOCK_H, BLOCK_P]`` tile in registers. The
sm_90 compile check (tests/test_compile_sm90.py) reports about 200 (forward) / 240 (backward)
registers per thread at 8 warps, half precision, ``pos_dim`` 4, no spills: one program per SM
at a time, four rows in flight. The backward at ``BLOCK_P`` 8 (``pos_dim`` 5..8) takes two
rows per step: four spilled (253-255 registers now, none spilled). The reduction of the
partials: 40 registers at 4 warps, no spills, one variant per dtype pair. Not yet timed on a
GPU: ``BLOCK_M``/``num_warps`` are the knobs to tune.

Layouts: the projection, output and gradient rows are ``[M, hidden]`` with unit column
stride and a row stride argument; boxes ``[M, pos_dim]`` likewise; ``W_b`` is ``[hidden,
pos_dim]`` contiguous (``nn.Linear`` layout); LayerNorm parameters ``[hidden]`` contiguous.

Dtypes: fp32, fp16, bf16. The kernels take two: the GEMM dtype (projection, boxes, ``W_b``,
``b_b`` and their gradients) and the LayerNorm dtype (LayerNorm parameters, output and its
gradient); statistics, the box projection and all partial sums are fp32, and each output is
rounded once. Outside autocast every tensor of a call has one dtype. Autocast (issue #11) is
served as eager PyTorch runs it: :func:`visual_embedding` casts features, boxes and both
Linears' parameters to the autocast dtype (autocast runs ``linear`` there) and the LayerNorm
parameters to fp32 on CUDA, where ``layer_norm`` is on autocast's fp32 list, so the output is
fp32 as eager's; CPU autocast leaves ``layer_norm`` in its input's dtype, so there the
LayerNorm parameters and output take the autocast dtype (eager keeps fp32 parameters there:
the fast path rounds them once, within the low-precision test bound). Gradients flow back
through the casts. The casts happen in Python before the custom op, since custom ops are not
autocast-aware.

Dropout: element ``(row, col)`` is kept iff ``tl.rand(seed, offset + row * hidden + col) >=
p`` (Philox4x32-10 with key ``(seed, 0)`` and counter ``(index, 0, 0, 0)``, the first word as
triton's ``uint_to_uniform_float``). The index is cast to int32 on purpose: a 64-bit offset
selects a different Philox variant in older triton releases (the GPU runs triton 3.6). The
seed is an int64 ``[1]`` device tensor the kernels load (only with dropout on), never a host
int: ``dropout_p > 0`` without a seed draws one with :func:`lxmert_fast.philox.draw_seed` on
the features' device, so a captured graph draws a fresh mask on every replay, there is no host
sync, and ``torch.manual_seed`` reproduces a run, eager and compiled alike. Seeds below
``2**31`` key Philox as the former int32 argument did. ``offset`` stays a ``do_not_specialize``
int. :func:`dropout_keep_mask` exports the same mask for tests (int or tensor seed).

Registration: ``lxmert_fast::visual_embedding_fwd`` (the ``addmm`` and the forward row kernel;
returns the output, the projection and the stats) and ``lxmert_fast::visual_embedding_bwd``
(the backward row kernel and the reduction of its partials) are ``torch.library.custom_op``
with fake kernels; the forward's registered autograd calls the backward op and the two GEMMs.
``torch.compile(fullgraph=True)`` traces :func:`visual_embedding` without a break (the seed draw is a graph op).
``torch.library.triton_op`` would let inductor see the kernels, but does not run under the
interpreter (DESIGN.md §6).

Not supported (``supports`` says why and the dispatcher falls back to the reference):
mixed dtypes outside autocast, fp64, ``hidden > 1024``, ``pos_dim > 8``, no rows, ``offset +
M * hidden >= 2**31`` (int32 dropout index), parameters of unexpected shapes.

Hazards: masked columns and rows are forced to zero before every reduction (the LayerNorm
backward's correction term is non-zero there otherwise), covered by tests at hidden sizes
16..1000, ``pos_dim`` 1, 3, 4, 7, 8 and row counts that leave partial tiles. A 2048-wide
tile was dropped: its backward spilled 80-376 bytes of stack at 8 or 16 warps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from lxmert_fast import ops
from lxmert_fast.backend import register_fast_path
from lxmert_fast.kernels.partial_sums import REDUCE_COLS, REDUCE_ROWS, REDUCE_WARPS, sum_partials
from lxmert_fast.kernels.sm90 import KernelVariant
from lxmert_fast.philox import check_seed, draw_seed, seed_tensor

Tensor = torch.Tensor

MAX_POS_DIM = 8
# One tile width for every hidden size up to 1024 (LXMERT's 768 needs it; narrower rows run
# masked): the launcher then picks among 40 variants (5 dtype pairs x 2 BLOCK_P x dropout on/off
# x fwd/bwd), which keeps the sm_90 compile check short.
BLOCK_H = 1024
# Four rows per step: a 4096-element tile, 16 fp32 registers per thread per tile at 8 warps.
BLOCK_M = 4
BLOCK_PS = (4, 8)
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
MASK_BLOCK = 1024
# ptxas for sm_90: no spills at 8 warps for the LXMERT shape (hidden 768, pos_dim 4).
NUM_WARPS = 8
_INT32_LIMIT = 2**31
# LayerNorm/bias partial rows per backward program: dγ_v, dβ, db_v, dγ_b, db_b.
N_LN_PARTIALS = tl.constexpr(5)


@triton.jit
def _dropout_keep(seed, index, p):
    # Philox on int32 counters, so triton 3.6 (GPU) and 3.9 (here) draw the same bits.
    return tl.rand(seed, index.to(tl.int32)) >= p


@triton.jit(do_not_specialize=["offset"])
def _visual_embedding_fwd_kernel(
    out_ptr,  # [M, hidden] output, input dtype
    out_row_stride,
    proj_ptr,  # [M, hidden] features·W_vᵀ + b_v
    proj_row_stride,
    boxes_ptr,  # [M, pos_dim]
    boxes_row_stride,
    box_weight_ptr,  # [hidden, pos_dim] contiguous
    box_bias_ptr,  # [hidden]
    feat_ln_weight_ptr,  # [hidden]
    feat_ln_bias_ptr,  # [hidden]
    box_ln_weight_ptr,  # [hidden]
    box_ln_bias_ptr,  # [hidden]
    stats_ptr,  # [4, M] fp32 out: mean_v, rstd_v, mean_b, rstd_b
    n_rows,
    hidden,
    pos_dim,
    rows_per_program,  # a multiple of BLOCK_M
    eps,
    dropout_p,
    dropout_scale,
    seed_ptr,  # [1] int64 Philox key, read iff HAS_DROPOUT
    offset,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)

    seed = tl.load(seed_ptr) if HAS_DROPOUT else 0
    cols = tl.arange(0, BLOCK_H)
    col_mask = cols < hidden
    # Loaded once per program and reused for all its rows.
    box_b = tl.load(box_bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    feat_g = tl.load(feat_ln_weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    feat_beta = tl.load(feat_ln_bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    box_g = tl.load(box_ln_weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    box_beta = tl.load(box_ln_bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)

    # BLOCK_M rows per step keep several rows' loads in flight per program.
    for tile_start in range(row_start, row_end, BLOCK_M):
        rows = tile_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]

        x = tl.load(proj_ptr + rows[:, None] * proj_row_stride + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        mean_v = tl.sum(x, axis=1) / hidden
        xc = tl.where(mask, x - mean_v[:, None], 0.0)
        rstd_v = tl.rsqrt(tl.sum(xc * xc, axis=1) / hidden + eps)

        y = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32) + box_b[None, :]
        for k in tl.static_range(BLOCK_P):
            # Block-shaped k masks: 2026-11 triton 3.9 interpreter rejects scalar-bool & block masks.
            k_rows = row_mask & (tl.full([BLOCK_M], k, tl.int32) < pos_dim)
            k_cols = col_mask & (tl.full([BLOCK_H], k, tl.int32) < pos_dim)
            box_k = tl.load(boxes_ptr + rows * boxes_row_stride + k, mask=k_rows, other=0.0)
            # W_b's column k comes from L1 every step: cheaper than pinning BLOCK_H x BLOCK_P registers.
            w_k = tl.load(box_weight_ptr + cols * pos_dim + k, mask=k_cols, other=0.0)
            y += box_k.to(tl.float32)[:, None] * w_k.to(tl.float32)[None, :]
        mean_b = tl.sum(tl.where(mask, y, 0.0), axis=1) / hidden
        yc = tl.where(mask, y - mean_b[:, None], 0.0)
        rstd_b = tl.rsqrt(tl.sum(yc * yc, axis=1) / hidden + eps)

        z = xc * rstd_v[:, None] * feat_g[None, :] + feat_beta[None, :]
        z = (z + yc * rstd_b[:, None] * box_g[None, :] + box_beta[None, :]) * 0.5
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, offset + rows[:, None] * hidden + cols[None, :], dropout_p)
            z = tl.where(keep, z * dropout_scale, 0.0)
        tl.store(
            out_ptr + rows[:, None] * out_row_stride + cols[None, :],
            z.to(out_ptr.dtype.element_ty),
            mask=mask,
        )
        tl.store(stats_ptr + rows, mean_v, mask=row_mask)
        tl.store(stats_ptr + n_rows + rows, rstd_v, mask=row_mask)
        tl.store(stats_ptr + 2 * n_rows + rows, mean_b, mask=row_mask)
        tl.store(stats_ptr + 3 * n_rows + rows, rstd_b, mask=row_mask)


@triton.jit(do_not_specialize=["offset"])
def _visual_embedding_bwd_kernel(
    dproj_ptr,  # [M, hidden] out: grad of features·W_vᵀ + b_v, input dtype
    dproj_row_stride,
    dboxes_ptr,  # [M, pos_dim] out, input dtype
    dboxes_row_stride,
    ln_partials_ptr,  # [programs, 5, hidden] fp32 out: dγ_v, dβ (both LNs), db_v, dγ_b, db_b
    box_weight_partials_ptr,  # [programs, pos_dim, hidden] fp32 out: dW_bᵀ
    dout_ptr,  # [M, hidden] upstream gradient
    dout_row_stride,
    proj_ptr,  # [M, hidden] features·W_vᵀ + b_v saved by the forward
    proj_row_stride,
    boxes_ptr,  # [M, pos_dim]
    boxes_row_stride,
    box_weight_ptr,  # [hidden, pos_dim] contiguous
    box_bias_ptr,  # [hidden]
    feat_ln_weight_ptr,  # [hidden]
    box_ln_weight_ptr,  # [hidden]
    stats_ptr,  # [4, M] fp32: mean_v, rstd_v, mean_b, rstd_b
    n_rows,
    hidden,
    pos_dim,
    rows_per_program,  # a multiple of BLOCK_M
    dropout_p,
    dropout_scale,
    seed_ptr,  # [1] int64 Philox key, read iff HAS_DROPOUT
    offset,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)

    seed = tl.load(seed_ptr) if HAS_DROPOUT else 0
    cols = tl.arange(0, BLOCK_H)
    col_mask = cols < hidden
    ks = tl.arange(0, BLOCK_P)
    box_b = tl.load(box_bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    feat_g = tl.load(feat_ln_weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    box_g = tl.load(box_ln_weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)

    # The output is (LN_v + LN_b) / 2, so both LayerNorm biases get the same gradient.
    d_feat_g = tl.zeros([BLOCK_H], dtype=tl.float32)
    d_beta = tl.zeros([BLOCK_H], dtype=tl.float32)
    d_feat_b = tl.zeros([BLOCK_H], dtype=tl.float32)
    d_box_g = tl.zeros([BLOCK_H], dtype=tl.float32)
    d_box_b = tl.zeros([BLOCK_H], dtype=tl.float32)
    d_box_w = tl.zeros([BLOCK_P, BLOCK_H], dtype=tl.float32)

    for tile_start in range(row_start, row_end, BLOCK_M):
        rows = tile_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]

        dz = tl.load(dout_ptr + rows[:, None] * dout_row_stride + cols[None, :], mask=mask, other=0.0)
        dz = dz.to(tl.float32)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, offset + rows[:, None] * hidden + cols[None, :], dropout_p)
            dz = tl.where(keep, dz * dropout_scale, 0.0)
        dz = dz * 0.5

        mean_v = tl.load(stats_ptr + rows, mask=row_mask, other=0.0)
        rstd_v = tl.load(stats_ptr + n_rows + rows, mask=row_mask, other=0.0)
        x = tl.load(proj_ptr + rows[:, None] * proj_row_stride + cols[None, :], mask=mask, other=0.0)
        x_hat = tl.where(mask, (x.to(tl.float32) - mean_v[:, None]) * rstd_v[:, None], 0.0)
        dx_hat = dz * feat_g[None, :]
        c1 = tl.sum(dx_hat * x_hat, axis=1) / hidden
        c2 = tl.sum(dx_hat, axis=1) / hidden
        # Padding columns would get -rstd * c2 without the mask.
        dx = tl.where(mask, rstd_v[:, None] * (dx_hat - x_hat * c1[:, None] - c2[:, None]), 0.0)
        tl.store(
            dproj_ptr + rows[:, None] * dproj_row_stride + cols[None, :],
            dx.to(dproj_ptr.dtype.element_ty),
            mask=mask,
        )
        d_feat_g += tl.sum(dz * x_hat, axis=0)
        d_beta += tl.sum(dz, axis=0)
        d_feat_b += tl.sum(dx, axis=0)

        mean_b = tl.load(stats_ptr + 2 * n_rows + rows, mask=row_mask, other=0.0)
        rstd_b = tl.load(stats_ptr + 3 * n_rows + rows, mask=row_mask, other=0.0)
        y = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32) + box_b[None, :]
        for k in tl.static_range(BLOCK_P):
            k_rows = row_mask & (tl.full([BLOCK_M], k, tl.int32) < pos_dim)
            k_cols = col_mask & (tl.full([BLOCK_H], k, tl.int32) < pos_dim)
            box_k = tl.load(boxes_ptr + rows * boxes_row_stride + k, mask=k_rows, other=0.0)
            w_k = tl.load(box_weight_ptr + cols * pos_dim + k, mask=k_cols, other=0.0)
            y += box_k.to(tl.float32)[:, None] * w_k.to(tl.float32)[None, :]
        y_hat = tl.where(mask, (y - mean_b[:, None]) * rstd_b[:, None], 0.0)
        dy_hat = dz * box_g[None, :]
        c1 = tl.sum(dy_hat * y_hat, axis=1) / hidden
        c2 = tl.sum(dy_hat, axis=1) / hidden
        dy = tl.where(mask, rstd_b[:, None] * (dy_hat - y_hat * c1[:, None] - c2[:, None]), 0.0)
        d_box_g += tl.sum(dz * y_hat, axis=0)
        d_box_b += tl.sum(dy, axis=0)
        for k in tl.static_range(BLOCK_P):
            k_rows = row_mask & (tl.full([BLOCK_M], k, tl.int32) < pos_dim)
            k_cols = col_mask & (tl.full([BLOCK_H], k, tl.int32) < pos_dim)
            box_k = tl.load(boxes_ptr + rows * boxes_row_stride + k, mask=k_rows, other=0.0)
            w_k = tl.load(box_weight_ptr + cols * pos_dim + k, mask=k_cols, other=0.0)
            dbox_k = tl.sum(dy * w_k.to(tl.float32)[None, :], axis=1)
            tl.store(
                dboxes_ptr + rows * dboxes_row_stride + k,
                dbox_k.to(dboxes_ptr.dtype.element_ty),
                mask=k_rows,
            )
            # Row k of the [BLOCK_P, BLOCK_H] accumulator: a select, since tiles cannot be indexed.
            d_w_k = tl.sum(dy * box_k.to(tl.float32)[:, None], axis=0)
            d_box_w += tl.where(ks[:, None] == k, d_w_k[None, :], 0.0)

    # Two buffers, not one [programs, 5 + pos_dim, hidden]: the merged addressing cost the
    # BLOCK_P 8 variants (253-255 registers) 4 spilled words on sm_90.
    partials = ln_partials_ptr + pid * N_LN_PARTIALS * hidden + cols
    tl.store(partials, d_feat_g, mask=col_mask)
    tl.store(partials + hidden, d_beta, mask=col_mask)
    tl.store(partials + 2 * hidden, d_feat_b, mask=col_mask)
    tl.store(partials + 3 * hidden, d_box_g, mask=col_mask)
    tl.store(partials + 4 * hidden, d_box_b, mask=col_mask)
    tl.store(
        box_weight_partials_ptr + pid * pos_dim * hidden + ks[:, None] * hidden + cols[None, :],
        d_box_w,
        mask=(ks[:, None] < pos_dim) & col_mask[None, :],
    )


@triton.jit(do_not_specialize=["n_partials"])
def _visual_embedding_bwd_reduce_kernel(
    feat_bias_grad_ptr,  # [hidden] out, GEMM dtype
    feat_ln_weight_grad_ptr,  # [hidden] out, LayerNorm dtype
    feat_ln_bias_grad_ptr,  # [hidden] out, LayerNorm dtype
    box_weight_grad_ptr,  # [hidden, pos_dim] contiguous out, GEMM dtype
    box_bias_grad_ptr,  # [hidden] out, GEMM dtype
    box_ln_weight_grad_ptr,  # [hidden] out, LayerNorm dtype
    box_ln_bias_grad_ptr,  # [hidden] out, LayerNorm dtype
    ln_partials_ptr,  # [n_partials, 5, hidden] fp32, written by _visual_embedding_bwd_kernel
    box_weight_partials_ptr,  # [n_partials, pos_dim, hidden] fp32, likewise
    n_partials,
    hidden,
    pos_dim,
    BLOCK_P: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    # Program (c, j) sums partial row j (of the 5 LayerNorm/bias rows, then W_b's pos_dim) over
    # the backward's programs for BLOCK_COLS columns.
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = cols < hidden
    j = tl.program_id(1)
    if j < N_LN_PARTIALS:
        base, stride = ln_partials_ptr + j * hidden, N_LN_PARTIALS * hidden
    else:
        base, stride = box_weight_partials_ptr + (j - N_LN_PARTIALS) * hidden, pos_dim * hidden
    total = sum_partials(base, stride, n_partials, cols, col_mask, BLOCK_P, BLOCK_COLS)
    if j == 0:
        tl.store(
            feat_ln_weight_grad_ptr + cols, total.to(feat_ln_weight_grad_ptr.dtype.element_ty), mask=col_mask
        )
    elif j == 1:
        # Both LayerNorm biases get this gradient: written to each.
        tl.store(
            feat_ln_bias_grad_ptr + cols, total.to(feat_ln_bias_grad_ptr.dtype.element_ty), mask=col_mask
        )
        tl.store(box_ln_bias_grad_ptr + cols, total.to(box_ln_bias_grad_ptr.dtype.element_ty), mask=col_mask)
    elif j == 2:
        tl.store(feat_bias_grad_ptr + cols, total.to(feat_bias_grad_ptr.dtype.element_ty), mask=col_mask)
    elif j == 3:
        tl.store(
            box_ln_weight_grad_ptr + cols, total.to(box_ln_weight_grad_ptr.dtype.element_ty), mask=col_mask
        )
    elif j == 4:
        tl.store(box_bias_grad_ptr + cols, total.to(box_bias_grad_ptr.dtype.element_ty), mask=col_mask)
    else:
        # Row 5 + k holds column k of dW_b: [hidden, pos_dim] is written with stride pos_dim.
        tl.store(
            box_weight_grad_ptr + cols * pos_dim + (j - N_LN_PARTIALS),
            total.to(box_weight_grad_ptr.dtype.element_ty),
            mask=col_mask,
        )


@triton.jit(do_not_specialize=["offset"])
def _dropout_keep_mask_kernel(
    keep_ptr,  # [n] int8 out
    n,
    seed_ptr,  # [1] int64 Philox key
    offset,
    dropout_p,
    BLOCK: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = _dropout_keep(tl.load(seed_ptr), offset + idx, dropout_p)
    tl.store(keep_ptr + idx, keep.to(tl.int8), mask=idx < n)


def _block_p(pos_dim: int) -> int:
    return next(b for b in BLOCK_PS if pos_dim <= b)


def _bwd_block_m(block_p: int) -> int:
    # At BLOCK_P 8 the backward also holds an [8, BLOCK_H] dW_b accumulator: two rows per step
    # keep it free of spills (ptxas sm_90, 8 warps: 253-255 registers; four rows spilled 2-10 words).
    return BLOCK_M if block_p <= 4 else 2


def _programs(n_rows: int, block_m: int, device: torch.device, per_sm: int) -> tuple[int, int]:
    """(programs, rows per program): at most ``per_sm`` programs per SM, whole tiles each."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    tiles = triton.cdiv(n_rows, block_m)
    rows_per_program = triton.cdiv(tiles, min(tiles, sms * per_sm)) * block_m
    return triton.cdiv(n_rows, rows_per_program), rows_per_program


def _dropout_scale(dropout_p: float) -> float:
    return 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)


def _forward_rows(
    out: Tensor,
    proj: Tensor,
    boxes: Tensor,
    box_weight: Tensor,
    box_bias: Tensor,
    feat_ln_weight: Tensor,
    feat_ln_bias: Tensor,
    box_ln_weight: Tensor,
    box_ln_bias: Tensor,
    eps: float,
    dropout_p: float,
    seed: Tensor | None,
    offset: int,
) -> Tensor:
    """Launch the forward row kernel on ``proj`` [M, hidden], writing ``out`` [M, hidden]; returns
    the stats [4, M]."""
    n_rows, hidden = proj.shape
    pos_dim = boxes.shape[1]
    stats = torch.empty((4, n_rows), dtype=torch.float32, device=proj.device)
    programs, rows_per_program = _programs(n_rows, BLOCK_M, proj.device, per_sm=8)
    _visual_embedding_fwd_kernel[(programs,)](
        out,
        out.stride(0),
        proj,
        proj.stride(0),
        boxes,
        boxes.stride(0),
        box_weight,
        box_bias,
        feat_ln_weight,
        feat_ln_bias,
        box_ln_weight,
        box_ln_bias,
        stats,
        n_rows,
        hidden,
        pos_dim,
        rows_per_program,
        eps,
        dropout_p,
        _dropout_scale(dropout_p),
        # Never read without dropout (HAS_DROPOUT is a constexpr): any pointer will do.
        stats if seed is None else seed,
        offset,
        BLOCK_M=BLOCK_M,
        BLOCK_H=BLOCK_H,
        BLOCK_P=_block_p(pos_dim),
        HAS_DROPOUT=dropout_p > 0.0,
        num_warps=NUM_WARPS,
    )
    return stats


def _backward_rows(
    dout: Tensor,
    proj: Tensor,
    boxes: Tensor,
    box_weight: Tensor,
    box_bias: Tensor,
    feat_ln_weight: Tensor,
    box_ln_weight: Tensor,
    stats: Tensor,
    dropout_p: float,
    seed: Tensor | None,
    offset: int,
) -> tuple[Tensor, ...]:
    """Launch the backward row kernel and the reduction of its partials; returns (dproj [M,
    hidden], dboxes [M, pos_dim], d b_v, d γ_v, d β_v, d W_b [hidden, pos_dim], d b_b, d γ_b,
    d β_b), each parameter gradient in its parameter's dtype (b_v: the projection's; both β: their
    γ's)."""
    n_rows, hidden = proj.shape
    pos_dim = boxes.shape[1]
    device = proj.device
    dproj = torch.empty_like(proj)
    dboxes = torch.empty_like(boxes)
    block_p = _block_p(pos_dim)
    block_m = _bwd_block_m(block_p)
    # One program per SM: each writes 5 + pos_dim partial rows, and at ~253 registers per
    # thread (ptxas, 8 warps) a second one could not be resident anyway.
    programs, rows_per_program = _programs(n_rows, block_m, device, per_sm=1)
    ln_partials = torch.empty((programs, N_LN_PARTIALS.value, hidden), dtype=torch.float32, device=device)
    box_weight_partials = torch.empty((programs, pos_dim, hidden), dtype=torch.float32, device=device)
    _visual_embedding_bwd_kernel[(programs,)](
        dproj,
        dproj.stride(0),
        dboxes,
        dboxes.stride(0),
        ln_partials,
        box_weight_partials,
        dout,
        dout.stride(0),
        proj,
        proj.stride(0),
        boxes,
        boxes.stride(0),
        box_weight,
        box_bias,
        feat_ln_weight,
        box_ln_weight,
        stats,
        n_rows,
        hidden,
        pos_dim,
        rows_per_program,
        dropout_p,
        _dropout_scale(dropout_p),
        stats if seed is None else seed,
        offset,
        BLOCK_M=block_m,
        BLOCK_H=BLOCK_H,
        BLOCK_P=block_p,
        HAS_DROPOUT=dropout_p > 0.0,
        num_warps=NUM_WARPS,
    )
    grads = (
        proj.new_empty(hidden),
        torch.empty_like(feat_ln_weight),
        torch.empty_like(feat_ln_weight),
        torch.empty_like(box_weight),
        torch.empty_like(box_bias),
        torch.empty_like(box_ln_weight),
        torch.empty_like(box_ln_weight),
    )
    grid = (triton.cdiv(hidden, REDUCE_COLS), N_LN_PARTIALS.value + pos_dim)
    _visual_embedding_bwd_reduce_kernel[grid](
        *grads,
        ln_partials,
        box_weight_partials,
        programs,
        hidden,
        pos_dim,
        BLOCK_P=REDUCE_ROWS,
        BLOCK_COLS=REDUCE_COLS,
        num_warps=REDUCE_WARPS,
    )
    return dproj, dboxes, *grads


def dropout_keep_mask(
    seed: int | Tensor,
    offset: int,
    shape: tuple[int, ...],
    dropout_p: float,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The bool keep-mask the kernels draw for ``(seed, offset)`` over a row-major ``shape``.

    For tests: ``reference.visual_embedding(..., keep_mask=dropout_keep_mask(...))`` is what
    the fused op computes with the same seed (an int, or the seed tensor a call used) and offset.
    """
    n = 1
    for size in shape:
        n *= size
    if offset < 0 or offset + n >= _INT32_LIMIT:
        raise ValueError(f"offset: expected 0 <= offset and offset + numel < 2**31, got {offset} + {n}")
    check_seed(seed, bits=31)  # tl.rand keys Philox with an int32 seed
    keep = torch.empty(n, dtype=torch.int8, device=device)
    if n:
        _dropout_keep_mask_kernel[(triton.cdiv(n, MASK_BLOCK),)](
            keep, n, seed_tensor(seed, keep.device), offset, dropout_p, BLOCK=MASK_BLOCK
        )
    return keep.view(shape).bool()


@torch.library.custom_op("lxmert_fast::visual_embedding_fwd", mutates_args=())
def visual_embedding_fwd(
    features: Tensor,
    boxes: Tensor,
    feat_weight: Tensor,
    feat_bias: Tensor,
    feat_ln_weight: Tensor,
    feat_ln_bias: Tensor,
    box_weight: Tensor,
    box_bias: Tensor,
    box_ln_weight: Tensor,
    box_ln_bias: Tensor,
    eps: float,
    dropout_p: float,
    seed: Tensor | None,
    offset: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The fused forward as given: (out [*batch, hidden] in the LayerNorm parameters' dtype,
    proj = features·W_vᵀ + b_v [M, hidden], stats [4, M] fp32); ``seed`` int64 [1] or None
    without dropout. Autocast does not apply here: :func:`visual_embedding` casts first."""
    features_2d = features.reshape(-1, features.shape[-1])
    proj = F.linear(features_2d, feat_weight, feat_bias)
    out = torch.empty((*features.shape[:-1], proj.shape[1]), dtype=feat_ln_weight.dtype, device=proj.device)
    stats = _forward_rows(
        out.view(proj.shape),
        proj,
        boxes.reshape(-1, boxes.shape[-1]).contiguous(),
        box_weight.contiguous(),
        box_bias.contiguous(),
        feat_ln_weight.contiguous(),
        feat_ln_bias.contiguous(),
        box_ln_weight.contiguous(),
        box_ln_bias.contiguous(),
        eps,
        dropout_p,
        seed,
        offset,
    )
    return out, proj, stats


@visual_embedding_fwd.register_fake
def _visual_embedding_fwd_fake(
    features, boxes, feat_weight, feat_bias, feat_ln_weight, *_
) -> tuple[Tensor, Tensor, Tensor]:
    hidden = feat_weight.shape[0]
    n_rows = features.shape[:-1].numel()
    return (
        features.new_empty((*features.shape[:-1], hidden), dtype=feat_ln_weight.dtype),
        features.new_empty((n_rows, hidden)),
        features.new_empty((4, n_rows), dtype=torch.float32),
    )


@torch.library.custom_op("lxmert_fast::visual_embedding_bwd", mutates_args=())
def visual_embedding_bwd(
    grad_out: Tensor,
    proj: Tensor,
    boxes: Tensor,
    box_weight: Tensor,
    box_bias: Tensor,
    feat_ln_weight: Tensor,
    box_ln_weight: Tensor,
    stats: Tensor,
    dropout_p: float,
    seed: Tensor | None,
    offset: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The fused backward: (dproj [M, hidden] in proj's dtype, dboxes in boxes' shape and dtype,
    then the gradients of b_v, γ_v, β_v, W_b, b_b, γ_b, β_b, each in the dtype of the parameter
    the forward took: b_v proj's, W_b and b_b their own, the LayerNorm ones their γ's); the
    dropout mask is regenerated from (seed, offset)."""
    dproj, dboxes, *grads = _backward_rows(
        grad_out.reshape(proj.shape).contiguous(),
        proj,
        boxes.reshape(-1, boxes.shape[-1]).contiguous(),
        box_weight.contiguous(),
        box_bias.contiguous(),
        feat_ln_weight.contiguous(),
        box_ln_weight.contiguous(),
        stats,
        dropout_p,
        seed,
        offset,
    )
    return dproj, dboxes.view(boxes.shape), *grads


@visual_embedding_bwd.register_fake
def _visual_embedding_bwd_fake(
    grad_out, proj, boxes, box_weight, box_bias, feat_ln_weight, box_ln_weight, *_
) -> tuple[Tensor, ...]:
    hidden = proj.shape[1]
    return (
        proj.new_empty(proj.shape),
        boxes.new_empty(boxes.shape),
        proj.new_empty(hidden),
        feat_ln_weight.new_empty(hidden),
        feat_ln_weight.new_empty(hidden),
        box_weight.new_empty(box_weight.shape),
        box_bias.new_empty(hidden),
        box_ln_weight.new_empty(hidden),
        box_ln_weight.new_empty(hidden),
    )


def _setup_context(ctx, inputs, output) -> None:
    features, boxes, feat_weight, _feat_bias, feat_ln_weight, _feat_ln_bias = inputs[:6]
    box_weight, box_bias, box_ln_weight, _box_ln_bias, _eps, dropout_p, seed, offset = inputs[6:]
    _, proj, stats = output
    # proj and stats are saved for the backward, not results: no gradients flow into them.
    ctx.mark_non_differentiable(proj, stats)
    ctx.set_materialize_grads(False)
    # The features only feed dW_v; not keeping them alive when W_v is frozen.
    ctx.save_for_backward(
        features if ctx.needs_input_grad[2] else None,
        boxes,
        feat_weight,
        proj,
        stats,
        box_weight,
        box_bias,
        feat_ln_weight,
        box_ln_weight,
        seed,
    )
    ctx.launch = (dropout_p, offset)


def _backward(ctx, grad_out: Tensor, _grad_proj: None, _grad_stats: None) -> tuple[Tensor | None, ...]:
    features, boxes, feat_weight, proj, stats, box_weight, box_bias, feat_ln_weight, box_ln_weight, seed = (
        ctx.saved_tensors
    )
    dropout_p, offset = ctx.launch
    dproj, d_boxes, *param_grads = visual_embedding_bwd(
        grad_out,
        proj,
        boxes,
        box_weight,
        box_bias,
        feat_ln_weight,
        box_ln_weight,
        stats,
        dropout_p,
        seed,
        offset,
    )
    need = ctx.needs_input_grad
    # The two GEMMs are the only work after the kernels.
    d_features = (dproj @ feat_weight).view(*grad_out.shape[:-1], -1) if need[0] else None
    d_feat_weight = dproj.t() @ features.reshape(-1, features.shape[-1]) if need[2] else None
    d_feat_b, d_feat_g, d_feat_beta, d_box_w, d_box_b, d_box_g, d_box_beta = param_grads
    return (
        d_features,
        d_boxes if need[1] else None,
        d_feat_weight,
        d_feat_b,
        d_feat_g,
        d_feat_beta,
        d_box_w,
        d_box_b,
        d_box_g,
        d_box_beta,
        None,
        None,
        None,
        None,
    )


visual_embedding_fwd.register_autograd(_backward, setup_context=_setup_context)


def _autocast_dtypes(device_type: str) -> tuple[torch.dtype, torch.dtype] | None:
    """(GEMM dtype, LayerNorm dtype) of eager PyTorch under autocast on ``device_type``, or None.

    Autocast runs ``linear`` in its dtype on every device; ``layer_norm`` is on its fp32 list
    on CUDA, while CPU autocast leaves it alone (it then runs in its input's dtype, the GEMM's).
    """
    if not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    return dtype, torch.float32 if device_type == "cuda" else dtype


def supports(
    features: Tensor,
    boxes: Tensor,
    feat_weight: Tensor,
    feat_bias: Tensor,
    feat_ln_weight: Tensor,
    feat_ln_bias: Tensor,
    box_weight: Tensor,
    box_bias: Tensor,
    box_ln_weight: Tensor,
    box_ln_bias: Tensor,
    eps: float,
    dropout_p: float,
) -> str | None:
    """None when the fused kernels can serve this call, else why not (same args as the op)."""
    named = (
        ("features", features),
        ("boxes", boxes),
        ("feat_weight", feat_weight),
        ("feat_bias", feat_bias),
        ("feat_ln_weight", feat_ln_weight),
        ("feat_ln_bias", feat_ln_bias),
        ("box_weight", box_weight),
        ("box_bias", box_bias),
        ("box_ln_weight", box_ln_weight),
        ("box_ln_bias", box_ln_bias),
    )
    autocast = _autocast_dtypes(features.device.type)
    if autocast is not None and autocast[0] not in DTYPES:
        return f"autocast dtype {autocast[0]} is not fp32, fp16 or bf16"
    for name, t in named:
        if t.dtype not in DTYPES:
            return f"{name}: dtype {t.dtype} is not fp32, fp16 or bf16"
        # Autocast casts every input to the dtypes the kernels then see.
        if autocast is None and t.dtype != features.dtype:
            return f"{name}: dtype {t.dtype} differs from features' {features.dtype} (mixed dtypes)"
        if t.device != features.device:
            return f"{name}: device {t.device} differs from features' {features.device}"
    hidden, pos_dim = feat_weight.shape[0], boxes.shape[-1]
    if hidden > BLOCK_H:
        return f"feat_weight: hidden size {hidden} exceeds the kernel's maximum {BLOCK_H}"
    if not 1 <= pos_dim <= MAX_POS_DIM:
        return f"boxes: pos_dim {pos_dim} outside the kernel's range 1..{MAX_POS_DIM}"
    expected = {
        "feat_bias": (hidden,),
        "feat_ln_weight": (hidden,),
        "feat_ln_bias": (hidden,),
        "box_weight": (hidden, pos_dim),
        "box_bias": (hidden,),
        "box_ln_weight": (hidden,),
        "box_ln_bias": (hidden,),
    }
    for name, t in named[3:]:
        if tuple(t.shape) != expected[name]:
            return f"{name}: expected shape {list(expected[name])}, got {list(t.shape)}"
    n_rows = features.shape[:-1].numel()
    if n_rows == 0:
        return "features: no rows (B * N == 0)"
    if n_rows * hidden >= _INT32_LIMIT:
        return f"features: {n_rows} rows x {hidden} exceed the int32 dropout index"
    return None


def visual_embedding(
    features: Tensor,
    boxes: Tensor,
    feat_weight: Tensor,
    feat_bias: Tensor,
    feat_ln_weight: Tensor,
    feat_ln_bias: Tensor,
    box_weight: Tensor,
    box_bias: Tensor,
    box_ln_weight: Tensor,
    box_ln_bias: Tensor,
    eps: float,
    dropout_p: float,
    *,
    seed: int | Tensor | None = None,
    offset: int = 0,
) -> Tensor:
    """Fused visual embedding ``[B, N, hidden]``; ``dropout_p > 0`` is training mode.

    Without a ``seed``, dropout draws one on the features' device
    (:func:`lxmert_fast.philox.draw_seed`: no host sync, fresh in every CUDA-graph replay,
    reproduced by ``torch.manual_seed``); tests pass an int ``seed`` and ``offset`` to compare
    with :func:`dropout_keep_mask`. Under autocast the inputs are cast as eager autocast casts
    them (see :func:`_autocast_dtypes`); gradients flow back through the casts.
    """
    check_seed(seed, bits=31)  # tl.rand keys Philox with an int32 seed
    n_elements = features.shape[:-1].numel() * feat_weight.shape[0]
    if offset < 0 or offset + n_elements >= _INT32_LIMIT:
        raise ValueError(
            f"offset: expected 0 <= offset and offset + numel < 2**31, got {offset} + {n_elements}"
        )
    device = features.device
    autocast = _autocast_dtypes(device.type)
    if autocast is not None:
        gemm, norm = autocast
        features, boxes, feat_weight, feat_bias, box_weight, box_bias = (
            t.to(gemm) for t in (features, boxes, feat_weight, feat_bias, box_weight, box_bias)
        )
        feat_ln_weight, feat_ln_bias, box_ln_weight, box_ln_bias = (
            t.to(norm) for t in (feat_ln_weight, feat_ln_bias, box_ln_weight, box_ln_bias)
        )
    if dropout_p > 0.0 and seed is None:
        seed = draw_seed(device)
    out, _, _ = visual_embedding_fwd(
        features,
        boxes,
        feat_weight,
        feat_bias,
        feat_ln_weight,
        feat_ln_bias,
        box_weight,
        box_bias,
        box_ln_weight,
        box_ln_bias,
        float(eps),
        float(dropout_p),
        seed_tensor(seed, device) if dropout_p > 0.0 else None,
        int(offset),
    )
    return out


def sm90_variants() -> list[KernelVariant]:
    """Every specialisation the launchers can pick: dtypes x BLOCK_P x dropout x fwd/bwd, the
    backward's reduction per dtype pair, plus the mask kernel, each with the arguments of LXMERT pre-training (B * 36 contiguous rows of 768; the
    widest boxes a BLOCK_P serves). Dtypes: one for every tensor, or (CUDA autocast) the GEMM's
    fp16/bf16 for the projections and boxes with fp32 LayerNorm parameters and output."""
    from lxmert_fast.kernels.sm90 import BATCH, BOXES, DROPOUT_P, HIDDEN

    variants = [
        KernelVariant(
            "visual_embedding_keep_mask",
            _dropout_keep_mask_kernel,
            {
                "keep_ptr": torch.int8,
                "n": BATCH * BOXES * HIDDEN,
                "seed_ptr": torch.int64,
                "offset": 0,
                "dropout_p": DROPOUT_P,
                "BLOCK": MASK_BLOCK,
            },
        )
    ]
    dtype_pairs = [(dtype, dtype) for dtype in DTYPES] + [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
    ]
    for gemm, norm in dtype_pairs:
        name = DTYPES[gemm] if gemm == norm else f"{DTYPES[gemm]}_norm{DTYPES[norm]}"
        for block_p in BLOCK_PS:
            for has_dropout in (False, True):
                suffix = f"{name}_p{block_p}_{'dropout' if has_dropout else 'eval'}"
                for direction, fn, args in (
                    ("fwd", _visual_embedding_fwd_kernel, _fwd_args),
                    ("bwd", _visual_embedding_bwd_kernel, _bwd_args),
                ):
                    variants.append(
                        KernelVariant(
                            f"visual_embedding_{direction}_{suffix}",
                            fn,
                            args(gemm, norm, block_p, has_dropout),
                            {"num_warps": NUM_WARPS},
                        )
                    )
        variants.append(
            KernelVariant(
                f"visual_embedding_bwd_reduce_{name}",
                _visual_embedding_bwd_reduce_kernel,
                _reduce_args(gemm, norm),
                {"num_warps": REDUCE_WARPS},
            )
        )
    return variants


def _row_args(block_m: int, block_p: int, has_dropout: bool, per_sm: int) -> dict:
    """Shape, dropout and constexpr arguments as the launchers pass them.

    ``rows_per_program`` is ``_programs`` on a 132-SM card; without dropout the seed pointer is
    the stats tensor (fp32, never read).
    """
    from lxmert_fast.kernels.sm90 import BATCH, BOXES, DROPOUT_P, H100_SMS, HIDDEN

    n_rows = BATCH * BOXES
    tiles = triton.cdiv(n_rows, block_m)
    dropout_p = DROPOUT_P if has_dropout else 0.0
    return {
        "n_rows": n_rows,
        "hidden": HIDDEN,
        "pos_dim": block_p,
        "rows_per_program": triton.cdiv(tiles, min(tiles, H100_SMS * per_sm)) * block_m,
        "dropout_p": dropout_p,
        "dropout_scale": _dropout_scale(dropout_p),
        "seed_ptr": torch.int64 if has_dropout else torch.float32,
        "offset": 0,
        "BLOCK_M": block_m,
        "BLOCK_H": BLOCK_H,
        "BLOCK_P": block_p,
        "HAS_DROPOUT": has_dropout,
    }


def _fwd_args(gemm: torch.dtype, norm: torch.dtype, block_p: int, has_dropout: bool) -> dict:
    from lxmert_fast.kernels.sm90 import HIDDEN

    rows = _row_args(BLOCK_M, block_p, has_dropout, per_sm=8)
    return {
        **rows,
        "out_ptr": norm,
        "out_row_stride": HIDDEN,
        "proj_ptr": gemm,
        "proj_row_stride": HIDDEN,
        "boxes_ptr": gemm,
        "boxes_row_stride": rows["pos_dim"],
        "box_weight_ptr": gemm,
        "box_bias_ptr": gemm,
        "feat_ln_weight_ptr": norm,
        "feat_ln_bias_ptr": norm,
        "box_ln_weight_ptr": norm,
        "box_ln_bias_ptr": norm,
        "stats_ptr": torch.float32,
        "eps": 1e-12,
    }


def _bwd_args(gemm: torch.dtype, norm: torch.dtype, block_p: int, has_dropout: bool) -> dict:
    from lxmert_fast.kernels.sm90 import HIDDEN

    rows = _row_args(_bwd_block_m(block_p), block_p, has_dropout, per_sm=1)
    return {
        **rows,
        "dproj_ptr": gemm,
        "dproj_row_stride": HIDDEN,
        "dboxes_ptr": gemm,
        "dboxes_row_stride": rows["pos_dim"],
        "ln_partials_ptr": torch.float32,
        "box_weight_partials_ptr": torch.float32,
        "dout_ptr": norm,
        "dout_row_stride": HIDDEN,
        "proj_ptr": gemm,
        "proj_row_stride": HIDDEN,
        "boxes_ptr": gemm,
        "boxes_row_stride": rows["pos_dim"],
        "box_weight_ptr": gemm,
        "box_bias_ptr": gemm,
        "feat_ln_weight_ptr": norm,
        "box_ln_weight_ptr": norm,
        "stats_ptr": torch.float32,
    }


def _reduce_args(gemm: torch.dtype, norm: torch.dtype) -> dict:
    """The reduction of the backward's partials: one program per SM wrote them (``per_sm=1``);
    ``pos_dim`` is a launch-time int, so one variant serves both BLOCK_P."""
    from lxmert_fast.kernels.sm90 import HIDDEN, POS_DIM

    rows = _row_args(_bwd_block_m(BLOCK_PS[0]), BLOCK_PS[0], False, per_sm=1)
    return {
        "feat_bias_grad_ptr": gemm,
        "feat_ln_weight_grad_ptr": norm,
        "feat_ln_bias_grad_ptr": norm,
        "box_weight_grad_ptr": gemm,
        "box_bias_grad_ptr": gemm,
        "box_ln_weight_grad_ptr": norm,
        "box_ln_bias_grad_ptr": norm,
        "ln_partials_ptr": torch.float32,
        "box_weight_partials_ptr": torch.float32,
        "n_partials": triton.cdiv(rows["n_rows"], rows["rows_per_program"]),
        "hidden": HIDDEN,
        "pos_dim": POS_DIM,
        "BLOCK_P": REDUCE_ROWS,
        "BLOCK_COLS": REDUCE_COLS,
    }


register_fast_path(ops.VISUAL_EMBEDDING, visual_embedding, supports)
