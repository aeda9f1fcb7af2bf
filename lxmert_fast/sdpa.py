"""Self-attention's fast path: ``torch.nn.functional.scaled_dot_product_attention``.

Computes what :func:`lxmert_fast.reference.self_attention` computes — ``softmax(q kᵀ / sqrt(d) +
bias) v`` per head over ``qkv`` [B, T, 3*hidden] with the additive key bias [B, T] — without
materialising the [B, h, T, T] scores or probabilities: on CUDA SDPA runs its memory-efficient
kernel (flash takes no additive mask; cuDNN where PyTorch prefers it), on the CPU its fused CPU
kernel or the math path. Q, K and V are strided views of ``qkv``, never copied here.

Fully masked rows, as the reference handles them, with no score-sized guard here:

* every key bias ``-inf`` (also what an fp32 ``finfo.min`` becomes in bf16/fp16, since the bias is
  cast to the query dtype exactly as the reference casts it): the context row is zero. SDPA
  returns zero itself for such rows (the math path's ``_safe_softmax``, the CPU flash kernel, and
  the CUDA memory-efficient kernel since PyTorch 2.5), so the reference's ``amax``/``eq``/
  ``masked_fill`` trio over the scores is not repeated; its gradients are zero as well.
* every key bias finite (``torch.finfo(dtype).min``, transformers' convention, what
  ``layers.mask_to_bias`` gives an fp32 model): the scores are absorbed into the bias, all equal,
  and the row attends uniformly, as in the reference and in transformers — in the forward. The
  gradient is NOT the reference's: a fused kernel's backward recomputes the probabilities as
  ``exp(s - logsumexp)``, and ``logsumexp = finfo.min + log(T)`` rounds to ``finfo.min``, so it
  sees probabilities of 1 instead of 1/T and returns T times the reference's d(q, k, v) for that
  batch element (measured on the CPU fused kernel; the math backend is exact). Only an all-zero
  attention mask row produces this (no [CLS], no box); matching it would take the score-sized
  guard this path exists to avoid, or a backward of our own.

Hazard: neither case can be measured on a CPU; ``tests/test_sdpa_self_attention.py`` runs them on
``kernel_device``, so ``benchmarks/gpu_check.sh`` (``pytest -m cuda``) checks the CUDA kernels.

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

from lxmert_fast import ops
from lxmert_fast.backend import register_fast_path
from lxmert_fast.reference import merge_heads, split_heads

Tensor = torch.Tensor


def self_attention(qkv: Tensor, num_heads: int, bias: Tensor | None, dropout_p: float = 0.0) -> Tensor:
    """Context [B, T, hidden] of self-attention over ``qkv`` [B, T, 3*hidden] with key bias [B, T]."""
    q, k, v = (split_heads(x, num_heads) for x in qkv.chunk(3, dim=-1))
    mask = None if bias is None else bias[:, None, None, :].to(q.dtype)
    context = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=1.0 / math.sqrt(q.shape[-1])
    )
    return merge_heads(context)


def supports(qkv: Tensor, num_heads: int, bias: Tensor | None, dropout_p: float) -> str | None:
    """None: SDPA serves every call the dispatcher accepts (it picks a kernel per call itself)."""
    return None


register_fast_path(ops.SELF_ATTENTION, self_attention, supports, on_cpu=False)
