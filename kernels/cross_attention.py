"""Fused bidirectional cross-attention of LXMERT's cross-modality layer (forward and backward).

Computes exactly :func:`lxmert_fast.reference.bidirectional_cross_attention`, both directions in
ONE launch::

    lang rows   i < L:  ctx[i]     = dropout(softmax(q_i · K_visᵀ / sqrt(d) + visual_bias)) · V_vis
    vision rows j < V:  ctx[L + j] = dropout(softmax(q_j · K_langᵀ / sqrt(d) + lang_bias)) · V_lang

per (batch, head), where Q/K/V come from one shared projection of the concatenated
[language; vision] tokens. Grid axis 0 is batch x heads (axis 0 has no 65535 limit); axis 1
enumerates the query blocks of the language stream, then those of the vision stream, so a program
knows its direction from its block index. Keys are walked in blocks with an online softmax, so any
lengths work (language and vision lengths are independent; tested up to 130 x 70).

Layouts and dtypes
    ``qkv``: [B, L+V, 3*hidden], fp32/fp16/bf16, any batch and token strides, last-dim stride 1
    (a slice or other view is read in place: no transpose, no copy). Each token row is
    ``[q | k | v]``, each of ``hidden = heads * head_dim`` features, head-major.
    ``lang_bias`` [B, L], ``visual_bias`` [B, V]: additive key biases or None, any strides; the
    launcher casts them to the qkv dtype first, as the reference does (``bias.to(scores.dtype)``),
    so an fp32 ``finfo.min`` bias becomes ``-inf`` for half inputs in both.
    ``context``: a new contiguous [B, L+V, hidden] in the qkv dtype, rows in the qkv row order,
    ready for the output dense. ``d(qkv)``: a new contiguous [B, L+V, 3*hidden]; every element is
    written by exactly one program (dQ programs write the q columns, dK/dV programs the k and v
    columns), so it needs no zero fill.
    Scores, softmax statistics and accumulators are fp32; the operands of the dots are the input
    dtype (P and dS are rounded to it, as flash-attention does), fp32 inputs use IEEE dots (no
    TF32). Under the interpreter bf16 operands are upcast to fp32 before the dots (its bf16
    ``tl.dot`` is silently wrong), after the same rounding as on the GPU.

Saved for backward
    ``qkv``, the biases, the seed tensor, the context, and two fp32 numbers per query row and head:
    the row maximum ``m``
    (0 for a row whose every score is ``-inf``) and ``1 / sum exp(s - m)`` (0 for such a row).
    Not probabilities, not masks. One log-sum-exp would not do: with a finite ``finfo.min`` mask,
    ``m ~ -3.4e38`` absorbs ``log(sum)`` and the backward would rebuild P = 1 instead of the
    uniform 1/V of a fully masked row (the same loss of precision hits ``-10000`` masks).

Dropout randomness
    On the attention probabilities, regenerated in the backward, never stored. Philox4x32-10
    keyed by the seed, a 32-bit key (the project's convention, :mod:`lxmert_fast.philox`, for
    seeds below 2**32; drawn seeds are below 2**31): probability
    (batch b, head h, query i, key j) of direction ``dir`` (0 = language queries, 1 = vision
    queries) uses counter ``offset + (b*heads + h) * 2*L*V + dir*L*V + i*K + j`` with ``K`` the key
    count of that direction (V, resp. L), and is dropped when the first word ``>> 8`` is below
    ``floor(p * 2**24)`` (``reference.probability_threshold``). :func:`dropout_keep_masks`
    exports those masks through the same ``@triton.jit`` helpers for tests. The seed comes from
    device state, never from the host: the dispatcher's entry point draws it per call with
    :func:`lxmert_fast.philox.draw_seed` (an int64 [1] tensor from the generator of qkv's
    device) and the kernels ``tl.load`` it from ``seed_ptr`` (only under ``DROPOUT``), so there is
    no host sync, each replay of a captured CUDA graph draws fresh masks, and
    ``torch.manual_seed`` reproduces eager and compiled runs alike. The offset is 0 there; it
    stays a plain int kernel argument, ``do_not_specialize`` so that a new value compiles nothing.

Registration
    ``lxmert_fast::cross_attention_fwd`` (-> context, row_max, row_inv_sum) and
    ``lxmert_fast::cross_attention_bwd`` (-> d(qkv)) are ``torch.library.custom_op``s with fake
    kernels; the forward's ``register_autograd`` calls the backward op, so
    ``torch.compile(fullgraph=True)`` sees two opaque ops and no graph break. Their arguments are
    tensors and primitives (the launch plan is rebuilt inside each op). ``triton_op`` would let
    inductor see the kernels on CUDA, but it does not run under the interpreter (DESIGN.md §6).
    :func:`cross_attention`, the dispatcher's fast path, draws the seed, casts the biases and
    calls the forward op.

Backward
    One launch, no atomics, deterministic: grid axis 1 enumerates dK/dV programs (one per key block of
    the vision keys, then of the language keys; each walks every query block of the other stream)
    and then dQ programs (one per query block, walking the key blocks). Each program recomputes
    ``delta = rowsum(dO * O)`` for the query rows it visits instead of a separate pre-pass: the
    sequences are short (20 x 36 in pre-training), so this saves a launch and a tensor for a few
    extra row reads. Bias gradients are not computed (masks are not learned): ``supports`` rejects
    a bias that requires grad.

Specialisations
    Tiles depend on (head_dim, dtype, direction) only, not the lengths (``_tiles``: 64 x 64 for
    half inputs, 32 x 32 for fp32, smaller backward tiles and more warps where the sm_90 compile
    check found register spills), head_dim and dropout are constexprs; the presence of
    each bias is a runtime length, so ``sm90_variants()`` lists 3 dtypes x 3 head_dims x 2 dropout
    flags x (fwd, bwd) plus the test-only mask export. ``seed_ptr`` is the int64 seed tensor with
    dropout and qkv (never read) without, as an absent bias passes qkv.

Not supported (``supports`` says why): head_dim outside {32, 64, 128}, fp64, last-dim stride of
qkv != 1, biases that require grad, CPU tensors unless ``TRITON_INTERPRET=1`` at import.

Hazards and how they are tested (tests/test_cross_attention_kernel.py; registration, fullgraph
compile and fresh masks per compiled call in tests/test_cross_attention_op.py)
    * Fully masked rows: ``-inf`` everywhere gives a zero context and zero gradients, never NaN
      (the max is replaced by 0 before the exponentials, the sum guarded); a finite ``finfo.min``
      gives uniform attention, as the reference. Bias is added after scaling and exponentials use
      ``exp`` in natural units: pre-multiplying by log2(e) would overflow ``finfo.min`` to -inf.
      Tested with both biases, forward and d(qkv), fp32 and fp16.
    * ``p == 1`` drops everything through ``where`` (scale 0 is never multiplied by ``inf``).
    * Half-precision inputs: compared with an fp32 reference, bounded by twice the error of a
      half-precision reference. With half inputs and a finite half ``finfo.min`` bias the fp32
      math here does not overflow where the half reference does; the fp32 reference is the truth.
    * Non-contiguous qkv views, awkward lengths (1, 7, 20, 33 x 1, 10, 36, 50), bitwise
      reproducible backward, dropout masks equal to the torch Philox and the reference given
      those masks; every sm_90 variant compiles (tests/test_compile_sm90.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lxmert_fast import ops
from lxmert_fast.backend import register_fast_path
from lxmert_fast.kernels.sm90 import KernelVariant
from lxmert_fast.philox import draw_seed, seed_tensor
from lxmert_fast.reference import probability_threshold

Tensor = torch.Tensor

HEAD_DIMS = (32, 64, 128)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_SIGNATURE_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def _direction(lang_queries, lang_len, vis_len, pid_bh, drop_offset):
    """Geometry of one direction: (query row start, query count, key row start, key count,
    first Philox counter of this (batch, head, direction))."""
    q_start = tl.where(lang_queries, 0, lang_len)
    q_len = tl.where(lang_queries, lang_len, vis_len)
    k_start = tl.where(lang_queries, lang_len, 0)
    k_len = tl.where(lang_queries, vis_len, lang_len)
    pair = lang_len * vis_len
    drop_base = drop_offset + pid_bh * (2 * pair) + tl.where(lang_queries, 0, pair)
    return q_start, q_len, k_start, k_len, drop_base


@triton.jit
def _dropout_keep(seed, drop_base, q_idx, k_idx, k_len, drop_threshold):
    """Keep flags of probabilities (q_idx, k_idx) (broadcast to 2-D) of one (batch, head, direction).

    The only element -> random mapping of this file: every kernel, and the test export, call it.
    """
    bits = tl.randint(seed, drop_base + q_idx * k_len + k_idx)
    return (bits >> 8).to(tl.int32) >= drop_threshold


@triton.jit
def _load_seed(seed_ptr):
    """The Philox key of this call, loaded from the int64 [1] seed tensor.

    Loaded, not passed by value: drawn on the device per call, so a captured graph replays fresh.
    Its low 32 bits, unsigned (seeds are drawn below 2**31, ``philox.SEED_BOUND``; explicit ones
    are checked below 2**32), give exactly the stream of the same int seed with a constant 0 high
    key word. How it is loaded is a register-pressure workaround, measured with the sm_90 compile
    check (2026-12-01, triton 3.9) on the half-precision d64 backward with dropout (LXMERT's; no
    spill with the by-value seed): loaded once, an int64 key spilled 22 words and a 32-bit key 50;
    loaded at each use, 14 and 0. Volatile keeps the load at its use (the compiler hoists a plain
    one). So the backward loads at each use and the forward once (at each use, the fp32 d128
    forward spilled 86 words).
    """
    return tl.load(seed_ptr, volatile=True).to(tl.uint32)


@triton.jit
def _key_bias(
    lang_bias_ptr,  # [B, L], read iff lang_bias_len > 0
    stride_lb_b,
    stride_lb_t,
    lang_bias_len,
    vis_bias_ptr,  # [B, V], read iff vis_bias_len > 0
    stride_vb_b,
    stride_vb_t,
    vis_bias_len,
    b,
    offs_k,
    k_len,
    lang_queries,
):
    """fp32 additive bias of keys ``offs_k``: -inf past the key count, plus the stream's bias.

    An absent bias has length 0. Presence is a runtime length rather than a constexpr: the
    masked-off load costs nothing next to the dots, and it divides the sm_90 variants to compile
    by four. The direction also enters through the bound (the interpreter rejects a mask
    combined with a scalar boolean), so a program reads only the bias of its own keys.
    """
    vis_keys = tl.where(lang_queries, vis_bias_len, 0)
    lang_keys = tl.where(lang_queries, 0, lang_bias_len)
    vb = tl.load(vis_bias_ptr + b * stride_vb_b + offs_k * stride_vb_t, mask=offs_k < vis_keys, other=0.0)
    lb = tl.load(lang_bias_ptr + b * stride_lb_b + offs_k * stride_lb_t, mask=offs_k < lang_keys, other=0.0)
    return tl.where(offs_k < k_len, 0.0, float("-inf")) + vb.to(tl.float32) + lb.to(tl.float32)


@triton.jit(do_not_specialize=["drop_offset"])
def _cross_attention_fwd_kernel(
    qkv_ptr,  # [B, L+V, 3*hidden], last-dim stride 1
    stride_qkv_b,
    stride_qkv_t,
    lang_bias_ptr,  # [B, L] qkv dtype, read iff lang_bias_len > 0
    stride_lb_b,
    stride_lb_t,
    lang_bias_len,  # L, or 0 without a language bias
    vis_bias_ptr,  # [B, V] qkv dtype, read iff vis_bias_len > 0
    stride_vb_b,
    stride_vb_t,
    vis_bias_len,  # V, or 0 without a vision bias
    out_ptr,  # [B, L+V, hidden], last-dim stride 1
    stride_out_b,
    stride_out_t,
    row_max_ptr,  # [B, heads, L+V] fp32, contiguous
    row_inv_sum_ptr,  # [B, heads, L+V] fp32, contiguous
    lang_len,
    vis_len,
    num_heads,
    sm_scale,
    seed_ptr,  # [1] int64 Philox key, read iff DROPOUT
    drop_offset,
    drop_threshold,
    drop_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    hidden = num_heads * HEAD_DIM
    io_dtype = qkv_ptr.dtype.element_ty

    n_lang_blocks = tl.cdiv(lang_len, BLOCK_M)
    lang_queries = pid_m < n_lang_blocks
    q_block = tl.where(lang_queries, pid_m, pid_m - n_lang_blocks)
    q_start, q_len, k_start, k_len, drop_base = _direction(
        lang_queries, lang_len, vis_len, pid_bh, drop_offset
    )

    offs_m = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_mask = offs_m < q_len
    head_cols = h * HEAD_DIM + offs_d
    qkv_batch = qkv_ptr + b * stride_qkv_b
    seed = _load_seed(seed_ptr) if DROPOUT else 0

    q = tl.load(
        qkv_batch + (q_start + offs_m)[:, None] * stride_qkv_t + head_cols[None, :],
        mask=m_mask[:, None],
        other=0.0,
    ).to(DOT_DTYPE)

    # Initialised to -inf: a row stays -inf only if every key is -inf (handled below).
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, k_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < k_len
        kv_rows = (k_start + offs_n)[:, None] * stride_qkv_t
        k = tl.load(qkv_batch + kv_rows + hidden + head_cols[None, :], mask=n_mask[:, None], other=0.0)
        v = tl.load(qkv_batch + kv_rows + 2 * hidden + head_cols[None, :], mask=n_mask[:, None], other=0.0)
        bias = _key_bias(
            lang_bias_ptr,
            stride_lb_b,
            stride_lb_t,
            lang_bias_len,
            vis_bias_ptr,
            stride_vb_b,
            stride_vb_t,
            vis_bias_len,
            b,
            offs_n,
            k_len,
            lang_queries,
        )
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * sm_scale + bias[None, :]
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # exp(-inf - -inf) is NaN: a row with no finite score so far uses 0 as its reference.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_ref)
        p = tl.exp(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DROPOUT:
            keep = _dropout_keep(seed, drop_base, offs_m[:, None], offs_n[None, :], k_len, drop_threshold)
            p = tl.where(keep, p * drop_scale, 0.0)
        acc = acc * alpha[:, None] + tl.dot(
            p.to(io_dtype).to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION
        )
        m_i = m_new

    inv_l = tl.where(l_i > 0.0, 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)
    out = acc * inv_l[:, None]
    tl.store(
        out_ptr + b * stride_out_b + (q_start + offs_m)[:, None] * stride_out_t + head_cols[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None],
    )
    stat_rows = pid_bh * (lang_len + vis_len) + q_start + offs_m
    tl.store(row_max_ptr + stat_rows, tl.where(m_i == float("-inf"), 0.0, m_i), mask=m_mask)
    tl.store(row_inv_sum_ptr + stat_rows, inv_l, mask=m_mask)


@triton.jit
def _bwd_query_rows(
    qkv_batch,
    stride_qkv_t,
    out_ptr,  # [B, L+V, hidden]
    stride_out_b,
    stride_out_t,
    dout_ptr,  # [B, L+V, hidden]
    stride_dout_b,
    stride_dout_t,
    row_max_ptr,  # [B, heads, L+V] fp32
    row_inv_sum_ptr,  # [B, heads, L+V] fp32
    b,
    pid_bh,
    head_cols,
    offs_m,
    q_start,
    q_len,
    total_len,
    DOT_DTYPE: tl.constexpr,
):
    """Everything the backward needs of query rows ``offs_m``: q, dO, softmax statistics, delta.

    Rows past the query count get zero q/dO and statistics 0, so their P and dS vanish.
    """
    m_mask = offs_m < q_len
    rows = q_start + offs_m
    q = tl.load(
        qkv_batch + rows[:, None] * stride_qkv_t + head_cols[None, :], mask=m_mask[:, None], other=0.0
    )
    do = tl.load(
        dout_ptr + b * stride_dout_b + rows[:, None] * stride_dout_t + head_cols[None, :],
        mask=m_mask[:, None],
        other=0.0,
    )
    o = tl.load(
        out_ptr + b * stride_out_b + rows[:, None] * stride_out_t + head_cols[None, :],
        mask=m_mask[:, None],
        other=0.0,
    )
    # delta = rowsum(P∘dP) = rowsum(dO∘O), also with dropout (O already holds the kept, scaled P).
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    stat_rows = pid_bh * total_len + rows
    row_max = tl.load(row_max_ptr + stat_rows, mask=m_mask, other=0.0)
    row_inv_sum = tl.load(row_inv_sum_ptr + stat_rows, mask=m_mask, other=0.0)
    return q.to(DOT_DTYPE), do.to(DOT_DTYPE), delta, row_max, row_inv_sum


@triton.jit(do_not_specialize=["drop_offset"])
def _cross_attention_bwd_kernel(
    qkv_ptr,  # [B, L+V, 3*hidden], last-dim stride 1
    stride_qkv_b,
    stride_qkv_t,
    lang_bias_ptr,  # [B, L] qkv dtype, read iff lang_bias_len > 0
    stride_lb_b,
    stride_lb_t,
    lang_bias_len,  # L, or 0 without a language bias
    vis_bias_ptr,  # [B, V] qkv dtype, read iff vis_bias_len > 0
    stride_vb_b,
    stride_vb_t,
    vis_bias_len,  # V, or 0 without a vision bias
    out_ptr,  # [B, L+V, hidden] forward context, last-dim stride 1
    stride_out_b,
    stride_out_t,
    dout_ptr,  # [B, L+V, hidden] gradient of the context, last-dim stride 1
    stride_dout_b,
    stride_dout_t,
    dqkv_ptr,  # [B, L+V, 3*hidden] output, last-dim stride 1
    stride_dqkv_b,
    stride_dqkv_t,
    row_max_ptr,  # [B, heads, L+V] fp32, contiguous
    row_inv_sum_ptr,  # [B, heads, L+V] fp32, contiguous
    lang_len,
    vis_len,
    num_heads,
    sm_scale,
    seed_ptr,  # [1] int64 Philox key, read iff DROPOUT
    drop_offset,
    drop_threshold,
    drop_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    hidden = num_heads * HEAD_DIM
    total_len = lang_len + vis_len
    io_dtype = qkv_ptr.dtype.element_ty
    offs_d = tl.arange(0, HEAD_DIM)
    head_cols = h * HEAD_DIM + offs_d
    qkv_batch = qkv_ptr + b * stride_qkv_b
    dqkv_batch = dqkv_ptr + b * stride_dqkv_b

    n_vis_key_blocks = tl.cdiv(vis_len, BLOCK_N)
    n_key_blocks = n_vis_key_blocks + tl.cdiv(lang_len, BLOCK_N)
    if pid < n_key_blocks:
        # dK, dV of one key block: vision keys (language queries) first, then language keys.
        lang_queries = pid < n_vis_key_blocks
        k_block = tl.where(lang_queries, pid, pid - n_vis_key_blocks)
        q_start, q_len, k_start, k_len, drop_base = _direction(
            lang_queries, lang_len, vis_len, pid_bh, drop_offset
        )
        offs_n = k_block * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < k_len
        kv_rows = (k_start + offs_n)[:, None] * stride_qkv_t
        k = tl.load(qkv_batch + kv_rows + hidden + head_cols[None, :], mask=n_mask[:, None], other=0.0)
        v = tl.load(qkv_batch + kv_rows + 2 * hidden + head_cols[None, :], mask=n_mask[:, None], other=0.0)
        k = k.to(DOT_DTYPE)
        v = v.to(DOT_DTYPE)
        bias = _key_bias(
            lang_bias_ptr,
            stride_lb_b,
            stride_lb_t,
            lang_bias_len,
            vis_bias_ptr,
            stride_vb_b,
            stride_vb_t,
            vis_bias_len,
            b,
            offs_n,
            k_len,
            lang_queries,
        )
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        for start_m in range(0, q_len, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q, do, delta, row_max, row_inv_sum = _bwd_query_rows(
                qkv_batch,
                stride_qkv_t,
                out_ptr,
                stride_out_b,
                stride_out_t,
                dout_ptr,
                stride_dout_b,
                stride_dout_t,
                row_max_ptr,
                row_inv_sum_ptr,
                b,
                pid_bh,
                head_cols,
                offs_m,
                q_start,
                q_len,
                total_len,
                DOT_DTYPE,
            )
            # Transposed tiles [keys, queries]: dK and dV accumulate over queries without transposes.
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * sm_scale + bias[:, None]
            p_t = tl.exp(s_t - row_max[None, :]) * row_inv_sum[None, :]
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            if DROPOUT:
                keep_t = _dropout_keep(
                    _load_seed(seed_ptr), drop_base, offs_m[None, :], offs_n[:, None], k_len, drop_threshold
                )
                p_kept_t = tl.where(keep_t, p_t * drop_scale, 0.0)
                dp_t = tl.where(keep_t, dp_t * drop_scale, 0.0)
            else:
                p_kept_t = p_t
            dv += tl.dot(p_kept_t.to(io_dtype).to(DOT_DTYPE), do, input_precision=DOT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(io_dtype).to(DOT_DTYPE), q, input_precision=DOT_PRECISION)
        rows = (k_start + offs_n)[:, None] * stride_dqkv_t
        tl.store(
            dqkv_batch + rows + hidden + head_cols[None, :],
            (dk * sm_scale).to(dqkv_ptr.dtype.element_ty),
            mask=n_mask[:, None],
        )
        tl.store(
            dqkv_batch + rows + 2 * hidden + head_cols[None, :],
            dv.to(dqkv_ptr.dtype.element_ty),
            mask=n_mask[:, None],
        )
    else:
        # dQ of one query block: language queries first, then vision queries.
        pid_q = pid - n_key_blocks
        n_lang_blocks = tl.cdiv(lang_len, BLOCK_M)
        lang_queries = pid_q < n_lang_blocks
        q_block = tl.where(lang_queries, pid_q, pid_q - n_lang_blocks)
        q_start, q_len, k_start, k_len, drop_base = _direction(
            lang_queries, lang_len, vis_len, pid_bh, drop_offset
        )
        offs_m = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
        q, do, delta, row_max, row_inv_sum = _bwd_query_rows(
            qkv_batch,
            stride_qkv_t,
            out_ptr,
            stride_out_b,
            stride_out_t,
            dout_ptr,
            stride_dout_b,
            stride_dout_t,
            row_max_ptr,
            row_inv_sum_ptr,
            b,
            pid_bh,
            head_cols,
            offs_m,
            q_start,
            q_len,
            total_len,
            DOT_DTYPE,
        )
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for start_n in range(0, k_len, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_mask = offs_n < k_len
            kv_rows = (k_start + offs_n)[:, None] * stride_qkv_t
            k = tl.load(qkv_batch + kv_rows + hidden + head_cols[None, :], mask=n_mask[:, None], other=0.0)
            v = tl.load(
                qkv_batch + kv_rows + 2 * hidden + head_cols[None, :], mask=n_mask[:, None], other=0.0
            )
            k = k.to(DOT_DTYPE)
            bias = _key_bias(
                lang_bias_ptr,
                stride_lb_b,
                stride_lb_t,
                lang_bias_len,
                vis_bias_ptr,
                stride_vb_b,
                stride_vb_t,
                vis_bias_len,
                b,
                offs_n,
                k_len,
                lang_queries,
            )
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale + bias[None, :]
            p = tl.exp(s - row_max[:, None]) * row_inv_sum[:, None]
            dp = tl.dot(do, tl.trans(v.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
            if DROPOUT:
                keep = _dropout_keep(
                    _load_seed(seed_ptr), drop_base, offs_m[:, None], offs_n[None, :], k_len, drop_threshold
                )
                dp = tl.where(keep, dp * drop_scale, 0.0)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(io_dtype).to(DOT_DTYPE), k, input_precision=DOT_PRECISION)
        tl.store(
            dqkv_batch + (q_start + offs_m)[:, None] * stride_dqkv_t + head_cols[None, :],
            (dq * sm_scale).to(dqkv_ptr.dtype.element_ty),
            mask=(offs_m < q_len)[:, None],
        )


@triton.jit(do_not_specialize=["drop_offset"])
def _dropout_keep_masks_kernel(
    lang_keep_ptr,  # [B, heads, L, V] uint8, contiguous
    vis_keep_ptr,  # [B, heads, V, L] uint8, contiguous
    lang_len,
    vis_len,
    seed_ptr,  # [1] int64 Philox key
    drop_offset,
    drop_threshold,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    n_lang_blocks = tl.cdiv(lang_len, BLOCK_M)
    lang_queries = pid_m < n_lang_blocks
    q_block = tl.where(lang_queries, pid_m, pid_m - n_lang_blocks)
    _, q_len, _, k_len, drop_base = _direction(lang_queries, lang_len, vis_len, pid_bh, drop_offset)
    offs_m = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    seed = _load_seed(seed_ptr)
    for start_n in range(0, k_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, drop_base, offs_m[:, None], offs_n[None, :], k_len, drop_threshold)
        n_mask = (offs_n < k_len)[None, :]
        # Both masks hold L*V flags per (batch, head), row-major over (query, key).
        flat = pid_bh * lang_len * vis_len + offs_m[:, None] * k_len + offs_n[None, :]
        lang_rows = tl.where(lang_queries, q_len, 0)
        vis_rows = tl.where(lang_queries, 0, q_len)
        tl.store(lang_keep_ptr + flat, keep.to(tl.uint8), mask=(offs_m < lang_rows)[:, None] & n_mask)
        tl.store(vis_keep_ptr + flat, keep.to(tl.uint8), mask=(offs_m < vis_rows)[:, None] & n_mask)


# The test-only mask export: 8 warps (172 registers), where 4 spilled 28-30 words on sm_90.
_MASK_WARPS = 8


@dataclass(frozen=True)
class _Tiles:
    """Block sizes and launch options of one direction's kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int | None = None  # None: triton's default

    def launch_options(self) -> dict:
        options = {"num_warps": self.num_warps}
        if self.num_stages is not None:
            options["num_stages"] = self.num_stages
        return options


