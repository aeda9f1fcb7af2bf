"""The fine-tuning tasks as objects a training loop drives: ``TASKS = {"vqa", "gqa", "nlvr2"}``.

A loop uses a task like this (every call is documented on :class:`Task`)::

    task = TASKS["vqa"]
    paths = task.synthetic(data_dir) if no_data else {...}   # or the authors' files
    data = task.build_data(store, tokenizer, train=..., valid=..., test=..., ans2label=..., label2ans=...)
    model = task.build_model(config, data.num_labels, data.label2ans)   # then --load / --load_qa
    for batch in loader(data.train):                           # default_collate of the items
        out = model(**task.model_inputs(batch_on_device))
        loss = task.loss(out, batch_on_device)                 # backward, step
        metrics.add_counts(task.accuracy_counts(out, batch_on_device))   # no host read
    preds = [p for b in eval_loader(data.valid) for p in task.predictions(model(**task.model_inputs(b)), b, data.valid)]
    task.evaluate(preds, data.valid.examples)                   # {"accuracy", ...}
    task.write_submission(preds, path)                          # atomic, the server's format
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lxmert_fast.config import LxmertConfig
from lxmert_fast.data.store import FeatureStore
from lxmert_fast.data.tokenization import WordPieceTokenizer
from lxmert_fast.finetune import evaluation, submission
from lxmert_fast.finetune.datasets import NLVR2Dataset, QADataset
from lxmert_fast.finetune.formats import read_gqa, read_label_tables, read_nlvr2, read_vqa
from lxmert_fast.finetune.models import LxmertForNLVR2, soft_score_loss
from lxmert_fast.modeling import LxmertForQuestionAnswering, masked_cross_entropy

Tensor = torch.Tensor
Paths = str | os.PathLike | Sequence[str | os.PathLike]
SPLITS = ("train", "valid", "test")
# The NLVR2 head's outputs: label 0 false, 1 true (the submission's False/True).
NLVR2_LABELS = ("False", "True")


@dataclass
class TaskData:
    """The datasets of one run (None where no files were given) and the head's size."""

    train: QADataset | NLVR2Dataset | None
    valid: QADataset | NLVR2Dataset | None
    test: QADataset | NLVR2Dataset | None
    num_labels: int
    label2ans: list[str] | None


