"""The dispatcher: the only place that decides between the reference and a fast path.

Modules call these functions and never branch on device or backend themselves. Each
function checks its arguments (so both paths see the same errors), asks
:func:`lxmert_fast.backend.choose` for a registered fast path, and otherwise runs
:mod:`lxmert_fast.reference`. Fast paths register themselves with
:func:`lxmert_fast.backend.register_fast_path` under the op names below.
"""

from __future__ import annotations

import torch

from lxmert_fast import reference
from lxmert_fast.backend import choose
from lxmert_fast.checks import (
    FLOAT_DTYPES,
    check_probability,
    check_same_device,
    check_shape,
    check_tensor,
)
from lxmert_fast.philox import philox_bits

Tensor = torch.Tensor

CROSS_ATTENTION = "bidirectional_cross_attention"
SELF_ATTENTION = "self_attention"
RESIDUAL_LAYER_NORM = "residual_dropout_layer_norm"
VISUAL_EMBEDDING = "visual_embedding"
ROI_FEATURE_MASK = "roi_feature_mask"


def _check_qkv(qkv: Tensor, num_heads: int) -> int:
    check_tensor("qkv", qkv, ndim=3, floating=True)
    if qkv.shape[-1] % (3 * num_heads) != 0:
        raise ValueError(
            f"qkv: expected last dimension 3 * hidden with hidden divisible by num_heads={num_heads}, "
            f"got shape {tuple(qkv.shape)}"
        )
    return qkv.shape[-1] // 3


def _check_bias(name: str, bias: Tensor | None, batch: int, length: int) -> None:
    if bias is not None:
        check_tensor(name, bias, floating=True)
        check_shape(name, bias, (batch, length))


def bidirectional_cross_attention(
    qkv: Tensor,
    lang_len: int,
    num_heads: int,
    lang_bias: Tensor | None,
    visual_bias: Tensor | None,
    dropout_p: float = 0.0,
    need_probs: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Both directions of the cross-modality attention (see the reference for layouts).

    Returns (context [B, L+V, hidden], lang→vision probabilities [B,h,L,V] or None).
    ``need_probs=True`` always runs the reference: the fused kernel never materialises them.
    """
    _check_qkv(qkv, num_heads)
    batch, total = qkv.shape[:2]
    if not 0 < lang_len < total:
        raise ValueError(f"lang_len: expected 0 < lang_len < {total} (rows of qkv), got {lang_len}")
    _check_bias("lang_bias", lang_bias, batch, lang_len)
    _check_bias("visual_bias", visual_bias, batch, total - lang_len)
    check_same_device([("qkv", qkv), ("lang_bias", lang_bias), ("visual_bias", visual_bias)])
    check_probability("dropout_p", dropout_p)
    if not need_probs:
        fast = choose(
            CROSS_ATTENTION, qkv.device, qkv, lang_len, num_heads, lang_bias, visual_bias, dropout_p
        )
        if fast is not None:
            return fast(qkv, lang_len, num_heads, lang_bias, visual_bias, dropout_p), None
    context, lang_probs, _ = reference.bidirectional_cross_attention(
        qkv, lang_len, num_heads, lang_bias, visual_bias, dropout_p
    )
    return context, lang_probs if need_probs else None


def self_attention(
    qkv: Tensor,
    num_heads: int,
    bias: Tensor | None,
    dropout_p: float = 0.0,
    need_probs: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Self-attention over ``qkv`` [B, T, 3*hidden] with key bias [B, T]; (context, probs or None)."""
    _check_qkv(qkv, num_heads)
    _check_bias("bias", bias, qkv.shape[0], qkv.shape[1])
    check_same_device([("qkv", qkv), ("bias", bias)])
    check_probability("dropout_p", dropout_p)
    if not need_probs:
        fast = choose(SELF_ATTENTION, qkv.device, qkv, num_heads, bias, dropout_p, optional=True)
        if fast is not None:
            return fast(qkv, num_heads, bias, dropout_p), None
    context, probs = reference.self_attention(qkv, num_heads, bias, dropout_p)
    return context, probs if need_probs else None


def residual_dropout_layer_norm(
    hidden: Tensor,
    residual: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    dropout_p: float = 0.0,
) -> Tensor:
    """LayerNorm(dropout(hidden) + residual) over the last dimension."""
    check_tensor("hidden", hidden, floating=True)
    if residual.shape != hidden.shape:
        raise ValueError(
            f"residual: expected the shape of hidden {tuple(hidden.shape)}, got shape {tuple(residual.shape)}"
        )
    check_shape("weight", weight, (hidden.shape[-1],))
    check_shape("bias", bias, (hidden.shape[-1],))
    check_same_device([("hidden", hidden), ("residual", residual), ("weight", weight), ("bias", bias)])
    check_probability("dropout_p", dropout_p)
    fast = choose(RESIDUAL_LAYER_NORM, hidden.device, hidden, residual, weight, bias, eps, dropout_p)
    if fast is not None:
        return fast(hidden, residual, weight, bias, eps, dropout_p)
    return reference.residual_dropout_layer_norm(hidden, residual, weight, bias, eps, dropout_p)


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
) -> Tensor:
    """(LN_v(Linear_v(features)) + LN_b(Linear_b(boxes))) / 2, then dropout; [B, N, hidden]."""
    check_tensor("features", features, ndim=3, last_dim=feat_weight.shape[1], floating=True)
    check_tensor("boxes", boxes, ndim=3, last_dim=box_weight.shape[1], floating=True)
    if boxes.shape[:2] != features.shape[:2]:
        raise ValueError(
            f"boxes: expected the batch and object dimensions of features {tuple(features.shape[:2])}, "
            f"got shape {tuple(boxes.shape)}"
        )
    check_same_device([("features", features), ("boxes", boxes), ("feat_weight", feat_weight)])
    check_probability("dropout_p", dropout_p)
    args = (features, boxes, feat_weight, feat_bias, feat_ln_weight, feat_ln_bias)
    args += (box_weight, box_bias, box_ln_weight, box_ln_bias, eps, dropout_p)
    fast = choose(VISUAL_EMBEDDING, features.device, *args)
    if fast is not None:
        return fast(*args)
    return reference.visual_embedding(*args)