@dataclass(frozen=True)
class _Plan:
    """Launch parameters shared by the forward and the backward of one call (rebuilt inside each
    custom op from its primitive arguments: an op's schema cannot carry a dataclass)."""

    lang_len: int
    vis_len: int
    num_heads: int
    head_dim: int
    fwd: _Tiles
    bwd: _Tiles
    dot_dtype: tl.dtype
    dot_precision: str
    dropout: bool
    offset: int
    threshold: int
    drop_scale: float


def _tiles(head_dim: int, dtype: torch.dtype, backward: bool) -> _Tiles:
    """The launch tiles of one direction, from head_dim and dtype (not the lengths).

    LXMERT's 20 x 36 tokens fit one 64-block per stream, so a (batch, head) costs two forward
    programs that read qkv once; longer streams loop. fp32 takes 32-blocks: its IEEE dots run
    on FMA units, where a 64 x 64 x 64 tile took minutes to compile for sm_90 and holds large
    fp32 tiles in the backward. The rest was chosen by the sm_90 compile check (2026-12-01,
    triton 3.9, num_stages 3 unless given): at 4 warps fp32 head_dim 64 spilled 2-6 words, so it
    takes 8 warps (98 / 246 registers, no spill); head_dim 128 spreads its tiles over 8 warps (as
    flash-attention does), its forward with 2 stages (fp32 spilled 2 words with 3), its backward on
    smaller tiles (half 32 x 32: 158 registers where 64 x 64 spilled 26-48 words; fp32 16 x 32:
    108 where 32 x 32 at 16 warps still spilled 4).
    """
    if dtype == torch.float32:
        if head_dim == 128:
            return _Tiles(16, 32, 8) if backward else _Tiles(32, 32, 8, num_stages=2)
        return _Tiles(32, 32, 8 if head_dim == 64 else 4)
    if head_dim == 128:
        return _Tiles(32, 32, 8) if backward else _Tiles(64, 64, 8, num_stages=2)
    return _Tiles(64, 64, 4)


