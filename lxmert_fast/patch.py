"""Our blocks inside a transformers LXMERT model, in place (the Liger-Kernel way).

``lxmert_fast.apply_to(hf_model)`` swaps every block of a transformers ``LxmertModel``,
``LxmertForPreTraining`` or ``LxmertForQuestionAnswering`` (or any module holding them) that
goes through one of our ops for ours:

=============================== ======================== =============================================
transformers                    ours                     ops it runs through the dispatcher
=============================== ======================== =============================================
``LxmertVisualFeatureEncoder``  ``VisualFeatureEncoder`` visual embedding
``LxmertLayer`` (lang., object) ``TransformersLayer``    self-attention, residual+dropout+LayerNorm x2
``LxmertXLayer`` (cross)        ``CrossLayer``           bidirectional cross-attention, self-attention,
                                                         residual+dropout+LayerNorm x5
``LxmertAttentionOutput``,      ``AttentionOutput``,     residual+dropout+LayerNorm (only blocks left
``LxmertOutput``                ``Output``               outside the layers above, e.g. custom models)
=============================== ======================== =============================================

The word embeddings, pooler and heads have no op of ours and stay transformers' modules. Each new
block gets a copy of the old one's weights (``load_state_dict(strict=True)``: new Parameter
objects; Q, K and V become one fused parameter), its device, dtype and train/eval mode, so the
model's outputs and gradients are unchanged (tests/test_patch.py: <= 1e-5 in fp32). Patch before
creating the optimizer (transformers' ``Trainer`` creates it in ``train()``), and before PEFT if its
adapters target ``query``/``key``/``value`` (they become one fused projection); adapters on the
``dense`` layers keep working. Which fast paths then run is the backend's choice (``auto``: those
measured faster, see lxmert_fast.backend).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lxmert_fast.layers import (
    AttentionOutput,
    CrossLayer,
    Layer,
    Output,
    VisualFeatureEncoder,
    extended_mask_to_bias,
)

Tensor = torch.Tensor


class TransformersLayer(Layer):
    """:class:`~lxmert_fast.layers.Layer` with transformers' ``LxmertLayer`` forward: the mask in the
    extended additive form ``[B, 1, 1, T]`` (or None), returns ``(out,)`` or ``(out, probs)``."""

    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None, output_attentions: bool = False
    ) -> tuple[Tensor, ...]:
        bias = extended_mask_to_bias(
            "attention_mask", attention_mask, hidden_states.shape[0], hidden_states.shape[1]
        )
        out, probs = super().forward(hidden_states, bias, bool(output_attentions))
        return (out, probs) if output_attentions else (out,)


# transformers class name -> (our class, summary key). Whole layers first: their output blocks
# go with them, so only output blocks outside any layer are swapped on their own.
SWAPS: dict[str, tuple[type[nn.Module], str]] = {
    "LxmertVisualFeatureEncoder": (VisualFeatureEncoder, "visual_embedding"),
    "LxmertLayer": (TransformersLayer, "layers"),
    "LxmertXLayer": (CrossLayer, "cross_layers"),
    "LxmertAttentionOutput": (AttentionOutput, "output_blocks"),
    "LxmertOutput": (Output, "output_blocks"),
}


def _swap(model: nn.Module, config: Any, class_names: tuple[str, ...]) -> dict[str, list[str]]:
    swapped: dict[str, list[str]] = {}
    for class_name in class_names:
        ours, key = SWAPS[class_name]
        targets = [(name, m) for name, m in model.named_modules() if type(m).__name__ == class_name]
        for name, old in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            first = next(old.parameters())
            new = ours(config).to(device=first.device, dtype=first.dtype)
            new.load_state_dict(old.state_dict(), strict=True)
            new.train(old.training)
            if isinstance(parent, nn.ModuleList | nn.Sequential):
                parent[int(child)] = new
            else:
                setattr(parent, child, new)
            swapped.setdefault(key, []).append(name)
    return swapped


def _config_of(model: nn.Module, config: Any | None) -> Any:
    config = config if config is not None else getattr(model, "config", None)
    if config is None:
        raise ValueError("config: model has no .config; pass the LXMERT config explicitly")
    return config


def apply_to(model: nn.Module, config: Any | None = None) -> nn.Module:
    """Swap every transformers LXMERT block of ``model`` that has a fast path for ours, in place.

    ``config`` defaults to ``model.config``. Returns ``model``; ``model.lxmert_fast_swapped`` says
    what was swapped: ``{"visual_embedding" | "layers" | "cross_layers" | "output_blocks": [module
    names]}``. A second call finds nothing left to swap (and records an empty dict).

    Example::

        model = transformers.LxmertForQuestionAnswering.from_pretrained(path)
        lxmert_fast.apply_to(model)
        trainer = transformers.Trainer(model=model, ...)
    """
    swapped = _swap(model, _config_of(model, config), tuple(SWAPS))
    model.lxmert_fast_swapped = swapped
    return model


def replace_cross_layers(model: nn.Module, config: Any | None = None) -> int:
    """Only the cross layers of :func:`apply_to`: every ``LxmertXLayer`` becomes a :class:`CrossLayer`.
    Returns how many were replaced."""
    return len(_swap(model, _config_of(model, config), ("LxmertXLayer",)).get("cross_layers", []))