def roi_feature_mask(
    features: Tensor,
    seed: int,
    offset: int = 0,
    p_select: float = 0.15,
    p_zero: float = 0.8,
    p_replace: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """Masked-object corruption of ``features`` [B, N, D] from Philox draws at (seed, offset).

    Element ``b * N + n`` uses Philox counter ``offset + b * N + n``; the next call should
    advance ``offset`` by ``B * N``. Returns (corrupted features, action int8 [B, N]); see
    :func:`lxmert_fast.reference.roi_feature_mask` for the exact rule.
    """
    check_tensor("features", features, ndim=3, dtypes=FLOAT_DTYPES)
    for name, p in (("p_select", p_select), ("p_zero", p_zero), ("p_replace", p_replace)):
        check_probability(name, p)
    if p_zero + p_replace > 1.0 + 1e-9:
        raise ValueError(f"p_zero + p_replace: expected at most 1, got {p_zero} + {p_replace}")
    for name, value in (("seed", seed), ("offset", offset)):
        if isinstance(value, bool) or not isinstance(value, int | torch.SymInt):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed: expected a 64-bit value in [-2**63, 2**64), got {seed}")
    if not 0 <= offset < 2**62:
        raise ValueError(f"offset: expected a non-negative 64-bit counter, got {offset}")
    args = (features, seed, offset, p_select, p_zero, p_replace)
    fast = choose(ROI_FEATURE_MASK, features.device, *args)
    if fast is not None:
        return fast(*args)
    b, n, _ = features.shape
    bits = philox_bits(seed, offset, b * n, features.device).view(b, n, 4)
    return reference.roi_feature_mask(features, bits, p_select, p_zero, p_replace)


def _register_fast_paths() -> None:
    """Import the fast-path modules; each registers itself with the backend on import.

    The C++ op is always there (built by setup.py, or JIT-built on first use), and so is
    self-attention through torch's SDPA; the Triton kernels only where triton is installed
    (the reference serves everything without them).
    """
    import importlib
    import importlib.util

    importlib.import_module("lxmert_fast.roi_mask")
    importlib.import_module("lxmert_fast.sdpa")
    if importlib.util.find_spec("triton") is None:
        return
    _map_source_tree_kernels()
    for name in TRITON_KERNEL_MODULES:
        importlib.import_module(f"lxmert_fast.kernels.{name}")


def _map_source_tree_kernels() -> None:
    """Serve the source tree's top-level ``kernels/`` as ``lxmert_fast.kernels`` when the package
    runs uninstalled (``PYTHONPATH=<repo>``): an install makes that mapping (setup.py's
    ``package_dir``), a bare source tree has no ``lxmert_fast/kernels`` folder."""
    import importlib.util
    import sys
    from pathlib import Path

    if importlib.util.find_spec("lxmert_fast.kernels") is not None:
        return
    init = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if not init.is_file():
        return
    spec = importlib.util.spec_from_file_location(
        "lxmert_fast.kernels", init, submodule_search_locations=[str(init.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    sys.modules["lxmert_fast"].kernels = module


TRITON_KERNEL_MODULES = ("cross_attention", "residual_layer_norm", "visual_embedding")
_register_fast_paths()
