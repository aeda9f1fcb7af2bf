"""Fused LXMERT visual embedding, forward and backward.

Computes, for features ``[B, N, feat_dim]`` and boxes ``[B, N, pos_dim]``::

    out = dropout((LN_v(features·W_vᵀ + b_v) + LN_b(boxes·W_bᵀ + b_b)) / 2)   # [B, N, hidden]

exactly :func:`lxmert_fast.reference.visual_embedding`. Rows are ``M = B * N`` objects.

Forward: the ``feat_dim -> hidden`` projection is one cuBLAS ``addmm`` (``F.linear``); then
one row kernel reads each projected row once and does the ``pos_dim -> hidden`` box
projection as FMAs, both LayerNorms with fp32 statistics, the average and inverted
dropout, and writes the output plus the per-row ``mean``/``rstd`` of both LayerNorms (fp32).

Backward: one row kernel regenerates the dropout mask, runs both LayerNorm backwards and
writes ``d(features·W_vᵀ + b_v)`` (input dtype) and ``d boxes`` (``pos_dim`` is tiny, so
``dy·W_b`` is an in-register reduction). Every program keeps fp32 partial rows of the
gradients of both LayerNorm weights, the (shared) LayerNorm bias gradient, ``b_v``, ``b_b``
and ``W_b``; the launcher sums the partials in torch: deterministic, no atomics. So the box
projection's output gradient never goes to memory (the brief's ``dproj_b`` GEMMs would write
and re-read an ``[M, hidden]`` tensor for ``pos_dim`` MACs per element). ``d features =
dproj·W_v`` and ``dW_v = dprojᵀ·features`` are cuBLAS GEMMs. Saved for backward: the
``[M, hidden]`` projection (as eager PyTorch saves it for its LayerNorm), the flattened
features/boxes and the ``[4, M]`` fp32 stats; the box projection is recomputed.

Both row kernels are persistent: each program walks its rows in ``[BLOCK_M, BLOCK_H] = [4,
1024]`` tiles (several rows' loads in flight per program; one tile width for every hidden
size up to 1024, so the launcher picks among 24 variants) and
re-reads the ``W_b`` column it needs from L1 per tile rather than pinning a ``[BLOCK_H,
BLOCK_P]`` tile in registers. ptxas reports 209 (forward) / 253 (backward) registers per
thread at 8 warps, bf16, ``pos_dim`` 4, no spills: one program per SM at a time, four
rows in flight. Not yet timed on a GPU: ``BLOCK_M``/``num_warps`` are the knobs to tune.

Layouts: the projection, output and gradient rows are ``[M, hidden]`` with unit column
stride and a row stride argument; boxes ``[M, pos_dim]`` likewise; ``W_b`` is ``[hidden,
pos_dim]`` contiguous (``nn.Linear`` layout); LayerNorm parameters ``[hidden]`` contiguous.

Dtypes: fp32, fp16, bf16; every tensor of one call in the same dtype. Statistics, the box
projection and all partial sums are fp32; outputs are rounded once to the input dtype.

Dropout: element ``(row, col)`` is kept iff ``tl.rand(seed, offset + row * hidden + col) >=
p`` (Philox4x32-10 with key ``(seed, 0)`` and counter ``(index, 0, 0, 0)``, the first word as
triton's ``uint_to_uniform_float``). The index is cast to int32 on purpose: a 64-bit offset
selects a different Philox variant in older triton releases (the GPU runs triton 3.6).
:func:`dropout_keep_mask` exports the same mask for tests. ``dropout_p > 0`` draws ``seed``
from torch's default CPU generator (``torch.manual_seed`` reproduces a run, no CUDA sync).

Not supported (``supports`` says why and the dispatcher falls back to the reference):
mixed dtypes, fp64, ``hidden > 1024``, ``pos_dim > 8``, no rows, ``offset + M * hidden >=
2**31`` (int32 dropout index), autocast regions, parameters of unexpected shapes.

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
from lxmert_fast.kernels.sm90 import KernelVariant

Tensor = torch.Tensor

MAX_POS_DIM = 8
# One tile width for every hidden size up to 1024 (LXMERT's 768 needs it; narrower rows run
# masked): the launcher then picks among 24 variants, which keeps the sm_90 compile check short.
BLOCK_H = 1024
# Four rows per step: a 4096-element tile, 16 fp32 registers per thread per tile at 8 warps.
BLOCK_M = 4
BLOCK_PS = (4, 8)
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
MASK_BLOCK = 1024
# ptxas for sm_90: no spills at 8 warps for the LXMERT shape (hidden 768, pos_dim 4).
NUM_WARPS = 8
_INT32_LIMIT = 2**31


@triton.jit
def _dropout_keep(seed, index, p):
    # Philox on int32 counters, so triton 3.6 (GPU) and 3.9 (here) draw the same bits.
    return tl.rand(seed, index.to(tl.int32)) >= p


@triton.jit(do_not_specialize=["seed", "offset"])
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
    seed,
    offset,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)

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


@triton.jit(do_not_specialize=["seed", "offset"])
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
    seed,
    offset,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)

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

    partials = ln_partials_ptr + pid * 5 * hidden + cols
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


@triton.jit(do_not_specialize=["seed", "offset"])
def _dropout_keep_mask_kernel(
    keep_ptr,  # [n] int8 out
    n,
    seed,
    offset,
    dropout_p,
    BLOCK: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = _dropout_keep(seed, offset + idx, dropout_p)
    tl.store(keep_ptr + idx, keep.to(tl.int8), mask=idx < n)


def _block_p(pos_dim: int) -> int:
    return next(b for b in BLOCK_PS if pos_dim <= b)


def _programs(n_rows: int, block_m: int, device: torch.device, per_sm: int) -> tuple[int, int]:
    """(programs, rows per program): at most ``per_sm`` programs per SM, whole tiles each."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    tiles = triton.cdiv(n_rows, block_m)
    rows_per_program = triton.cdiv(tiles, min(tiles, sms * per_sm)) * block_m
    return triton.cdiv(n_rows, rows_per_program), rows_per_program


