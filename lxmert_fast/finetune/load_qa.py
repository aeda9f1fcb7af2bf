"""``--load_qa``: fine-tuning starts from the pre-trained backbone AND its QA head (the authors'
``--loadLXMERTQA``, ``load_lxmert_qa`` in ``src/pretrain/qa_answer_table.py``).

The pre-training head scores the pre-training answer table (9500 answers, ``all_ans.json``);
the fine-tuning head scores the task's ``label2ans``. For each task answer, normalised as the
authors' ``convert_ans`` (:func:`lxmert_fast.data.normalize_answer`), that is in the
pre-training table, the output row (weight and bias of ``answer_head.logit_fc.3``) is copied;
the rest of the head (``logit_fc.0``, the LayerNorm ``logit_fc.2``) is copied whole. Rows of
answers the pre-training table lacks are zeroed, as the authors do (``unmatched="keep"``
leaves them at their fresh initialisation instead). The backbone loads strictly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lxmert_fast.checkpoint import CheckpointError, load_state_dict_strict, read_state_dict, to_hf_names
from lxmert_fast.data.answers import AnswerTable, normalize_answer

HEAD = "answer_head.logit_fc."
HEAD_KEYS = tuple(f"{HEAD}{i}.{p}" for i in (0, 2, 3) for p in ("weight", "bias"))
ANSWER_TABLE_NAME = "all_ans.json"


@dataclass(frozen=True)
class QAHeadTransfer:
    """How many of the task's answers took their row from the pre-training head."""

    matched: int
    unmatched: int

    def __str__(self) -> str:
        return (
            f"--load_qa: {self.matched} of {self.matched + self.unmatched} answers initialised from the "
            f"pre-trained QA head, {self.unmatched} not"
        )


def transfer_qa_head(
    model: nn.Module,
    pretrained: dict[str, torch.Tensor],
    pretrain_answers: Sequence[str],
    label2ans: Sequence[str],
    unmatched: str = "zero",
) -> QAHeadTransfer:
    """Copy the pre-training QA head ``pretrained`` (transformers names, ``answer_head.logit_fc.*``)
    into ``model``'s answer head, row by shared answer (module docs). Returns the counts."""
    if unmatched not in ("zero", "keep"):
        raise ValueError(f"unmatched: expected 'zero' (the authors') or 'keep', got {unmatched!r}")
    missing = [k for k in HEAD_KEYS if k not in pretrained]
    if missing:
        raise CheckpointError(
            f"--load_qa: the checkpoint has no QA head ({', '.join(missing)} missing); it was "
            "pre-trained without the QA task: load it with --load instead"
        )
    own = model.state_dict()
    rows = pretrained[f"{HEAD}3.weight"].shape[0]
    if rows != len(pretrain_answers):
        raise CheckpointError(
            f"--load_qa: the pre-trained QA head has {rows} answers, its answer table {len(pretrain_answers)}; "
            "give the table the head was trained with"
        )
    if own[f"{HEAD}3.weight"].shape[0] != len(label2ans):
        raise ValueError(
            f"label2ans: {len(label2ans)} answers, the model's head {own[f'{HEAD}3.weight'].shape[0]} rows"
        )
    for key in HEAD_KEYS[:4]:
        if pretrained[key].shape != own[key].shape:
            raise CheckpointError(
                f"--load_qa: {key}: checkpoint {tuple(pretrained[key].shape)} vs model {tuple(own[key].shape)}"
            )
    pretrain_ids = {answer: i for i, answer in enumerate(pretrain_answers)}
    weight, bias = own[f"{HEAD}3.weight"].clone(), own[f"{HEAD}3.bias"].clone()
    source_w, source_b = pretrained[f"{HEAD}3.weight"], pretrained[f"{HEAD}3.bias"]
    matched = 0
    for label, answer in enumerate(label2ans):
        row = pretrain_ids.get(normalize_answer(answer))
        if row is not None:
            weight[label], bias[label] = source_w[row], source_b[row]
            matched += 1
        elif unmatched == "zero":
            weight[label], bias[label] = 0.0, 0.0
    head = {key: pretrained[key] for key in HEAD_KEYS[:4]}
    head[f"{HEAD}3.weight"], head[f"{HEAD}3.bias"] = weight, bias
    with torch.no_grad():
        for key, value in head.items():
            own[key].copy_(value)
    return QAHeadTransfer(matched, len(label2ans) - matched)


def load_pretrained_qa(
    model: nn.Module,
    path: str | os.PathLike,
    label2ans: Sequence[str],
    answer_table: str | os.PathLike | None = None,
    unmatched: str = "zero",
) -> QAHeadTransfer:
    """The backbone of the pre-trained checkpoint ``path`` (strictly) and its QA head by answer.

    ``answer_table``: the pre-training ``all_ans.json`` the head was sized for (every entry, as the
    authors read it); default ``all_ans.json`` beside the checkpoint (train.py's export has it).
    """
    path = os.fspath(path)
    if answer_table is None:
        answer_table = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), ANSWER_TABLE_NAME)
        if not os.path.isfile(answer_table):
            raise FileNotFoundError(
                f"--load_qa: no {ANSWER_TABLE_NAME} beside {path}; give the pre-training answer table "
                "(the authors': data/lxmert/all_ans.json)"
            )
    state_dict = to_hf_names(read_state_dict(path))
    pretrain_answers = AnswerTable.load(answer_table).answers
    load_state_dict_strict(model, state_dict, backbone_only=True)
    return transfer_qa_head(model, state_dict, pretrain_answers, label2ans, unmatched)
