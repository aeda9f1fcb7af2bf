"""Self-attention's fast path: ``torch.nn.functional.scaled_dot_product_attention``.

Computes what :func:`lxmert_fast.reference.self_attention` computes — ``softmax(q kᵀ / sqrt(d) +
bias) v`` per head over ``qkv`` [B, T, 3*hidden] with the additive key bias [B, T] — without
materialising the [B, h, T, T] scores or probabilities. Q, K and V are strided views of ``qkv``.

Kernels: on CUDA, SDPA is pinned (``torch.nn.attention.sdpa_kernel``) to its fused kernels, flash
(no mask) and memory-efficient (additive mask), so the score-sized math path never runs on the
card; :func:`supports` refuses what neither takes (dtype other than fp16/bf16/fp32, a head size
off the memory-efficient kernel's alignment), so the dispatcher falls back to the reference,
counted, instead of SDPA failing or going slow. cuDNN is left out: its handling of fully masked
rows is unverified. On the CPU SDPA chooses (its fused CPU kernel takes no dropout, so training
needs its math path there); the correction below does not depend on the kernel.

Fully masked rows, exactly as the reference, with no score-sized guard — only [B]- and [B, T]-sized
work on the bias, a multiply of Q in the forward and of dK in the backward:

* every key bias ``-inf`` (also what an fp32 ``finfo.min`` becomes in bf16/fp16, since the bias is
  cast to the query dtype exactly as the reference casts it): the context row and its gradients
  are zero. SDPA gives that itself (the math path's ``_safe_softmax``, the CPU flash kernel, the
  CUDA memory-efficient kernel since PyTorch 2.5), so the reference's ``amax``/``eq``/
  ``masked_fill`` trio over the scores is not repeated.
* a "dead" batch element: the largest key bias (after the cast to the query dtype) is finite and
  ``<= finfo(float32).min / 2`` — transformers' ``finfo.min`` convention with no key attended.
  The reference adds the bias to the scores, which absorbs them, and attends uniformly over the
  ``n`` keys holding that largest bias; its gradient is the softmax gradient at uniform
  probabilities. The fused kernels get this wrong in kernel-specific ways: the CPU flash kernel
  attends uniformly but its backward recomputes ``P = exp(s - logsumexp)`` with ``logsumexp =
  min + log n`` rounded to ``min``, so P = 1 and d(q, k, v) come out n times too large; the CUDA
  memory-efficient kernel multiplies the biased scores by log2(e) first, ``finfo.min * 1.44``
  overflows to ``-inf``, and the row comes out zero (read from its source, PyTorch 2.5 on;
  ``test_unguarded_kernels_mishandle_dead_rows`` checks both on their device). So a dead element
  is never handed to SDPA as such: its bias becomes 0 on those ``n`` keys and ``-inf`` elsewhere,
  and its queries are scaled by ``EPSILON`` = 2⁻⁴⁰, so the scores ``EPSILON * s`` vanish at fp32
  precision (|s| < 10⁴) and every kernel attends uniformly over the same keys, with the
  reference's dS = P (dP - D) — no kernel's recomputation is relied on. The query
  scaling passes dQ through unchanged (dQ = scale · dS · K does not involve Q), and dK (= scale ·
  dSᵀ · EPSILON Q) is divided by ``EPSILON`` — powers of two, exact in fp32 and bf16. fp16 never
  has a dead element: its bias is at least ``-65504`` or ``-inf``, which the kernels' fp32
  arithmetic does not absorb (they then attend by the scores, as the fp64 reference does, where
  the fp16 reference's own rounding flattens the row).

Hazard: what the correction relies on — SDPA's zero rows for all ``-inf`` keys, and ordinary
softmax numerics for a 0/``-inf`` mask and near-zero scores — cannot be measured for the CUDA
kernels on a CPU; ``tests/test_sdpa_self_attention.py`` runs every case on ``kernel_device``, so
``benchmarks/gpu_check.sh`` (``pytest -m cuda``) checks them on the card. Biases between
``finfo.min / 2`` and the absorbing range of the scores (no convention uses them) are left to
the kernels.

Dropout on the probabilities is SDPA's own, drawn from torch's generator (capture-safe: inductor
and CUDA graphs advance the Philox offset per replay), so it does not reproduce the reference's
masks — the same ``torch.manual_seed`` gives the same result on the same path.

Dispatch: ``auto`` picks it for CUDA tensors only (``on_cpu=False``: on the CPU the reference is
the oracle and the fused CPU kernel gains little at LXMERT's sizes); backend ``triton`` runs it on
the CPU too, which is how the tests reach it without a GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lxmert_fast import ops
from lxmert_fast.backend import register_fast_path
from lxmert_fast.reference import merge_heads, split_heads

Tensor = torch.Tensor

# SDPA's kernels per device type; a device not listed lets SDPA choose.
FUSED_KERNELS = {"cuda": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]}
EPSILON = 2.0**-40
DEAD_BIAS = torch.finfo(torch.float32).min / 2


class _ScaleQueries(torch.autograd.Function):
    """``q * scale`` in the forward; the gradient passes through unscaled."""

    @staticmethod
    def forward(ctx, q: Tensor, scale: Tensor) -> Tensor:
        return q * scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _ScaleKeyGrads(torch.autograd.Function):
    """The identity in the forward; the gradient times ``scale`` in the backward."""

    @staticmethod
    def forward(ctx, k: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(scale)
        return k.view_as(k)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (scale,) = ctx.saved_tensors
        return grad * scale, None


def _undead(q: Tensor, k: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(q, k, mask [B, 1, 1, T]) with every dead batch element made uniform attention over its
    largest-bias keys (module docstring); the others pass unchanged, apart from Q's copy."""
    bias = bias.to(q.dtype)
    top = bias.float().amax(dim=-1, keepdim=True)
    dead = torch.isfinite(top) & (top <= DEAD_BIAS)
    uniform = torch.where(bias.float() == top, 0.0, float("-inf")).to(q.dtype)
    bias = torch.where(dead, uniform, bias)
    dead = dead[:, :, None, None]
    q = _ScaleQueries.apply(q, torch.where(dead, EPSILON, 1.0).to(q.dtype))
    k = _ScaleKeyGrads.apply(k, torch.where(dead, 1.0 / EPSILON, 1.0).to(k.dtype))
    return q, k, bias[:, None, None, :]


