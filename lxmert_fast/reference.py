"""Pure-PyTorch reference of every lxmert_fast op: the oracle the fast paths are held to.

Written for clarity and for bit-closeness to transformers' ``modeling_lxmert`` (same
operation order: scores are divided by sqrt(head_dim) after the product, LayerNorm after
the residual add), not for speed. Every op also accepts explicit randomness (keep-masks,
random bits) so a fast path with its own generator can be compared exactly.

Layouts shared with the kernels:

* ``qkv``: ``[B, T, 3 * hidden]``, each token's row is ``[q | k | v]``, each of ``hidden =
  num_heads * head_dim`` features, head-major (head ``h`` owns features
  ``h * head_dim : (h + 1) * head_dim``), as ``nn.Linear`` outputs viewed by transformers.
* Attention biases are additive ``[B, T_keys]`` tensors (0 = attend, large negative =
  ignore), the form transformers and the authors' code add to the scores. A query row
  whose every key has bias ``-inf`` gets a zero context (never NaN); with a finite bias
  (``torch.finfo(dtype).min`` as transformers uses) such a row attends uniformly,
  exactly as transformers does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """[B, T, hidden] -> [B, heads, T, head_dim]."""
    b, t, hidden = x.shape
    return x.view(b, t, num_heads, hidden // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """[B, heads, T, head_dim] -> [B, T, hidden]."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def attention_probs(q: Tensor, k: Tensor, bias: Tensor | None) -> Tensor:
    """softmax(q kᵀ / sqrt(d) + bias) for q [B,h,Tq,d], k [B,h,Tk,d], bias [B,Tk] or None."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias[:, None, None, :].to(scores.dtype)
    # Rows whose every key is -inf get zeros instead of NaN. No `if dead.any()` shortcut:
    # that would cost a device sync per call on CUDA, where self-attention runs this code.
    dead = scores.amax(dim=-1, keepdim=True) == float("-inf")
    return torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)


def dropout(x: Tensor, p: float, keep_mask: Tensor | None = None) -> Tensor:
    """Inverted dropout; ``keep_mask`` (bool, broadcastable to x) replaces the random draw."""
    if p == 0.0:
        return x
    if keep_mask is None:
        return F.dropout(x, p, training=True)
    if p == 1.0:
        return x * 0.0
    return x * keep_mask.to(x.dtype) / (1.0 - p)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    dropout_p: float = 0.0,
    keep_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Heads-split attention: returns (context [B,h,Tq,d], probabilities before dropout)."""
    probs = attention_probs(q, k, bias)
    return torch.matmul(dropout(probs, dropout_p, keep_mask), v), probs


def self_attention(
    qkv: Tensor,
    num_heads: int,
    bias: Tensor | None,
    dropout_p: float = 0.0,
    keep_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Self-attention over ``qkv`` [B, T, 3*hidden]; returns (context [B,T,hidden], probs [B,h,T,T])."""
    q, k, v = (split_heads(x, num_heads) for x in qkv.chunk(3, dim=-1))
    context, probs = attend(q, k, v, bias, dropout_p, keep_mask)
    return merge_heads(context), probs


def bidirectional_cross_attention(
    qkv: Tensor,
    lang_len: int,
    num_heads: int,
    lang_bias: Tensor | None,
    visual_bias: Tensor | None,
    dropout_p: float = 0.0,
    keep_masks: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Both directions of LXMERT's cross-attention with one shared projection.

    ``qkv`` is [B, L+V, 3*hidden]: the shared Q/K/V projection of the concatenated
    [language; vision] tokens. Language queries (rows ``:L``) attend to vision keys/values
    under ``visual_bias`` [B, V]; vision queries (rows ``L:``) attend to language
    keys/values under ``lang_bias`` [B, L]. ``keep_masks`` = (lang→vision [B,h,L,V],
    vision→language [B,h,V,L]) bool replaces the dropout draw.

    Returns (context [B, L+V, hidden] in the same row order, lang→vision probs
    [B,h,L,V], vision→lang probs [B,h,V,L]); probabilities are before dropout.
    """
    q, k, v = (split_heads(x, num_heads) for x in qkv.chunk(3, dim=-1))
    lang, vis = slice(0, lang_len), slice(lang_len, None)
    lang_keep, vis_keep = keep_masks if keep_masks is not None else (None, None)
    lang_ctx, lang_probs = attend(
        q[:, :, lang], k[:, :, vis], v[:, :, vis], visual_bias, dropout_p, lang_keep
    )
    vis_ctx, vis_probs = attend(q[:, :, vis], k[:, :, lang], v[:, :, lang], lang_bias, dropout_p, vis_keep)
    return merge_heads(torch.cat((lang_ctx, vis_ctx), dim=2)), lang_probs, vis_probs


def residual_dropout_layer_norm(
    hidden: Tensor,
    residual: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    dropout_p: float = 0.0,
    keep_mask: Tensor | None = None,
) -> Tensor:
    """LayerNorm(dropout(hidden) + residual): the tail of every attention-output and FFN-output block."""
    return F.layer_norm(dropout(hidden, dropout_p, keep_mask) + residual, weight.shape, weight, bias, eps)


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
    dropout_p: float = 0.0,
    keep_mask: Tensor | None = None,
) -> Tensor:
    """(LN_v(features·W_vᵀ + b_v) + LN_b(boxes·W_bᵀ + b_b)) / 2, then dropout.

    features [B, N, feat_dim], boxes [B, N, pos_dim] → [B, N, hidden].
    """
    hidden = feat_ln_weight.shape
    x = F.layer_norm(F.linear(features, feat_weight, feat_bias), hidden, feat_ln_weight, feat_ln_bias, eps)
    y = F.layer_norm(F.linear(boxes, box_weight, box_bias), hidden, box_ln_weight, box_ln_bias, eps)
    return dropout((x + y) / 2, dropout_p, keep_mask)