class Task:
    """What a loop needs of a fine-tuning task. Subclasses: :class:`QATask`, :class:`NLVR2Task`."""

    name: str
    #: Extension of the submission file (the authors name it ``{split}_predict.json`` / ``.csv``).
    submission_suffix: str

    def synthetic(self, data_dir: str | os.PathLike, **kwargs: Any) -> dict:
        """Generate (or reuse) the synthetic set in ``data_dir``; returns the paths of
        :func:`lxmert_fast.finetune.synthetic.files` (``train``, ``valid``, ``test``, ``ans2label``,
        ``label2ans``, ``features``, ``store``, ``vocab``, ``num_boxes``, ``max_seq_len``)."""
        from lxmert_fast.finetune import synthetic  # not at import: `python -m` runs that module

        return synthetic.generate(self.name, data_dir, **kwargs)

    def read(self, paths: Paths) -> list:
        raise NotImplementedError

    def build_data(
        self,
        store: FeatureStore | str | os.PathLike,
        tokenizer: WordPieceTokenizer | str | os.PathLike,
        train: Paths | None = None,
        valid: Paths | None = None,
        test: Paths | None = None,
        ans2label: str | os.PathLike | None = None,
        label2ans: str | os.PathLike | None = None,
        max_seq_len: int = 20,
        num_boxes: int = 36,
    ) -> TaskData:
        """Read the split files given and build their datasets over ``store`` (a converted feature
        store). ``ans2label``/``label2ans``: the answer tables (VQA/GQA only)."""
        raise NotImplementedError

    def build_model(
        self, config: LxmertConfig, num_labels: int, label2ans: Sequence[str] | None = None
    ) -> nn.Module:
        """A freshly initialised model for the task (the backbone is loaded afterwards). The config's
        answer head is resized to ``num_labels`` and its labels named by ``label2ans`` when given
        (``config.id2label``, saved with the export); labels of the pre-training table are dropped."""
        raise NotImplementedError

    def model_inputs(self, batch: dict[str, Tensor], use_visual_mask: bool = False) -> dict[str, Tensor]:
        """The model's keyword arguments from a collated batch. ``use_visual_mask``: pass
        ``visual_mask`` as the visual attention mask — decide it on the CPU batch (``not
        (batch["visual_mask"] > 0).all()``): the authors' features have 36 boxes everywhere."""
        inputs = {
            key: batch[key]
            for key in ("input_ids", "visual_feats", "visual_pos", "attention_mask", "token_type_ids")
        }
        if use_visual_mask:
            inputs["visual_attention_mask"] = batch["visual_mask"]
        return inputs

    def scores(self, output: Any) -> Tensor:
        """The logits [B, num_labels] in a model output."""
        raise NotImplementedError

    def loss(self, output: Any, batch: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def accuracy_counts(self, output: Any, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{task name: [correct, total]}`` on the device (no host read), for
        :meth:`lxmert_fast.metrics.RunningMetrics.add_counts`."""
        raise NotImplementedError

    def predictions(self, output: Any, batch: dict[str, Tensor], dataset) -> list[tuple[Any, Any]]:
        """``[(id, answer)]`` of a batch of ``dataset`` (one host read): question id and answer string
        (VQA/GQA), identifier and 1/0 (NLVR2)."""
        raise NotImplementedError

    def example_id(self, example: Any) -> Any:
        """The key of ``example`` in predictions and submissions."""
        raise NotImplementedError

    def evaluate(self, predictions: Sequence[tuple[Any, Any]], examples: Sequence) -> dict[str, float]:
        """Scores as the task's evaluator counts them (:mod:`lxmert_fast.finetune.evaluation`)."""
        raise NotImplementedError

    def write_submission(self, predictions: Sequence[tuple[Any, Any]], path: str | os.PathLike) -> None:
        """The predictions in the submission format, published atomically."""
        raise NotImplementedError

    def text_only_baseline(self, train: Sequence, held_out: Sequence) -> float:
        """The held-out accuracy of answering from the text alone (majority answer per question)."""
        from lxmert_fast.finetune import synthetic

        return synthetic.text_only_baseline(self.name, train, held_out)


def _describe(paths: Paths) -> str:
    return ", ".join(os.fspath(p) for p in ([paths] if isinstance(paths, str | os.PathLike) else paths))


def _open(store, tokenizer) -> tuple[FeatureStore, WordPieceTokenizer]:
    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    tokenizer = tokenizer if isinstance(tokenizer, WordPieceTokenizer) else WordPieceTokenizer(tokenizer)
    return store, tokenizer


class QATask(Task):
    """VQA and GQA: :class:`~lxmert_fast.LxmertForQuestionAnswering` over the answer table."""

    submission_suffix = "json"

    def __init__(self, name: str, reader: Callable, writer: Callable) -> None:
        self.name, self._reader, self._writer = name, reader, writer

    def read(self, paths: Paths) -> list:
        return self._reader(paths)

    def build_data(
        self,
        store,
        tokenizer,
        train=None,
        valid=None,
        test=None,
        ans2label=None,
        label2ans=None,
        max_seq_len: int = 20,
        num_boxes: int = 36,
    ) -> TaskData:
        if ans2label is None or label2ans is None:
            raise ValueError(
                f"{self.name}: the answer tables trainval_ans2label.json/trainval_label2ans.json are needed"
            )
        answers = read_label_tables(ans2label, label2ans)
        store, tokenizer = _open(store, tokenizer)
        sets = {
            split: None
            if paths is None
            else QADataset(
                self.read(paths), store, tokenizer, answers, max_seq_len, num_boxes, source=_describe(paths)
            )
            for split, paths in zip(SPLITS, (train, valid, test), strict=True)
        }
        return TaskData(**sets, num_labels=len(answers), label2ans=answers)

    def build_model(self, config: LxmertConfig, num_labels: int, label2ans=None) -> nn.Module:
        config = dataclasses.replace(config, num_qa_labels=num_labels, id2label=None, label2id=None)
        if label2ans is not None:
            config.set_answer_labels(list(label2ans))
        return LxmertForQuestionAnswering(config)

    def scores(self, output: Any) -> Tensor:
        return output.question_answering_score

    def loss(self, output: Any, batch: dict[str, Tensor]) -> Tensor:
        return soft_score_loss(self.scores(output), batch["target"])

    def accuracy_counts(self, output: Any, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {self.name: evaluation.qa_counts(self.scores(output).detach(), batch["target"])}

    def predictions(self, output: Any, batch: dict[str, Tensor], dataset: QADataset) -> list[tuple[Any, str]]:
        labels = self.scores(output).argmax(1).tolist()
        indices = batch["index"].tolist()
        return [
            (dataset.examples[i].question_id, dataset.label2ans[label])
            for i, label in zip(indices, labels, strict=True)
        ]

    def example_id(self, example: Any) -> Any:
        return example.question_id

    def evaluate(self, predictions, examples) -> dict[str, float]:
        return evaluation.qa_scores(predictions, examples)

    def write_submission(self, predictions, path) -> None:
        self._writer(dict(predictions).items(), path)


class NLVR2Task(Task):
    """NLVR2: :class:`~lxmert_fast.finetune.models.LxmertForNLVR2`, two images per statement."""

    name = "nlvr2"
    submission_suffix = "csv"

    def read(self, paths: Paths) -> list:
        return read_nlvr2(paths)

    def build_data(
        self,
        store,
        tokenizer,
        train=None,
        valid=None,
        test=None,
        ans2label=None,
        label2ans=None,
        max_seq_len: int = 20,
        num_boxes: int = 36,
    ) -> TaskData:
        if ans2label is not None or label2ans is not None:
            raise ValueError("nlvr2: takes no answer tables (its head is true/false)")
        store, tokenizer = _open(store, tokenizer)
        sets = {
            split: None
            if paths is None
            else NLVR2Dataset(
                self.read(paths), store, tokenizer, max_seq_len, num_boxes, source=_describe(paths)
            )
            for split, paths in zip(SPLITS, (train, valid, test), strict=True)
        }
        return TaskData(**sets, num_labels=2, label2ans=None)

    def build_model(self, config: LxmertConfig, num_labels: int = 2, label2ans=None) -> nn.Module:
        if num_labels != 2:
            raise ValueError(f"nlvr2: the head is true/false (2 labels), got num_labels={num_labels}")
        config = dataclasses.replace(config, num_qa_labels=2, id2label=None, label2id=None)
        config.set_answer_labels(list(label2ans or NLVR2_LABELS))
        return LxmertForNLVR2(config)

    def scores(self, output: Any) -> Tensor:
        return output.logits

    def loss(self, output: Any, batch: dict[str, Tensor]) -> Tensor:
        return masked_cross_entropy(self.scores(output), batch["target"])

    def accuracy_counts(self, output: Any, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {self.name: evaluation.nlvr2_counts(self.scores(output).detach(), batch["target"])}

    def predictions(
        self, output: Any, batch: dict[str, Tensor], dataset: NLVR2Dataset
    ) -> list[tuple[str, int]]:
        labels = self.scores(output).argmax(1).tolist()
        indices = batch["index"].tolist()
        return [(dataset.examples[i].identifier, label) for i, label in zip(indices, labels, strict=True)]

    def example_id(self, example: Any) -> Any:
        return example.identifier

    def evaluate(self, predictions, examples) -> dict[str, float]:
        return evaluation.nlvr2_scores(predictions, examples)

    def write_submission(self, predictions, path) -> None:
        submission.write_nlvr2(dict(predictions).items(), path)


TASKS: dict[str, Task] = {
    "vqa": QATask("vqa", read_vqa, submission.write_vqa),
    "gqa": QATask("gqa", read_gqa, submission.write_gqa),
    "nlvr2": NLVR2Task(),
}
