"""LXMERT's building blocks with transformers' module and parameter names.

Every block keeps the names checkpoints carry (``visual_attention.att.query``,
``lang_self_att.output.LayerNorm``, ``visn_fc.box_fc`` …) and computes through
:mod:`lxmert_fast.ops`, which picks the reference or a fused kernel. Two structural
changes from transformers, neither visible in the state dict:

* Q, K and V are one parameter ``[3*hidden, hidden]`` (and one bias ``[3*hidden]``) per
  attention module, projected in one GEMM; state-dict hooks save and load it as
  transformers' ``query``/``key``/``value`` weights and biases (:data:`FUSED_QKV`). The
  cross-attention projects the concatenated [language; vision] tokens once, since both
  directions share one attention module: one GEMM, one attention launch, one output GEMM
  and one residual+LayerNorm for both streams.
* Attention masks travel as additive key biases ``[B, T]`` (see :func:`mask_to_bias`)
  instead of ``[B, 1, 1, T]``.

Under DeepSpeed ZeRO-3 some modules read their children's weights directly, so they
must be declared ZeRO-3 leaf modules (``ZERO3_LEAF_MODULES``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lxmert_fast import ops
from lxmert_fast.checks import check_tensor, describe
from lxmert_fast.config import LAYER_NORM_EPS

Tensor = torch.Tensor


def mask_to_bias(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """1/0 key mask [B, T] -> additive bias [B, T]: 0 where 1, ``finfo(dtype).min`` where 0.

    The same values transformers adds to the scores, so outputs match it exactly.
    """
    if mask is None:
        return None
    return (1.0 - mask.to(dtype)) * torch.finfo(dtype).min


def extended_mask_to_bias(name: str, mask: Tensor | None, batch: int, length: int) -> Tensor | None:
    """transformers' extended additive mask [B, 1, 1, T] (or [B, T]) -> bias [B, T]."""
    if mask is None:
        return None
    check_tensor(name, mask, floating=True)
    if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
        mask = mask[:, 0, 0, :]
    if tuple(mask.shape) not in ((batch, length), (1, length)):
        raise ValueError(
            f"{name}: expected an additive mask of shape [{batch}, 1, 1, {length}] or [{batch}, {length}], got {describe(mask)}"
        )
    return mask.expand(batch, length)


# Each fused Q/K/V parameter of :class:`Attention` -> transformers' names of its three
# slices of rows, in the [q | k | v] order of the fused projection's output.
FUSED_QKV = {
    "qkv_weight": ("query.weight", "key.weight", "value.weight"),
    "qkv_bias": ("query.bias", "key.bias", "value.bias"),
}


def _thirds(tensor: Tensor) -> list[Tensor]:
    # Row slices (views), not chunk(): a ZeRO-3 partitioned parameter is an empty [0] tensor
    # and must still give three (empty) parts.
    rows = tensor.shape[0] // 3
    return [tensor[i * rows : (i + 1) * rows] for i in range(3)]


def unfuse_names(named: Iterable[tuple[str, Tensor]]) -> dict[str, Tensor]:
    """``(name, tensor)`` pairs of a model's parameters (or their gradients) under transformers'
    names: each fused Q/K/V tensor becomes its three ``query``/``key``/``value`` slices (views)."""
    out: dict[str, Tensor] = {}
    for name, tensor in named:
        head, _, leaf = name.rpartition(".")
        parts = FUSED_QKV.get(leaf)
        if parts is None:
            out[name] = tensor
            continue
        for part, piece in zip(parts, _thirds(tensor), strict=True):
            out[f"{head}.{part}" if head else part] = piece
    return out


class Attention(nn.Module):
    """Q/K/V projections (transformers' ``LxmertAttention``) as one ``[3*hidden, hidden]`` weight.

    ``qkv_weight`` and ``qkv_bias`` hold the query, key and value rows in that order, so
    ``qkv`` is one GEMM with no per-forward concatenation. ``state_dict()`` shows them as
    ``query.weight``, ``query.bias``, ``key.weight`` … (views of the fused tensors) and
    ``load_state_dict`` takes those names, reporting missing, unexpected and mis-shaped
    keys under them; the fused names appear only in ``named_parameters()``.
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = hidden // config.num_attention_heads
        self.qkv_weight = nn.Parameter(torch.empty(3 * hidden, hidden))
        self.qkv_bias = nn.Parameter(torch.empty(3 * hidden))
        self.dropout_prob = config.attention_probs_dropout_prob
        self.reset_parameters()
        self.register_state_dict_post_hook(_save_unfused)
        self.register_load_state_dict_pre_hook(_load_unfused)

    def reset_parameters(self) -> None:
        """Three ``nn.Linear`` initialisations in turn (query, key, value): the same values and
        random-number consumption as transformers' three separate layers."""
        with torch.no_grad():
            for weight, bias in zip(_thirds(self.qkv_weight), _thirds(self.qkv_bias), strict=True):
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
                bound = 1.0 / math.sqrt(weight.shape[1]) if weight.shape[1] > 0 else 0.0
                nn.init.uniform_(bias, -bound, bound)

    def qkv(self, x: Tensor) -> Tensor:
        """[B, T, hidden] -> [B, T, 3*hidden] laid out as [q | k | v]."""
        return F.linear(x, self.qkv_weight, self.qkv_bias)

    def attention_dropout(self) -> float:
        return self.dropout_prob if self.training else 0.0