# Codes of the per-object action returned by roi_feature_mask.
ROI_UNSELECTED, ROI_ZEROED, ROI_REPLACED, ROI_KEPT = 0, 1, 2, 3
_U24 = 1 << 24


def probability_threshold(p: float) -> int:
    """An event of probability p happens when a 24-bit uniform integer is below this."""
    return math.floor(p * _U24)


def roi_feature_actions(
    random_bits: Tensor, p_select: float = 0.15, p_zero: float = 0.8, p_replace: float = 0.1
) -> Tensor:
    """The per-object decisions of :func:`roi_feature_mask`: action int8 [B, N] from
    ``random_bits`` int64 [B, N, >=2] alone (no features), so the host can compute the
    selection of a device call (``action > 0``) from the same Philox words."""
    u0, u1 = random_bits[..., 0] >> 8, random_bits[..., 1] >> 8
    selected = u0 < probability_threshold(p_select)
    zero = selected & (u1 < probability_threshold(p_zero))
    replace = selected & ~zero & (u1 < probability_threshold(p_zero + p_replace))
    action = torch.full(u0.shape, ROI_UNSELECTED, dtype=torch.int8, device=random_bits.device)
    action[selected] = ROI_KEPT
    action[replace] = ROI_REPLACED
    action[zero] = ROI_ZEROED
    return action


def roi_feature_mask(
    features: Tensor,
    random_bits: Tensor,
    p_select: float = 0.15,
    p_zero: float = 0.8,
    p_replace: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """Masked-object corruption of RoI features (LXMERT pre-training), randomness passed in.

    ``features`` [B, N, D]; ``random_bits`` int64 [B, N, >=3], 32-bit words per object
    (e.g. :func:`lxmert_fast.philox.philox_bits`). With ``u(r) = r >> 8`` (24 bits):

    * object selected iff ``u(r0) < floor(p_select * 2**24)``;
    * a selected object is zeroed iff ``u(r1) < floor(p_zero * 2**24)``, else replaced iff
      ``u(r1) < floor((p_zero + p_replace) * 2**24)``, else kept unchanged;
    * a replaced object takes the feature of object ``k % N`` of image ``k // N`` (skipping
      its own image) with ``k = (r2 * ((B - 1) * N)) >> 32``. With a batch of one image
      there is no other image: replaced objects are left unchanged (action still REPLACED).

    Returns (corrupted features, same dtype; action int8 [B, N] with codes
    ``ROI_UNSELECTED/ROI_ZEROED/ROI_REPLACED/ROI_KEPT``). Selection mask = ``action > 0``;
    the actions alone are :func:`roi_feature_actions`.
    """
    b, n, _ = features.shape
    action = roi_feature_actions(random_bits, p_select, p_zero, p_replace)
    zero, replace = action == ROI_ZEROED, action == ROI_REPLACED

    out = features.masked_fill(zero[..., None], 0)
    if b > 1:
        r2 = random_bits[..., 2]
        k = (r2 * ((b - 1) * n)) >> 32
        src_img = k // n
        own = torch.arange(b, device=features.device)[:, None]
        src_img = src_img + (src_img >= own).to(src_img.dtype)
        src = features.reshape(b * n, -1)[src_img * n + k % n]
        out = torch.where(replace[..., None], src, out)
    return out, action
