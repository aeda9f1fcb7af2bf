"""The pre-training corpus: the authors' JSON, examples, the torch Dataset and a resumable sampler.

Pre-training JSON (``mscoco_train.json``, ``vgnococo.json``, ...): a list of
``{"img_id", "sentf": {source: [sentence, ...]}, "labelf": {source: [{answer: score}, ...]}}``;
``labelf[source]`` is aligned with ``sentf[source]`` for the QA sources (vqa, gqa, visual7w),
captions come from mscoco and vg. Each sentence is one example.

Randomness in :class:`PretrainDataset` (word masking, the mismatched sentence, the sampled
answer) is a pure function of ``(seed, epoch, index)``, so a resumed run or a different
number of loader workers sees exactly the same items: counter-based Philox words keyed on
``(seed, epoch, index, slot)`` (:mod:`lxmert_fast.data.randomness`), the scheme the batch loader
(:mod:`lxmert_fast.data.batches`) draws for a whole batch at once, so both give the same items.
Object masking is not done here: it runs on the device (:func:`lxmert_fast.pretraining.mask_objects`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from lxmert_fast.data import randomness
from lxmert_fast.data.answers import AnswerTable
from lxmert_fast.data.images import image_tensors
from lxmert_fast.data.jsonfile import read_json
from lxmert_fast.data.store import FeatureStore
from lxmert_fast.data.tokenization import WordPieceTokenizer

QA_SOURCES = ("vqa", "gqa", "visual7w")


@dataclass
class Example:
    uid: str
    img_id: str
    sent: str
    source: str
    # {answer id: score}; None for captions, {} for a QA sentence whose answers are all outside the table.
    label: dict[int, float] | None


def load_pretrain_json(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[dict]:
    """Concatenate the authors' pre-training JSON files, checking the fields each datum needs."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    data = []
    for path in paths:
        part = read_json(path)
        if not isinstance(part, list):
            raise ValueError(f"{path}: expected a JSON list of data, got {type(part).__name__}")
        for i, datum in enumerate(part):
            check_datum(datum, f"{path}: datum {i}")
        data.extend(part)
    return data


def check_datum(datum: object, where: str) -> None:
    """One datum of the authors' format: ``img_id`` a string, ``sentf`` {source: [sentence, ...]},
    ``labelf`` {source: [{answer: score}, ...]} aligned with ``sentf``. A string where a list
    belongs would otherwise make each character a sentence."""
    if not isinstance(datum, dict) or "img_id" not in datum or "sentf" not in datum:
        raise ValueError(f"{where} lacks 'img_id' or 'sentf'")
    where = f"{where} ({datum['img_id']})"
    if not isinstance(datum["img_id"], str):
        raise ValueError(f"{where}: 'img_id' expected a string, got {type(datum['img_id']).__name__}")
    sentf, labelf = datum["sentf"], datum.get("labelf", {})
    for key, value in (("sentf", sentf), ("labelf", labelf)):
        if not isinstance(value, dict):
            raise ValueError(
                f"{where}: {key!r} expected an object {{source: [...]}}, got {type(value).__name__}"
            )
    for source, sents in sentf.items():
        if not isinstance(sents, list) or not all(isinstance(s, str) for s in sents):
            got = type(sents).__name__ if not isinstance(sents, list) else "a list with non-strings"
            raise ValueError(f"{where}: sentf[{source!r}] expected a list of sentence strings, got {got}")
    for source, labels in labelf.items():
        if not isinstance(labels, list) or not all(isinstance(label, dict) for label in labels):
            got = type(labels).__name__ if not isinstance(labels, list) else "a list with non-objects"
            raise ValueError(f"{where}: labelf[{source!r}] expected a list of {{answer: score}}, got {got}")
        if len(labels) != len(sentf.get(source, [])):
            raise ValueError(
                f"{where}: labelf[{source!r}] has {len(labels)} entries, sentf[{source!r}] "
                f"{len(sentf.get(source, []))}"
            )


def build_examples(
    data: list[dict],
    answer_table: AnswerTable | None,
    sources: Sequence[str] | None = None,
    image_ids: Iterable[str] | None = None,
) -> list[Example]:
    """One example per sentence (authors' ``LXMERTDataset``); QA labels normalised and mapped to ids.

    ``sources`` keeps only those sentence sources; ``image_ids`` drops images without features.
    """
    return list(iter_examples(data, answer_table, sources, image_ids))


def iter_examples(
    data: Iterable[dict],
    answer_table: AnswerTable | None,
    sources: Sequence[str] | None = None,
    image_ids: Iterable[str] | None = None,
) -> Iterator[Example]:
    """:func:`build_examples` one at a time, in its order (the corpus store streams them)."""
    keep_images = None if image_ids is None else set(image_ids)
    for i, datum in enumerate(data):
        img_id = datum["img_id"]
        if keep_images is not None and img_id not in keep_images:
            continue
        for source, sents in datum["sentf"].items():
            if sources is not None and source not in sources:
                continue
            if not isinstance(sents, list):
                raise ValueError(
                    f"datum {i} ({img_id}): sentf[{source!r}] expected a list of sentence strings, "
                    f"got {type(sents).__name__}"
                )
            labels = datum.get("labelf", {}).get(source)
            for k, sent in enumerate(sents):
                label = None
                if labels is not None and answer_table is not None:
                    label = answer_table.convert_label(labels[k])
                yield Example(f"{img_id}_{source}_{k}", img_id, sent, source, label)


