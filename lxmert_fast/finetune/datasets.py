"""Fine-tuning items with fixed shapes, batched by ``default_collate``.

Every item holds ``input_ids``/``token_type_ids`` [T] int64 and ``attention_mask`` [T] float
(``[CLS] + at most T-2 word pieces + [SEP]``, zero-padded, as the authors' ``max_seq_length``),
the image tensors of :func:`lxmert_fast.data.images.image_tensors` (boxes normalised exactly
as in pre-training), ``target`` and ``index`` (the example's position, for predictions):

* :class:`QADataset` (VQA, GQA): ``visual_feats`` [N, D], ``visual_pos`` [N, 4],
  ``visual_mask`` [N]; ``target`` [num_answers] float, the soft scores of the label's answers
  (answers outside the table dropped; all zero for a test question).
* :class:`NLVR2Dataset`: ``visual_feats`` [2, N, D], ``visual_pos`` [2, N, 4],
  ``visual_mask`` [2, N] (img0, img1 — the authors' layout); ``target`` () int64, 1 true,
  0 false, -1 unknown (test).

Like the authors' datasets, examples whose images are not in the feature store are left out
(``skipped`` counts them); none left is an error.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from lxmert_fast.data.images import image_tensors
from lxmert_fast.data.store import FeatureStore
from lxmert_fast.data.tokenization import WordPieceTokenizer
from lxmert_fast.finetune.formats import NLVR2Example, QAExample

IMAGE_KEYS = ("visual_feats", "visual_pos", "visual_mask")


def text_tensors(tokenizer: WordPieceTokenizer, sent: str, max_seq_len: int) -> dict[str, torch.Tensor]:
    ids = tokenizer.encode(sent.strip(), max_seq_len)
    pad = max_seq_len - len(ids)
    return {
        "input_ids": torch.tensor(ids + [tokenizer.pad_id] * pad),
        "token_type_ids": torch.zeros(max_seq_len, dtype=torch.long),
        "attention_mask": torch.tensor([1.0] * len(ids) + [0.0] * pad),
    }


class _FinetuneDataset(Dataset):
    def __init__(
        self,
        examples: Sequence,
        store: FeatureStore,
        tokenizer: WordPieceTokenizer,
        max_seq_len: int,
        num_boxes: int,
        image_keys: tuple[str, ...],
        source: object = "examples",
    ) -> None:
        if not examples:
            raise ValueError(f"{source}: no examples")
        kept = [e for e in examples if all(getattr(e, key) in store for key in image_keys)]
        if not kept:
            raise ValueError(
                f"{source}: none of the {len(examples)} examples has its images in the feature store "
                f"{store.directory} (the first wants {getattr(examples[0], image_keys[0])!r}; the store "
                f"holds ids like {store.keys()[:1]})"
            )
        self.examples = kept
        self.skipped = len(examples) - len(kept)
        self.store = store
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.num_boxes = num_boxes

    def __len__(self) -> int:
        return len(self.examples)

    def _image(self, img_id: str) -> dict[str, torch.Tensor]:
        item = image_tensors(self.store, img_id, self.num_boxes)
        return {key: item[key] for key in IMAGE_KEYS}


class QADataset(_FinetuneDataset):
    """VQA/GQA items; ``label2ans`` is the task's answer list (the head's rows)."""

    def __init__(
        self,
        examples: Sequence[QAExample],
        store: FeatureStore,
        tokenizer: WordPieceTokenizer,
        label2ans: Sequence[str],
        max_seq_len: int = 20,
        num_boxes: int = 36,
        source: object = "examples",
    ) -> None:
        super().__init__(examples, store, tokenizer, max_seq_len, num_boxes, ("img_id",), source)
        self.label2ans = list(label2ans)
        self.ans2label = {answer: i for i, answer in enumerate(self.label2ans)}
        self.has_labels = all(e.label is not None for e in self.examples)

    def target(self, example: QAExample) -> torch.Tensor:
        target = torch.zeros(len(self.label2ans))
        for answer, score in (example.label or {}).items():
            if answer in self.ans2label:
                target[self.ans2label[answer]] = score
        return target

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        example = self.examples[index]
        item = text_tensors(self.tokenizer, example.sent, self.max_seq_len)
        item.update(self._image(example.img_id))
        item["target"] = self.target(example)
        item["index"] = torch.tensor(index)
        return item


class NLVR2Dataset(_FinetuneDataset):
    """NLVR2 items: one statement, two images stacked on dimension 0 (img0, img1)."""

    def __init__(
        self,
        examples: Sequence[NLVR2Example],
        store: FeatureStore,
        tokenizer: WordPieceTokenizer,
        max_seq_len: int = 20,
        num_boxes: int = 36,
        source: object = "examples",
    ) -> None:
        super().__init__(examples, store, tokenizer, max_seq_len, num_boxes, ("img0", "img1"), source)
        self.label2ans = None
        self.has_labels = all(e.label is not None for e in self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        example = self.examples[index]
        item = text_tensors(self.tokenizer, example.sent, self.max_seq_len)
        images = [self._image(example.img0), self._image(example.img1)]
        item.update({key: torch.stack([image[key] for image in images]) for key in IMAGE_KEYS})
        item["target"] = torch.tensor(-1 if example.label is None else example.label)
        item["index"] = torch.tensor(index)
        return item


def eval_batches(num_items: int, batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Index batches of a rank that, over all ranks, cover every item at least once with full,
    fixed-shape batches: the last global batches repeat item 0 (its prediction is the same every
    time, so predictions keyed by id are unaffected). Use as a ``DataLoader``'s ``batch_sampler``."""
    per_round = batch_size * world
    rounds = -(-num_items // per_round)
    order = list(range(num_items)) + [0] * (rounds * per_round - num_items)
    return [order[(r * world + rank) * batch_size :][:batch_size] for r in range(rounds)]
