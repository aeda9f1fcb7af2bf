"""Answers, not logits: question strings + RoI features + pixel boxes in, answer strings out.

::

    answerer = lxmert_fast.Answerer.from_pretrained("runs/pretrain/export")
    answerer(["what color is the dog ?"], [feats], [boxes], [(img_h, img_w)], top_k=3)
    # -> [[("brown", 0.81), ("black", 0.07), ("white", 0.05)]]

The directory is a transformers-format checkpoint with ``vocab.txt`` beside it (train.py's
export has one). The model is the one ``config.json``'s ``architectures`` names:
``LxmertForQuestionAnswering`` (a VQA/GQA head: answers from ``config.id2label``) or
``LxmertForPreTraining`` (its pre-training QA head: answers from ``config.id2label`` when set,
else the export's ``all_ans.json``, the table the head was sized for).

What a call does, as training did: each question becomes ``[CLS] + word pieces + [SEP]``, cut
to ``max_seq_len`` (20, the paper's), padded to the longest in the batch with an attention mask;
boxes are divided by the image's (w, h, w, h) and clipped to [0, 1]
(:func:`lxmert_fast.data.images.normalize_boxes`, the training data path's rule); the first
``max_boxes`` (36) boxes of each image are kept, images with fewer are padded and masked. The
model runs in eval mode under ``torch.no_grad``, in bf16 autocast on CUDA (``autocast=False``
for fp32). Scores are the softmax over the answer table (``scores="sigmoid"`` for heads
fine-tuned with the authors' binary cross-entropy); the ranking is the same either way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lxmert_fast.config import CONFIG_NAME
from lxmert_fast.data.images import normalize_boxes
from lxmert_fast.modeling import LxmertForPreTraining, LxmertForQuestionAnswering, LxmertPreTrainedModel

Array = np.ndarray | torch.Tensor


def _as_array(name: str, value: Array, width: int | None = None) -> np.ndarray:
    array = value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.ndim != 2 or (width is not None and array.shape[1] != width):
        raise ValueError(f"{name}: expected a 2-D array [boxes, {width or 'D'}], got shape {array.shape}")
    return array


def answer_labels(model: LxmertPreTrainedModel, directory: str | os.PathLike | None = None) -> list[str]:
    """The answer string of each QA label: ``config.id2label``, else ``all_ans.json`` in ``directory``
    (a pre-training export's answer table, one ``{"ans": ...}`` per label)."""
    config = model.config
    if config.id2label is not None:
        return [config.id2label[i] for i in range(len(config.id2label))]
    table = os.path.join(directory, "all_ans.json") if directory is not None else None
    if table is None or not os.path.isfile(table):
        raise ValueError(
            "no answer names: the config has no id2label and "
            + (f"{directory} has no all_ans.json" if directory is not None else "no directory was given")
            + "; name them with lxmert_fast.set_answer_labels(model, answers)"
        )
    with open(table, encoding="utf-8") as f:
        entries = json.load(f)
    answers = [e["ans"] if isinstance(e, dict) else str(e) for e in entries]
    if len(answers) != config.num_qa_labels:
        raise ValueError(
            f"{table}: {len(answers)} answers for a QA head of {config.num_qa_labels} labels "
            "(expected the table the head was trained with)"
        )
    return answers


class Answerer:
    """Answer questions about images with an LXMERT QA head (see the module docs).

    ``model``: an :class:`~lxmert_fast.LxmertForQuestionAnswering` or an
    :class:`~lxmert_fast.LxmertForPreTraining` with a QA head; ``tokenizer``: a
    :class:`~lxmert_fast.data.WordPieceTokenizer` of the model's vocabulary; ``answers``: the
    answer string of each label (default :func:`answer_labels`).
    """

    def __init__(
        self,
        model: LxmertPreTrainedModel,
        tokenizer: Any,
        answers: Sequence[str] | None = None,
        *,
        max_seq_len: int = 20,
        max_boxes: int = 36,
        batch_size: int = 32,
        autocast: bool = True,
        scores: str = "softmax",
    ) -> None:
        if getattr(model, "answer_head", None) is None:
            raise ValueError(f"{type(model).__name__} has no QA answer head (config.task_qa is False)")
        if scores not in ("softmax", "sigmoid"):
            raise ValueError(f"scores: expected 'softmax' or 'sigmoid', got {scores!r}")
        if max_seq_len < 3 or max_seq_len > model.config.max_position_embeddings:
            raise ValueError(
                f"max_seq_len: expected 3..{model.config.max_position_embeddings} (the model's positions), "
                f"got {max_seq_len}"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.answers = list(answers) if answers is not None else answer_labels(model)
        if len(self.answers) != model.config.num_qa_labels:
            raise ValueError(f"answers: expected {model.config.num_qa_labels}, got {len(self.answers)}")
        self.max_seq_len, self.max_boxes, self.batch_size = max_seq_len, max_boxes, batch_size
        self.autocast, self.scores = autocast, scores

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, device: str | torch.device | None = None, **kwargs: Any
    ) -> Answerer:
        """From a checkpoint directory with ``vocab.txt`` (train.py's export, or a fine-tuned model's).
        ``device``: default CUDA when available; ``kwargs``: the constructor's options."""
        from lxmert_fast.data.tokenization import WordPieceTokenizer

        path = os.fspath(path)
        vocab = os.path.join(path, "vocab.txt")
        if not os.path.isfile(vocab):
            raise FileNotFoundError(f"{path}: no vocab.txt beside the model (train.py's export writes one)")
        with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as f:
            architectures = json.load(f).get("architectures") or []
        is_qa = "LxmertForQuestionAnswering" in architectures
        model = (LxmertForQuestionAnswering if is_qa else LxmertForPreTraining).from_pretrained(path)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model.to(device)
        return cls(model, WordPieceTokenizer(vocab), answer_labels(model, path), **kwargs)

    def encode(self, questions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Word-piece ids [B, L] and attention mask [B, L] (L: the longest question, <= max_seq_len)."""
        ids = self.tokenizer.encode_batch([str(q) for q in questions], self.max_seq_len)
        length = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), length), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(len(ids), length)
        for row, pieces in enumerate(ids):
            input_ids[row, : len(pieces)] = torch.tensor(pieces)
            mask[row, : len(pieces)] = 1.0
        return input_ids, mask

    def images(
        self, features: Sequence[Array], boxes: Sequence[Array], image_sizes: Sequence[tuple[float, float]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Features [B, N, D], normalised boxes [B, N, 4] and a box mask [B, N] (None when no image
        is padded); N is the most boxes of an image, at most ``max_boxes``."""
        width = self.model.config.visual_feat_dim
        feats = [_as_array(f"features[{i}]", f, width)[: self.max_boxes] for i, f in enumerate(features)]
        pixel = [_as_array(f"boxes[{i}]", b, 4)[: self.max_boxes] for i, b in enumerate(boxes)]
        n = max(len(f) for f in feats)
        out_feats = torch.zeros(len(feats), n, width)
        out_boxes = torch.zeros(len(feats), n, 4)
        mask = torch.zeros(len(feats), n)
        for i, (f, b, size) in enumerate(zip(feats, pixel, image_sizes, strict=True)):
            img_h, img_w = (float(s) for s in size)
            if len(b) != len(f):
                raise ValueError(f"boxes[{i}]: {len(b)} boxes for {len(f)} features")
            if not (img_h > 0 and img_w > 0):
                raise ValueError(f"image_sizes[{i}]: expected a positive (h, w), got {tuple(size)}")
            if not np.isfinite(b).all():
                raise ValueError(f"boxes[{i}]: NaN or Inf, expected finite pixel coordinates")
            out_feats[i, : len(f)] = torch.from_numpy(np.asarray(f, np.float32))
            out_boxes[i, : len(b)] = torch.from_numpy(normalize_boxes(b, img_h, img_w))
            mask[i, : len(f)] = 1.0
        return out_feats, out_boxes, (None if bool(mask.all()) else mask)

    @torch.no_grad()
    def scores_of(
        self,
        questions: Sequence[str],
        features: Sequence[Array],
        boxes: Sequence[Array],
        image_sizes: Sequence[tuple[float, float]],
    ) -> torch.Tensor:
        """Scores [B, num_qa_labels] (float32, on the CPU) of every answer for each question."""
        if not len(questions) == len(features) == len(boxes) == len(image_sizes):
            raise ValueError(
                f"expected one image per question: {len(questions)} questions, {len(features)} features, "
                f"{len(boxes)} boxes, {len(image_sizes)} image sizes"
            )
        device = self.model.device
        out = []
        for start in range(0, len(questions), self.batch_size):
            part = slice(start, start + self.batch_size)
            input_ids, mask = self.encode(questions[part])
            feats, pos, visual_mask = self.images(features[part], boxes[part], image_sizes[part])
            autocast = torch.autocast("cuda", torch.bfloat16, enabled=self.autocast and device.type == "cuda")
            with autocast:
                logits = self.model(
                    input_ids=input_ids.to(device),
                    visual_feats=feats.to(device),
                    visual_pos=pos.to(device),
                    attention_mask=mask.to(device),
                    visual_attention_mask=None if visual_mask is None else visual_mask.to(device),
                ).question_answering_score.float()
            out.append((logits.softmax(-1) if self.scores == "softmax" else logits.sigmoid()).cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.answers))

    def __call__(
        self,
        questions: Sequence[str],
        features: Sequence[Array],
        boxes: Sequence[Array],
        image_sizes: Sequence[tuple[float, float]],
        top_k: int = 1,
    ) -> list[list[tuple[str, float]]]:
        """For each question (with its image's RoI features [n, D], pixel boxes [n, 4] as
        (x1, y1, x2, y2), and the image's (h, w)): the ``top_k`` best (answer, score), best first."""
        scores = self.scores_of(questions, features, boxes, image_sizes)
        best = scores.topk(min(top_k, scores.shape[1]), dim=-1)
        return [
            [(self.answers[i], float(s)) for s, i in zip(row_s.tolist(), row_i.tolist(), strict=True)]
            for row_s, row_i in zip(best.values, best.indices, strict=True)
        ]


def answer(
    path: str | os.PathLike,
    questions: Sequence[str],
    features: Sequence[Array],
    boxes: Sequence[Array],
    image_sizes: Sequence[tuple[float, float]],
    top_k: int = 1,
) -> list[list[tuple[str, float]]]:
    """One-off :class:`Answerer` call on the checkpoint directory ``path`` (loads the model each time:
    keep an ``Answerer`` for repeated use)."""
    return Answerer.from_pretrained(path)(questions, features, boxes, image_sizes, top_k=top_k)