def _save_unfused(module: Attention, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    # Replaces the fused entries by transformers' six, in transformers' order
    # (query.weight, query.bias, key.weight, …).
    parts = unfuse_names((leaf, state_dict.pop(prefix + leaf)) for leaf in FUSED_QKV)
    for proj in ("query", "key", "value"):
        for kind in ("weight", "bias"):
            state_dict[f"{prefix}{proj}.{kind}"] = parts[f"{proj}.{kind}"]


def _load_unfused(
    module: Attention,
    state_dict: dict,
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    # Concatenates transformers' three entries into the fused one before torch's own loading
    # (which then sees only the fused name). A missing or mis-shaped part is reported under
    # its transformers name and leaves that slice as it is; the parts present still load.
    for leaf, names in FUSED_QKV.items():
        param = getattr(module, leaf)
        current = _thirds(param.detach())
        pieces = []
        for name, own in zip(names, current, strict=True):
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                pieces.append(None)
                continue
            piece = state_dict.pop(key)
            if piece.shape != own.shape:
                error_msgs.append(
                    f"size mismatch for {key}: copying a param with shape {piece.shape} from checkpoint, "
                    f"the shape in current model is {own.shape}."
                )
                piece = None
            pieces.append(piece)
        if all(piece is None for piece in pieces):
            # Nothing to load: the fused name must not be reported missing besides the parts.
            state_dict[prefix + leaf] = param.detach()
        elif any(piece is None for piece in pieces):
            state_dict[prefix + leaf] = torch.cat(
                [own if piece is None else piece.to(own) for own, piece in zip(current, pieces, strict=True)]
            )
        else:
            state_dict[prefix + leaf] = torch.cat(pieces)


class AttentionOutput(nn.Module):
    """dense -> dropout -> LayerNorm(+ residual) (transformers' ``LxmertAttentionOutput``/``LxmertOutput``)."""

    def __init__(self, config: Any, in_features: int | None = None) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features or config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.dropout_prob = config.hidden_dropout_prob

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        return ops.residual_dropout_layer_norm(
            self.dense(hidden_states),
            input_tensor,
            self.LayerNorm.weight,
            self.LayerNorm.bias,
            self.LayerNorm.eps,
            self.dropout_prob if self.training else 0.0,
        )


class Output(AttentionOutput):
    """FFN output block: dense(intermediate -> hidden), dropout, LayerNorm(+ residual)."""

    def __init__(self, config: Any) -> None:
        super().__init__(config, in_features=config.intermediate_size)


class Intermediate(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return F.gelu(self.dense(hidden_states))


class SelfAttentionLayer(nn.Module):
    """transformers' ``LxmertSelfAttentionLayer``: ``self`` (Q/K/V) and ``output``."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.self = Attention(config)
        self.output = AttentionOutput(config)

    def forward(
        self, x: Tensor, bias: Tensor | None, need_probs: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        context, probs = ops.self_attention(
            self.self.qkv(x), self.self.num_attention_heads, bias, self.self.attention_dropout(), need_probs
        )
        return self.output(context, x), probs


class CrossAttentionLayer(nn.Module):
    """transformers' ``LxmertCrossAttentionLayer``: one attention module shared by both directions."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.att = Attention(config)
        self.output = AttentionOutput(config)

    def forward(
        self,
        lang: Tensor,
        lang_bias: Tensor | None,
        visual: Tensor,
        visual_bias: Tensor | None,
        need_probs: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        both = torch.cat((lang, visual), dim=1)
        lang_len = lang.shape[1]
        context, probs = ops.bidirectional_cross_attention(
            self.att.qkv(both),
            lang_len,
            self.att.num_attention_heads,
            lang_bias,
            visual_bias,
            self.att.attention_dropout(),
            need_probs,
        )
        out = self.output(context, both)
        return out[:, :lang_len], out[:, lang_len:], probs


class Layer(nn.Module):
    """A BERT block (transformers' ``LxmertLayer``): language and object (relational) encoders."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.attention = SelfAttentionLayer(config)
        self.intermediate = Intermediate(config)
        self.output = Output(config)

    def forward(
        self, x: Tensor, bias: Tensor | None, need_probs: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        attention_output, probs = self.attention(x, bias, need_probs)
        return self.output(self.intermediate(attention_output), attention_output), probs


class CrossLayer(nn.Module):
    """Drop-in for transformers' ``LxmertXLayer``: same constructor, forward, outputs and names.

    ``forward(lang_feats, lang_attention_mask, visual_feats, visual_attention_mask,
    output_attentions=False)`` takes the masks in transformers' extended additive form
    ``[B, 1, 1, T]`` (or ``None``) and returns ``(lang_out, visual_out)``, plus the
    language→vision attention probabilities when ``output_attentions`` is set (always
    computed by the reference: the fused kernel does not materialise them).
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.visual_attention = CrossAttentionLayer(config)
        self.lang_self_att = SelfAttentionLayer(config)
        self.visn_self_att = SelfAttentionLayer(config)
        self.lang_inter = Intermediate(config)
        self.lang_output = Output(config)
        self.visn_inter = Intermediate(config)
        self.visn_output = Output(config)

    def forward(
        self,
        lang_feats: Tensor,
        lang_attention_mask: Tensor | None,
        visual_feats: Tensor,
        visual_attention_mask: Tensor | None,
        output_attentions: bool = False,
    ) -> tuple[Tensor, ...]:
        check_tensor("lang_feats", lang_feats, ndim=3, floating=True)
        check_tensor("visual_feats", visual_feats, ndim=3, last_dim=lang_feats.shape[-1], floating=True)
        if visual_feats.shape[0] != lang_feats.shape[0]:
            raise ValueError(
                f"visual_feats: expected batch size {lang_feats.shape[0]} (as lang_feats), got {describe(visual_feats)}"
            )
        batch = lang_feats.shape[0]
        lang_bias = extended_mask_to_bias(
            "lang_attention_mask", lang_attention_mask, batch, lang_feats.shape[1]
        )
        visual_bias = extended_mask_to_bias(
            "visual_attention_mask", visual_attention_mask, batch, visual_feats.shape[1]
        )
        lang, visual, probs = self.forward_biases(
            lang_feats, lang_bias, visual_feats, visual_bias, output_attentions
        )
        return (lang, visual, probs) if output_attentions else (lang, visual)

    def forward_biases(
        self,
        lang: Tensor,
        lang_bias: Tensor | None,
        visual: Tensor,
        visual_bias: Tensor | None,
        need_probs: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The layer on additive key biases [B, T]; returns (lang, visual, lang→vision probs or None)."""
        lang, visual, probs = self.visual_attention(lang, lang_bias, visual, visual_bias, need_probs)
        lang, _ = self.lang_self_att(lang, lang_bias)
        visual, _ = self.visn_self_att(visual, visual_bias)
        lang = self.lang_output(self.lang_inter(lang), lang)
        visual = self.visn_output(self.visn_inter(visual), visual)
        return lang, visual, probs


class VisualFeatureEncoder(nn.Module):
    """transformers' ``LxmertVisualFeatureEncoder``: RoI features and boxes -> hidden."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.visn_fc = nn.Linear(config.visual_feat_dim, config.hidden_size)
        self.visn_layer_norm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.box_fc = nn.Linear(config.visual_pos_dim, config.hidden_size)
        self.box_layer_norm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.dropout_prob = config.hidden_dropout_prob

    def forward(self, visual_feats: Tensor, visual_pos: Tensor) -> Tensor:
        return ops.visual_embedding(
            visual_feats,
            visual_pos,
            self.visn_fc.weight,
            self.visn_fc.bias,
            self.visn_layer_norm.weight,
            self.visn_layer_norm.bias,
            self.box_fc.weight,
            self.box_fc.bias,
            self.box_layer_norm.weight,
            self.box_layer_norm.bias,
            self.visn_layer_norm.eps,
            self.dropout_prob if self.training else 0.0,
        )


# Modules that read child parameters outside the child's forward (ZeRO-3 must gather them
# whole): the attention layers (their Attention child's fused Q/K/V parameters, read by
# ``qkv``), the residual+LayerNorm blocks (attention and FFN outputs) and the visual embedding.
ZERO3_LEAF_MODULES = (SelfAttentionLayer, CrossAttentionLayer, AttentionOutput, VisualFeatureEncoder)
