"""Fine-tuning models, exact to the authors' (``src/tasks/{vqa,gqa,nlvr2}_model.py``).

* VQA and GQA: :class:`lxmert_fast.LxmertForQuestionAnswering` — pooled [CLS] → Linear(h, 2h)
  → GeLU → LayerNorm(2h) → Linear(2h, answers), soft-score BCE × number of answers.
* NLVR2: :class:`LxmertForNLVR2` — the backbone runs over both (statement, image) pairs, the two
  pooled outputs are concatenated ([2h], img0 first) → Linear(2h, 2h) → GeLU → LayerNorm(2h,
  1e-12) → Linear(2h, 2), cross-entropy.

Both heads are named ``answer_head.logit_fc.{0,2,3}``, so the authors' fine-tuned ``BEST.pth``
(``lxrt_encoder.model.bert.*``, ``logit_fc.*``) loads through the one renaming of
:mod:`lxmert_fast.checkpoint` for every task; the head's input width tells VQA/GQA from NLVR2
and loading one into the other is refused as mis-shaped. The heads are initialised as the
authors' ``init_bert_weights``: N(0, 0.02) weights, zero biases, unit LayerNorms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lxmert_fast.config import LAYER_NORM_EPS, LxmertConfig
from lxmert_fast.modeling import (
    GeLU,
    LxmertModel,
    LxmertPreTrainedModel,
    _backbone_check_inputs,
    masked_cross_entropy,
)
from lxmert_fast.outputs import ModelOutput

Tensor = torch.Tensor


class NLVR2Head(nn.Module):
    """The authors' NLVR2 ``logit_fc``: [2h] (two pooled outputs) → 2h → GeLU → LayerNorm → 2."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        width = config.hidden_size * 2
        self.logit_fc = nn.Sequential(
            nn.Linear(width, width), GeLU(), nn.LayerNorm(width, eps=LAYER_NORM_EPS), nn.Linear(width, 2)
        )

    def forward(self, pair_pooled: Tensor) -> Tensor:
        return self.logit_fc(pair_pooled)


@dataclass
class LxmertForNLVR2Output(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None


class LxmertForNLVR2(LxmertPreTrainedModel):
    """NLVR2: one statement, two images.

    Inputs: ``input_ids``/``attention_mask``/``token_type_ids`` [B, T] (the statement),
    ``visual_feats`` [B, 2, N, D], ``visual_pos`` [B, 2, N, 4], optional
    ``visual_attention_mask`` [B, 2, N]. The statement is repeated for each image (rows
    ``2b`` and ``2b + 1`` of the backbone's batch of 2B are example b with img0 and img1, as the
    authors flatten them), so the backbone runs once over 2B pairs. ``labels`` [B] (1 true,
    0 false, -1 ignored) gives the cross-entropy ``loss``; ``logits`` is [B, 2].
    """

    check_inputs = _backbone_check_inputs()

    def __init__(self, config: LxmertConfig | Any) -> None:
        super().__init__(config)
        self.lxmert = LxmertModel(self.config)
        self.answer_head = NLVR2Head(self.config)
        self.init_weights([self.answer_head])

    def forward(
        self,
        input_ids: Tensor,
        visual_feats: Tensor,
        visual_pos: Tensor,
        attention_mask: Tensor | None = None,
        visual_attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
        return_dict: bool | None = None,
    ) -> LxmertForNLVR2Output | tuple:
        if visual_feats.dim() != 4 or visual_feats.shape[1] != 2:
            raise ValueError(
                f"visual_feats: expected [batch, 2, boxes, features] (two images per statement), got "
                f"{list(visual_feats.shape)}"
            )
        batch, _, boxes, _ = visual_feats.shape

        def pairs(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.repeat_interleave(2, dim=0)

        def images(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.reshape(batch * 2, boxes, *x.shape[3:])

        base = self.lxmert(
            pairs(input_ids),
            images(visual_feats),
            images(visual_pos),
            pairs(attention_mask),
            images(visual_attention_mask),
            pairs(token_type_ids),
            return_dict=True,
        )
        logits = self.answer_head(base.pooled_output.reshape(batch, -1))
        loss = None if labels is None else masked_cross_entropy(logits, labels)
        out = LxmertForNLVR2Output(loss=loss, logits=logits)
        return out if (self.config.return_dict if return_dict is None else return_dict) else out.to_tuple()


def soft_score_loss(scores: Tensor, target: Tensor) -> Tensor:
    """The authors' VQA/GQA loss: mean binary cross-entropy with logits times the number of answers
    (what :meth:`lxmert_fast.LxmertForQuestionAnswering.qa_loss` computes for float labels)."""
    return F.binary_cross_entropy_with_logits(scores, target.to(scores.dtype)) * scores.shape[1]