def mask_words(
    ids: list[int], words: np.ndarray, tokenizer: WordPieceTokenizer, rate: float
) -> tuple[list[int], list[int]]:
    """BERT masking of the word pieces between [CLS] and [SEP]: each chosen with p=``rate``;
    of those 80 % → [MASK], 10 % → a random vocabulary id, 10 % unchanged. Labels -1 elsewhere.

    ``words``: the Philox words of each position, uint64 [len(ids), 4]
    (:func:`lxmert_fast.data.randomness.word_draws`): 0 selects, 1 acts, 2 is the random id."""
    ids = list(ids)
    labels = [-1] * len(ids)
    for pos in range(1, len(ids) - 1):
        if randomness.uniform(words[pos, 0]) >= rate:
            continue
        labels[pos] = ids[pos]
        action = randomness.uniform(words[pos, 1])
        if action < 0.8:
            ids[pos] = tokenizer.mask_id
        elif action < 0.9:
            ids[pos] = int(randomness.below(words[pos, 2], len(tokenizer)))
    return ids, labels


class PretrainDataset(Dataset):
    """Items for LXMERT pre-training (all tensors, batched by ``default_collate``).

    ``input_ids``/``attention_mask``/``token_type_ids``/``mlm_labels`` [T]; ``visual_feats``
    [N, D] float32 (uncorrupted), ``visual_pos`` [N, 4] in [0, 1], ``visual_mask`` [N];
    ``obj_ids``/``attr_ids`` [N] int64 (-1 on padding), ``obj_conf``/``attr_conf`` [N];
    ``matched_label`` () 1/0; ``qa_label`` () answer id or -1 (unmatched or no answer).

    ``mask_object_words``: if given (a set of word-piece ids), every such piece is replaced by
    [MASK] and nothing else is masked — the held-out "masked object word" probe.
    """

    def __init__(
        self,
        examples: list[Example],
        store: FeatureStore,
        tokenizer: WordPieceTokenizer,
        max_seq_len: int = 20,
        num_boxes: int = 36,
        word_mask_rate: float = 0.15,
        mismatch_rate: float = 0.5,
        seed: int = 0,
        mask_object_words: set[int] | None = None,
    ) -> None:
        if not examples:
            raise ValueError("examples: the dataset is empty (no sentence has image features)")
        self.examples = examples
        self.store = store
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.num_boxes = num_boxes
        self.word_mask_rate = word_mask_rate
        self.mismatch_rate = mismatch_rate
        self.seed = seed
        self.mask_object_words = mask_object_words
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples)

    def _image(self, img_id: str) -> dict[str, torch.Tensor]:
        return image_tensors(self.store, img_id, self.num_boxes)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        key = (self.seed, self.epoch, np.array([index]))
        own = randomness.sample_draws(*key)[0]
        example = self.examples[index]
        sent, matched = example.sent, 1
        if (
            self.mismatch_rate > 0
            and len(self.examples) > 1
            and randomness.uniform(own[0]) < self.mismatch_rate
        ):
            for word in randomness.other_draws(*key)[0]:
                other = self.examples[int(randomness.below(word, len(self.examples)))]
                if other.img_id != example.img_id:
                    sent, matched = other.sent, 0
                    break
        ids = self.tokenizer.encode(sent, self.max_seq_len)
        if self.mask_object_words is not None:
            labels = [i if i in self.mask_object_words else -1 for i in ids]
            ids = [self.tokenizer.mask_id if label >= 0 else i for i, label in zip(ids, labels, strict=True)]
        else:
            words = randomness.word_draws(*key, len(ids))[0]
            ids, labels = mask_words(ids, words, self.tokenizer, self.word_mask_rate)
        pad = self.max_seq_len - len(ids)
        qa = -1
        if matched and example.label:
            answers, scores = zip(*sorted(example.label.items()), strict=True)
            pick = randomness.pick_answer(np.asarray([scores], np.float32), own[1:2])[0]
            qa = int(answers[pick]) if pick >= 0 else -1
        item = {
            "input_ids": torch.tensor(ids + [self.tokenizer.pad_id] * pad),
            "attention_mask": torch.tensor([1.0] * len(ids) + [0.0] * pad),
            "token_type_ids": torch.zeros(self.max_seq_len, dtype=torch.long),
            "mlm_labels": torch.tensor(labels + [-1] * pad),
            "matched_label": torch.tensor(matched),
            "qa_label": torch.tensor(qa),
            "index": torch.tensor(index),
        }
        item.update(self._image(example.img_id))
        return item


class EpochBatchSampler(Sampler[list[int]]):
    """Per-rank micro-batches of a seeded per-epoch permutation, resumable mid-epoch.

    The permutation depends only on ``(seed, epoch)``; rank ``r`` of ``w`` takes batches
    ``r, r + w, ...`` of the global batch sequence. ``set_epoch(epoch, skip)`` skips the
    first ``skip`` batches of this rank without loading them.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.num_items, self.batch_size, self.rank, self.world = num_items, batch_size, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.skip = 0, 0
        if len(self) == 0:
            raise ValueError(
                f"batch_size: {num_items} items cannot fill one batch of {batch_size} on each of {world} ranks"
            )

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.num_items // (self.batch_size * self.world)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)
        else:
            order = np.arange(self.num_items)
        for b in range(self.skip, len(self)):
            start = (b * self.world + self.rank) * self.batch_size
            yield order[start : start + self.batch_size].tolist()