def _dropout_scale(dropout_p: float) -> float:
    return 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)


def _forward_rows(
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
    seed: int,
    offset: int,
) -> tuple[Tensor, Tensor]:
    """Launch the forward row kernel on ``proj`` [M, hidden]; returns (out [M, hidden], stats [4, M])."""
    n_rows, hidden = proj.shape
    pos_dim = boxes.shape[1]
    out = torch.empty_like(proj)
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
        seed,
        offset,
        BLOCK_M=BLOCK_M,
        BLOCK_H=BLOCK_H,
        BLOCK_P=_block_p(pos_dim),
        HAS_DROPOUT=dropout_p > 0.0,
        num_warps=NUM_WARPS,
    )
    return out, stats


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
    seed: int,
    offset: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the backward row kernel; returns (dproj [M, hidden], dboxes [M, pos_dim],
    summed LayerNorm/bias grads [5, hidden] fp32, dW_b [hidden, pos_dim] fp32)."""
    n_rows, hidden = proj.shape
    pos_dim = boxes.shape[1]
    dproj = torch.empty_like(proj)
    dboxes = torch.empty_like(boxes)
    # One program per SM: each writes 5 + pos_dim partial rows, and at ~253 registers per
    # thread (ptxas, 8 warps) a second one could not be resident anyway.
    programs, rows_per_program = _programs(n_rows, BLOCK_M, proj.device, per_sm=1)
    ln_partials = torch.empty((programs, 5, hidden), dtype=torch.float32, device=proj.device)
    box_weight_partials = torch.empty((programs, pos_dim, hidden), dtype=torch.float32, device=proj.device)
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
        seed,
        offset,
        BLOCK_M=BLOCK_M,
        BLOCK_H=BLOCK_H,
        BLOCK_P=_block_p(pos_dim),
        HAS_DROPOUT=dropout_p > 0.0,
        num_warps=NUM_WARPS,
    )
    return dproj, dboxes, ln_partials.sum(dim=0), box_weight_partials.sum(dim=0).t().contiguous()


def dropout_keep_mask(
    seed: int, offset: int, shape: tuple[int, ...], dropout_p: float, device: torch.device | str = "cpu"
) -> Tensor:
    """The bool keep-mask the kernels draw for ``(seed, offset)`` over a row-major ``shape``.

    For tests: ``reference.visual_embedding(..., keep_mask=dropout_keep_mask(...))`` is what
    the fused op computes with the same seed and offset.
    """
    n = 1
    for size in shape:
        n *= size
    if offset < 0 or offset + n >= _INT32_LIMIT:
        raise ValueError(f"offset: expected 0 <= offset and offset + numel < 2**31, got {offset} + {n}")
    if not 0 <= seed < _INT32_LIMIT:
        raise ValueError(f"seed: expected 0 <= seed < 2**31 (an int32 kernel argument), got {seed}")
    keep = torch.empty(n, dtype=torch.int8, device=device)
    if n:
        _dropout_keep_mask_kernel[(triton.cdiv(n, MASK_BLOCK),)](
            keep, n, seed, offset, dropout_p, BLOCK=MASK_BLOCK
        )
    return keep.view(shape).bool()


class VisualEmbeddingFunction(torch.autograd.Function):
    """Autograd of the fused visual embedding; ``seed``/``offset`` fix the dropout draw."""

    @staticmethod
    def forward(
        ctx,
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
        seed: int,
        offset: int,
    ) -> Tensor:
        batch_shape = features.shape[:-1]
        features_2d = features.reshape(-1, features.shape[-1])
        boxes_2d = boxes.reshape(-1, boxes.shape[-1]).contiguous()
        box_weight = box_weight.contiguous()
        proj = F.linear(features_2d, feat_weight, feat_bias)
        out, stats = _forward_rows(
            proj,
            boxes_2d,
            box_weight,
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
        # The features only feed dW_v; not keeping them alive when W_v is frozen.
        ctx.save_for_backward(
            features_2d if ctx.needs_input_grad[2] else None,
            boxes_2d,
            feat_weight,
            proj,
            stats,
            box_weight,
            box_bias,
            feat_ln_weight,
            box_ln_weight,
        )
        ctx.dropout = (dropout_p, seed, offset)
        ctx.shapes = (features.shape, boxes.shape)
        return out.view(*batch_shape, -1)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (
            features_2d,
            boxes_2d,
            feat_weight,
            proj,
            stats,
            box_weight,
            box_bias,
            feat_ln_weight,
            box_ln_weight,
        ) = ctx.saved_tensors
        features_shape, boxes_shape = ctx.shapes
        dout = grad_out.reshape(proj.shape).contiguous()
        dproj, dboxes, ln_sums, d_box_weight = _backward_rows(
            dout,
            proj,
            boxes_2d,
            box_weight,
            box_bias.contiguous(),
            feat_ln_weight.contiguous(),
            box_ln_weight.contiguous(),
            stats,
            *ctx.dropout,
        )
        need = ctx.needs_input_grad
        d_features = (dproj @ feat_weight).view(features_shape) if need[0] else None
        d_boxes = dboxes.view(boxes_shape) if need[1] else None
        d_feat_weight = dproj.t() @ features_2d if need[2] else None
        dtype = proj.dtype
        d_feat_g, d_beta, d_feat_b, d_box_g, d_box_b = ln_sums.to(dtype).unbind(0)
        return (
            d_features,
            d_boxes,
            d_feat_weight,
            d_feat_b,
            d_feat_g,
            d_beta,
            d_box_weight.to(dtype),
            d_box_b,
            d_box_g,
            d_beta.clone(),
            None,
            None,
            None,
            None,
        )


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
    if features.dtype not in DTYPES:
        return f"features: dtype {features.dtype} is not fp32, fp16 or bf16"
    for name, t in named[1:]:
        if t.dtype != features.dtype:
            return f"{name}: dtype {t.dtype} differs from features' {features.dtype} (mixed dtypes)"
        if t.device != features.device:
            return f"{name}: device {t.device} differs from features' {features.device}"
    if torch.is_autocast_enabled(features.device.type):
        return "autocast is active (the kernels expect one dtype for every tensor)"
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
    seed: int | None = None,
    offset: int = 0,
) -> Tensor:
    """Fused visual embedding ``[B, N, hidden]``; ``dropout_p > 0`` is training mode.

    ``seed`` defaults to a draw from torch's default CPU generator when dropout is on;
    tests pass ``seed``/``offset`` to compare with :func:`dropout_keep_mask`.
    """
    if dropout_p > 0.0 and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()))
    if seed is not None and not 0 <= seed < _INT32_LIMIT:
        raise ValueError(f"seed: expected 0 <= seed < 2**31 (an int32 kernel argument), got {seed}")
    n_elements = features.shape[:-1].numel() * feat_weight.shape[0]
    if offset < 0 or offset + n_elements >= _INT32_LIMIT:
        raise ValueError(
            f"offset: expected 0 <= offset and offset + numel < 2**31, got {offset} + {n_elements}"
        )
    return VisualEmbeddingFunction.apply(
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
        0 if seed is None else int(seed),
        int(offset),
    )


def sm90_variants() -> list[KernelVariant]:
    """Every specialisation the launchers can pick: dtype x BLOCK_P x dropout x fwd/bwd, plus the mask
    kernel, each with the arguments of LXMERT pre-training (B * 36 contiguous rows of 768; the
    widest boxes a BLOCK_P serves)."""
    from lxmert_fast.kernels.sm90 import BATCH, BOXES, DROPOUT_P, HIDDEN

    variants = [
        KernelVariant(
            "visual_embedding_keep_mask",
            _dropout_keep_mask_kernel,
            {
                "keep_ptr": torch.int8,
                "n": BATCH * BOXES * HIDDEN,
                "seed": 1_234_567,
                "offset": 0,
                "dropout_p": DROPOUT_P,
                "BLOCK": MASK_BLOCK,
            },
        )
    ]
    for dtype, name in DTYPES.items():
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
                            args(dtype, block_p, has_dropout),
                            {"num_warps": NUM_WARPS},
                        )
                    )
    return variants


def _row_args(block_p: int, has_dropout: bool, per_sm: int) -> dict:
    """Shape, dropout and constexpr arguments as the launchers pass them; a fresh seed each call.

    ``rows_per_program`` is ``_programs`` on a 132-SM card.
    """
    from lxmert_fast.kernels.sm90 import BATCH, BOXES, DROPOUT_P, H100_SMS, HIDDEN

    n_rows = BATCH * BOXES
    tiles = triton.cdiv(n_rows, BLOCK_M)
    dropout_p = DROPOUT_P if has_dropout else 0.0
    return {
        "n_rows": n_rows,
        "hidden": HIDDEN,
        "pos_dim": block_p,
        "rows_per_program": triton.cdiv(tiles, min(tiles, H100_SMS * per_sm)) * BLOCK_M,
        "dropout_p": dropout_p,
        "dropout_scale": _dropout_scale(dropout_p),
        "seed": 1_234_567 if has_dropout else 0,
        "offset": 0,
        "BLOCK_M": BLOCK_M,
        "BLOCK_H": BLOCK_H,
        "BLOCK_P": block_p,
        "HAS_DROPOUT": has_dropout,
    }


def _fwd_args(dtype: torch.dtype, block_p: int, has_dropout: bool) -> dict:
    from lxmert_fast.kernels.sm90 import HIDDEN

    rows = _row_args(block_p, has_dropout, per_sm=8)
    return {
        **rows,
        "out_ptr": dtype,
        "out_row_stride": HIDDEN,
        "proj_ptr": dtype,
        "proj_row_stride": HIDDEN,
        "boxes_ptr": dtype,
        "boxes_row_stride": rows["pos_dim"],
        "box_weight_ptr": dtype,
        "box_bias_ptr": dtype,
        "feat_ln_weight_ptr": dtype,
        "feat_ln_bias_ptr": dtype,
        "box_ln_weight_ptr": dtype,
        "box_ln_bias_ptr": dtype,
        "stats_ptr": torch.float32,
        "eps": 1e-12,
    }


def _bwd_args(dtype: torch.dtype, block_p: int, has_dropout: bool) -> dict:
    from lxmert_fast.kernels.sm90 import HIDDEN

    rows = _row_args(block_p, has_dropout, per_sm=1)
    return {
        **rows,
        "dproj_ptr": dtype,
        "dproj_row_stride": HIDDEN,
        "dboxes_ptr": dtype,
        "dboxes_row_stride": rows["pos_dim"],
        "ln_partials_ptr": torch.float32,
        "box_weight_partials_ptr": torch.float32,
        "dout_ptr": dtype,
        "dout_row_stride": HIDDEN,
        "proj_ptr": dtype,
        "proj_row_stride": HIDDEN,
        "boxes_ptr": dtype,
        "boxes_row_stride": rows["pos_dim"],
        "box_weight_ptr": dtype,
        "box_bias_ptr": dtype,
        "feat_ln_weight_ptr": dtype,
        "box_ln_weight_ptr": dtype,
        "stats_ptr": torch.float32,
    }


register_fast_path(ops.VISUAL_EMBEDDING, visual_embedding, supports)