def _plan(qkv: Tensor, lang_len: int, num_heads: int, dropout_p: float, offset: int) -> _Plan:
    head_dim = qkv.shape[-1] // (3 * num_heads)
    # bf16 tl.dot is silently wrong under the interpreter: upcast its operands there.
    interpreted = qkv.device.type != "cuda"
    upcast = qkv.dtype == torch.float32 or (interpreted and qkv.dtype == torch.bfloat16)
    dropout = dropout_p > 0.0
    return _Plan(
        lang_len=lang_len,
        vis_len=qkv.shape[1] - lang_len,
        num_heads=num_heads,
        head_dim=head_dim,
        fwd=_tiles(head_dim, qkv.dtype, backward=False),
        bwd=_tiles(head_dim, qkv.dtype, backward=True),
        dot_dtype=tl.float32 if upcast else _TRITON_DTYPES[qkv.dtype],
        dot_precision="ieee" if upcast else "tf32",
        dropout=dropout,
        offset=offset if dropout else 0,
        threshold=probability_threshold(dropout_p) if dropout else 0,
        drop_scale=1.0 / (1.0 - dropout_p) if 0.0 < dropout_p < 1.0 else 0.0,
    )


def _bias_args(bias: Tensor | None, qkv: Tensor) -> tuple[Tensor, int, int, int]:
    """(pointer tensor, batch stride, token stride, length); an absent bias has length 0 and
    passes qkv as its never-read pointer."""
    if bias is None:
        return qkv, 0, 0, 0
    return bias, bias.stride(0), bias.stride(1), bias.shape[1]


