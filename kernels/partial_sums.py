"""The second stage of the kernels' deterministic parameter-gradient sums.

A backward row kernel that reduces over rows (LayerNorm weight/bias, bias and small-weight
gradients) keeps one fp32 partial row per program and writes it to a ``[P, ..., N]`` buffer; a
second, small kernel then sums the ``P`` partials of each column in a fixed order with
:func:`sum_partials` and writes the gradient in its parameter's dtype. No atomics and no torch
ops after the kernels: bitwise reproducible for a given program count (the SM count on a GPU).
Used by :mod:`lxmert_fast.kernels.residual_layer_norm` and
:mod:`lxmert_fast.kernels.visual_embedding`, each with a reduce kernel over its own partials.

Tiling: a program owns ``BLOCK_COLS`` columns and adds ``BLOCK_P`` partial rows per step into a
``[BLOCK_P, BLOCK_COLS]`` fp32 accumulator, summed over its rows at the end: at LXMERT's 768
columns, 24 programs of 4 warps per reduced row, each reading the H100's 132 (visual embedding)
or 528 (residual LayerNorm) partials in 3 or 9 steps. ``sm90_variants`` of the two modules list
their reduce kernels: 40 (visual embedding) and 50 (residual LayerNorm) registers, no spills.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Partial rows summed per step, columns per program, warps per program (REDUCE_ROWS x REDUCE_COLS
# = 2048 fp32 values: 16 per thread at 4 warps).
REDUCE_ROWS = 64
REDUCE_COLS = 32
REDUCE_WARPS = 4


@triton.jit
def sum_partials(
    partial_ptr,  # fp32: partial p of column c at partial_ptr + p * partial_stride + c
    partial_stride,
    n_partials,  # P; 0 gives zeros
    cols,  # [BLOCK_COLS] column indices
    col_mask,  # [BLOCK_COLS]
    BLOCK_P: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """[BLOCK_COLS] fp32 sums over the ``n_partials`` partial rows, always in the same order."""
    parts = tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_P, BLOCK_COLS], dtype=tl.float32)
    for start in range(0, n_partials, BLOCK_P):
        rows = (start + parts).to(tl.int64)
        mask = (rows[:, None] < n_partials) & col_mask[None, :]
        acc += tl.load(partial_ptr + rows[:, None] * partial_stride + cols[None, :], mask=mask, other=0.0)
    return tl.sum(acc, axis=0)
