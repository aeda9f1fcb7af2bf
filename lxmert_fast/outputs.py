"""Model output containers that behave like transformers' ``ModelOutput``.

Fields are read by attribute or key; integer indexing and :meth:`to_tuple` walk the fields
that are not ``None`` in declaration order, so ``out[0]`` means what it means in
transformers. Fields lxmert_fast adds (per-task losses) come last, so transformers'
positions are unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


class ModelOutput:
    def to_tuple(self) -> tuple:
        return tuple(
            getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None and f.metadata.get("in_tuple", True)
        )

    def __getitem__(self, key: int | slice | str):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self.to_tuple())

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]


@dataclass
class LxmertModelOutput(ModelOutput):
    language_output: Tensor | None = None
    vision_output: Tensor | None = None
    pooled_output: Tensor | None = None
    language_hidden_states: tuple[Tensor, ...] | None = None
    vision_hidden_states: tuple[Tensor, ...] | None = None
    language_attentions: tuple[Tensor, ...] | None = None
    vision_attentions: tuple[Tensor, ...] | None = None
    cross_encoder_attentions: tuple[Tensor, ...] | None = None


@dataclass
class LxmertForPreTrainingOutput(ModelOutput):
    """``losses`` maps each computed task (``mlm``, ``matched``, ``obj``, ``attr``, ``feat``,
    ``qa``) to its weighted loss; ``loss`` is their sum. ``losses`` is not part of the tuple."""

    loss: Tensor | None = None
    prediction_logits: Tensor | None = None
    cross_relationship_score: Tensor | None = None
    question_answering_score: Tensor | None = None
    language_hidden_states: tuple[Tensor, ...] | None = None
    vision_hidden_states: tuple[Tensor, ...] | None = None
    language_attentions: tuple[Tensor, ...] | None = None
    vision_attentions: tuple[Tensor, ...] | None = None
    cross_encoder_attentions: tuple[Tensor, ...] | None = None
    losses: dict[str, Tensor] | None = dataclasses.field(default=None, metadata={"in_tuple": False})


@dataclass
class LxmertForQuestionAnsweringOutput(ModelOutput):
    loss: Tensor | None = None
    question_answering_score: Tensor | None = None
    language_hidden_states: tuple[Tensor, ...] | None = None
    vision_hidden_states: tuple[Tensor, ...] | None = None
    language_attentions: tuple[Tensor, ...] | None = None
    vision_attentions: tuple[Tensor, ...] | None = None
    cross_encoder_attentions: tuple[Tensor, ...] | None = None