def _explicit_seed(seed: int | Tensor, device: torch.device) -> Tensor:
    """A given seed as the kernels' int64 [1] tensor. The kernels key Philox with its low 32 bits
    (``_load_seed``), so an int must lie below 2**32 to key the documented stream."""
    return seed_tensor(seed, device, bits=32)


def _common_args(plan: _Plan, seed: Tensor | None, qkv: Tensor) -> tuple:
    """The scalars of every launch; without dropout qkv is the never-read seed pointer."""
    if plan.dropout and seed is None:
        raise ValueError("seed: dropout_p > 0 needs the int64 [1] seed tensor")
    return (
        plan.lang_len,
        plan.vis_len,
        plan.num_heads,
        plan.head_dim**-0.5,
        seed if plan.dropout else qkv,
        plan.offset,
        plan.threshold,
        plan.drop_scale,
    )


def _constexprs(plan: _Plan, tiles: _Tiles) -> dict:
    return {
        "HEAD_DIM": plan.head_dim,
        "BLOCK_M": tiles.block_m,
        "BLOCK_N": tiles.block_n,
        "DROPOUT": plan.dropout,
        "DOT_DTYPE": plan.dot_dtype,
        "DOT_PRECISION": plan.dot_precision,
        **tiles.launch_options(),
    }