def self_attention(qkv: Tensor, num_heads: int, bias: Tensor | None, dropout_p: float = 0.0) -> Tensor:
    """Context [B, T, hidden] of self-attention over ``qkv`` [B, T, 3*hidden] with key bias [B, T]."""
    q, k, v = (split_heads(x, num_heads) for x in qkv.chunk(3, dim=-1))
    mask = None
    if bias is not None:
        q, k, mask = _undead(q, k, bias)
    scale = 1.0 / math.sqrt(q.shape[-1])
    kernels = FUSED_KERNELS.get(qkv.device.type)
    if kernels is None:
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    else:
        with sdpa_kernel(kernels):
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale
            )
    return merge_heads(context)


def supports(qkv: Tensor, num_heads: int, bias: Tensor | None, dropout_p: float) -> str | None:
    """None where the kernels SDPA is pinned to on this device serve the call, else the reason."""
    if qkv.device.type not in FUSED_KERNELS:
        return None
    if qkv.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {qkv.dtype}: SDPA's fused CUDA kernels take float16, bfloat16 and float32"
    if qkv.shape[1] == 0:
        return "an empty sequence: SDPA's fused CUDA kernels need at least one token"
    # The memory-efficient kernel's GEMM alignment: 16 bytes of a head (flash's 8 features included).
    head_dim, alignment = qkv.shape[-1] // (3 * num_heads), 16 // qkv.element_size()
    if head_dim % alignment:
        return f"head size {head_dim}: the memory-efficient kernel needs a multiple of {alignment} in {qkv.dtype}"
    return None


register_fast_path(ops.SELF_ATTENTION, self_attention, supports, on_cpu=False)