@torch.library.custom_op("lxmert_fast::cross_attention_fwd", mutates_args=())
def cross_attention_fwd(
    qkv: Tensor,
    lang_bias: Tensor | None,
    visual_bias: Tensor | None,
    seed: Tensor | None,
    lang_len: int,
    num_heads: int,
    dropout_p: float,
    offset: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(context [B, L+V, hidden], row_max, row_inv_sum [B, heads, L+V] fp32) of the fused kernel.

    Biases in the qkv dtype (``cross_attention`` casts them); ``seed`` the int64 [1] tensor the
    kernels load, required when ``dropout_p > 0`` and unused otherwise.
    """
    plan = _plan(qkv, lang_len, num_heads, dropout_p, offset)
    batch, total, _ = qkv.shape
    hidden = plan.num_heads * plan.head_dim
    out = torch.empty((batch, total, hidden), dtype=qkv.dtype, device=qkv.device)
    # Two allocations, not views of one: a custom op's outputs must not alias each other.
    row_max = torch.empty((batch, plan.num_heads, total), dtype=torch.float32, device=qkv.device)
    row_inv_sum = torch.empty_like(row_max)
    grid = (
        batch * plan.num_heads,
        triton.cdiv(plan.lang_len, plan.fwd.block_m) + triton.cdiv(plan.vis_len, plan.fwd.block_m),
    )
    _cross_attention_fwd_kernel[grid](
        qkv,
        qkv.stride(0),
        qkv.stride(1),
        *_bias_args(lang_bias, qkv),
        *_bias_args(visual_bias, qkv),
        out,
        out.stride(0),
        out.stride(1),
        row_max,
        row_inv_sum,
        *_common_args(plan, seed, qkv),
        **_constexprs(plan, plan.fwd),
    )
    return out, row_max, row_inv_sum


@cross_attention_fwd.register_fake
def _cross_attention_fwd_fake(qkv, lang_bias, visual_bias, seed, lang_len, num_heads, dropout_p, offset):
    batch, total, width = qkv.shape
    row_max = qkv.new_empty((batch, num_heads, total), dtype=torch.float32)
    return qkv.new_empty((batch, total, width // 3)), row_max, torch.empty_like(row_max)


@torch.library.custom_op("lxmert_fast::cross_attention_bwd", mutates_args=())
def cross_attention_bwd(
    qkv: Tensor,
    lang_bias: Tensor | None,
    visual_bias: Tensor | None,
    seed: Tensor | None,
    out: Tensor,
    dout: Tensor,
    row_max: Tensor,
    row_inv_sum: Tensor,
    lang_len: int,
    num_heads: int,
    dropout_p: float,
    offset: int,
) -> Tensor:
    """d(qkv) [B, L+V, 3*hidden] (contiguous) from the forward's inputs, outputs and dO; the
    dropout masks are regenerated from (seed, offset)."""
    plan = _plan(qkv, lang_len, num_heads, dropout_p, offset)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    batch = qkv.shape[0]
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    grid = (
        batch * plan.num_heads,
        triton.cdiv(plan.vis_len, plan.bwd.block_n)
        + triton.cdiv(plan.lang_len, plan.bwd.block_n)
        + triton.cdiv(plan.lang_len, plan.bwd.block_m)
        + triton.cdiv(plan.vis_len, plan.bwd.block_m),
    )
    _cross_attention_bwd_kernel[grid](
        qkv,
        qkv.stride(0),
        qkv.stride(1),
        *_bias_args(lang_bias, qkv),
        *_bias_args(visual_bias, qkv),
        out,
        out.stride(0),
        out.stride(1),
        dout,
        dout.stride(0),
        dout.stride(1),
        dqkv,
        dqkv.stride(0),
        dqkv.stride(1),
        row_max,
        row_inv_sum,
        *_common_args(plan, seed, qkv),
        **_constexprs(plan, plan.bwd),
    )
    return dqkv


@cross_attention_bwd.register_fake
def _cross_attention_bwd_fake(
    qkv, lang_bias, visual_bias, seed, out, dout, row_max, row_inv_sum, lang_len, num_heads, dropout_p, offset
):
    return qkv.new_empty(qkv.shape)


def _setup_context(ctx, inputs, output) -> None:
    qkv, lang_bias, visual_bias, seed, lang_len, num_heads, dropout_p, offset = inputs
    out, row_max, row_inv_sum = output
    ctx.mark_non_differentiable(row_max, row_inv_sum)
    ctx.set_materialize_grads(False)  # no zero-filled grads for the statistics
    ctx.save_for_backward(qkv, lang_bias, visual_bias, seed, out, row_max, row_inv_sum)
    ctx.launch = (lang_len, num_heads, dropout_p, offset)


def _backward_of_fwd(ctx, dout: Tensor, _drow_max: Tensor, _drow_inv_sum: Tensor) -> tuple:
    """Gradients flow to qkv only: biases get None (``supports`` rejects biases that require
    grad), and the softmax statistics are non-differentiable (their incoming grads are ignored)."""
    qkv, lang_bias, visual_bias, seed, out, row_max, row_inv_sum = ctx.saved_tensors
    dqkv = cross_attention_bwd(
        qkv, lang_bias, visual_bias, seed, out, dout, row_max, row_inv_sum, *ctx.launch
    )
    return dqkv, None, None, None, None, None, None, None


cross_attention_fwd.register_autograd(_backward_of_fwd, setup_context=_setup_context)


def cross_attention(
    qkv: Tensor,
    lang_len: int,
    num_heads: int,
    lang_bias: Tensor | None,
    visual_bias: Tensor | None,
    dropout_p: float = 0.0,
    *,
    seed: int | Tensor | None = None,
    offset: int = 0,
) -> Tensor:
    """Context [B, L+V, hidden] of both directions (the fast path of ``ops.CROSS_ATTENTION``).

    ``dropout_p > 0`` means training: probabilities are dropped with a Philox stream keyed by
    ``seed`` from counter ``offset``. Without a ``seed`` a fresh one is drawn on qkv's device
    (:func:`lxmert_fast.philox.draw_seed`: no host sync, fresh in every CUDA-graph replay,
    reproduced by ``torch.manual_seed``); an int (below 2**32) or tensor seed is used as given.
    """
    dropout_p = float(dropout_p)
    if dropout_p > 0.0:
        seed = draw_seed(qkv.device) if seed is None else _explicit_seed(seed, qkv.device)
    else:
        seed, offset = None, 0
    # Cast as the reference casts (an fp32 finfo.min becomes -inf in half precision).
    lang_bias = None if lang_bias is None else lang_bias.to(qkv.dtype)
    visual_bias = None if visual_bias is None else visual_bias.to(qkv.dtype)
    out, _, _ = cross_attention_fwd(qkv, lang_bias, visual_bias, seed, lang_len, num_heads, dropout_p, offset)
    return out


def supports(
    qkv: Tensor,
    lang_len: int,
    num_heads: int,
    lang_bias: Tensor | None,
    visual_bias: Tensor | None,
    dropout_p: float = 0.0,
) -> str | None:
    """None when the kernel can serve the call, else why not (shapes are checked by ops)."""
    if qkv.device.type != "cuda" and not _INTERPRETED:
        return f"{qkv.device.type} tensors need TRITON_INTERPRET=1 set before the kernel import"
    if qkv.dtype not in KERNEL_DTYPES:
        return f"qkv dtype {qkv.dtype} is not supported (float32, float16, bfloat16)"
    head_dim = qkv.shape[-1] // (3 * num_heads)
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} is not supported (one of {', '.join(map(str, HEAD_DIMS))})"
    if qkv.stride(-1) != 1:
        return f"qkv last-dimension stride {qkv.stride(-1)} != 1"
    for name, bias in (("lang_bias", lang_bias), ("visual_bias", visual_bias)):
        if bias is not None and bias.requires_grad:
            return f"{name} requires grad; the kernel computes no bias gradient"
    return None


def dropout_keep_masks(
    seed: int | Tensor,
    offset: int,
    batch: int,
    num_heads: int,
    lang_len: int,
    vis_len: int,
    dropout_p: float,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """For tests: the keep masks the kernels draw, (lang→vision [B,h,L,V], vision→lang [B,h,V,L]) bool.

    Runs the same ``_direction``/``_dropout_keep`` helpers as the attention kernels, so
    ``reference.bidirectional_cross_attention(..., keep_masks=...)`` reproduces a fused call.
    ``seed``: an int below 2**32, or the seed tensor a fused call used.
    """
    lang_keep = torch.empty((batch, num_heads, lang_len, vis_len), dtype=torch.uint8, device=device)
    vis_keep = torch.empty((batch, num_heads, vis_len, lang_len), dtype=torch.uint8, device=device)
    block = 64
    grid = (batch * num_heads, triton.cdiv(lang_len, block) + triton.cdiv(vis_len, block))
    _dropout_keep_masks_kernel[grid](
        lang_keep,
        vis_keep,
        lang_len,
        vis_len,
        _explicit_seed(seed, lang_keep.device),
        offset,
        probability_threshold(dropout_p),
        BLOCK_M=block,
        BLOCK_N=block,
        num_warps=_MASK_WARPS,
    )
    return lang_keep.bool(), vis_keep.bool()


def sm90_variants() -> list[KernelVariant]:
    """Every specialisation the launchers can pick: dtype x head_dim x dropout, fwd and bwd, plus
    the test-only mask export, each with the arguments of LXMERT pre-training: qkv
    [BATCH, WORDS + BOXES, 3 * HIDDEN] from one projection, a language bias [BATCH, WORDS], no
    visual bias (other head_dims keep HIDDEN and change the head count)."""
    from lxmert_fast.kernels.sm90 import DROPOUT_P

    variants = []
    for dtype in KERNEL_DTYPES:
        io = _SIGNATURE_DTYPES[dtype]
        for head_dim in HEAD_DIMS:
            for dropout in (False, True):
                constexprs = {
                    "HEAD_DIM": head_dim,
                    "DROPOUT": dropout,
                    "DOT_DTYPE": tl.float32 if dtype == torch.float32 else _TRITON_DTYPES[dtype],
                    "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
                }
                scalars = _scalar_args(head_dim, DROPOUT_P if dropout else 0.0)
                # The drawn int64 seed tensor, or without dropout qkv as the never-read pointer.
                seed_ptr = {"seed_ptr": torch.int64 if dropout else dtype}
                for name, fn, args in (
                    ("fwd", _cross_attention_fwd_kernel, _fwd_args(dtype)),
                    ("bwd", _cross_attention_bwd_kernel, _bwd_args(dtype)),
                ):
                    tiles = _tiles(head_dim, dtype, backward=name == "bwd")
                    blocks = {"BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n}
                    variants.append(
                        KernelVariant(
                            name=f"cross_attention_{name}_{io}_d{head_dim}_drop{int(dropout)}",
                            fn=fn,
                            args={**args, **scalars, **seed_ptr, **constexprs, **blocks},
                            options=tiles.launch_options(),
                        )
                    )
    mask_scalars = _scalar_args(64, DROPOUT_P)
    variants.append(
        KernelVariant(
            name="cross_attention_dropout_keep_masks",
            fn=_dropout_keep_masks_kernel,
            args={
                "lang_keep_ptr": torch.uint8,
                "vis_keep_ptr": torch.uint8,
                **{k: mask_scalars[k] for k in ("lang_len", "vis_len", "drop_offset", "drop_threshold")},
                "seed_ptr": torch.int64,
                "BLOCK_M": 64,
                "BLOCK_N": 64,
            },
            options={"num_warps": _MASK_WARPS},
        )
    )
    return variants


def _scalar_args(head_dim: int, dropout_p: float) -> dict:
    """The launchers' scalar arguments (``_common_args``, but the seed pointer) at LXMERT's lengths."""
    from lxmert_fast.kernels.sm90 import BOXES, HIDDEN, WORDS

    dropout = dropout_p > 0.0
    return {
        "lang_len": WORDS,
        "vis_len": BOXES,
        "num_heads": HIDDEN // head_dim,
        "sm_scale": head_dim**-0.5,
        "drop_offset": 0,
        "drop_threshold": probability_threshold(dropout_p) if dropout else 0,
        "drop_scale": 1.0 / (1.0 - dropout_p) if dropout else 0.0,
    }


def _fwd_args(dtype: torch.dtype) -> dict:
    """Forward tensors and strides: contiguous qkv and context, a contiguous [B, L] language bias
    (token stride 1, which the launch turns into a constexpr), the absent visual bias as
    ``_bias_args`` passes it (qkv's pointer, zero strides and length)."""
    from lxmert_fast.kernels.sm90 import BOXES, HIDDEN, WORDS

    total = WORDS + BOXES
    return {
        "qkv_ptr": dtype,
        "stride_qkv_b": total * 3 * HIDDEN,
        "stride_qkv_t": 3 * HIDDEN,
        "lang_bias_ptr": dtype,
        "stride_lb_b": WORDS,
        "stride_lb_t": 1,
        "lang_bias_len": WORDS,
        "vis_bias_ptr": dtype,
        "stride_vb_b": 0,
        "stride_vb_t": 0,
        "vis_bias_len": 0,
        "out_ptr": dtype,
        "stride_out_b": total * HIDDEN,
        "stride_out_t": HIDDEN,
        "row_max_ptr": torch.float32,
        "row_inv_sum_ptr": torch.float32,
    }


def _bwd_args(dtype: torch.dtype) -> dict:
    """Backward tensors and strides: the forward's, plus contiguous dO and d(qkv)."""
    from lxmert_fast.kernels.sm90 import BOXES, HIDDEN, WORDS

    total = WORDS + BOXES
    return {
        **_fwd_args(dtype),
        "dout_ptr": dtype,
        "stride_dout_b": total * HIDDEN,
        "stride_dout_t": HIDDEN,
        "dqkv_ptr": dtype,
        "stride_dqkv_b": total * 3 * HIDDEN,
        "stride_dqkv_t": 3 * HIDDEN,
    }


register_fast_path(ops.CROSS_ATTENTION, cross_attention, supports)
