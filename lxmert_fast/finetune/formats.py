"""The authors' fine-tuning files (their ``data/vqa``, ``data/gqa``, ``data/nlvr2``), read and checked.

* VQA: a list of ``{"question_id": int, "img_id", "sent", "label": {answer: score},
  "answer_type", "question_type"}``; ``label`` is absent in the test files.
* GQA: a list of ``{"question_id": str, "img_id", "sent", "label": {answer: score}}``
  (``label`` absent in the submission file).
* NLVR2: a list of ``{"identifier", "uid", "img0", "img1", "sent", "label": 0|1}``; the
  identifier is ``split-set-pair-sentence`` ("dev-850-0-0"), the key of the submission CSV.
* Answer tables: ``trainval_ans2label.json`` ``{answer: label}`` and ``trainval_label2ans.json``
  ``[answer, ...]``, each the inverse of the other.

Every datum is checked when read; an error names ``file: datum i (id)``, the field, what was
expected and what was found (as :func:`lxmert_fast.data.pretrain.load_pretrain_json` does).
Scores must lie in [0, 1]: they are the binary cross-entropy targets of the answer head.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

from lxmert_fast.data.jsonfile import read_json


@dataclass(frozen=True)
class QAExample:
    """One VQA or GQA question. ``label`` is None in test files; ``answer_type`` is VQA's
    ("yes/no", "number", "other"), None for GQA."""

    question_id: int | str
    img_id: str
    sent: str
    label: dict[str, float] | None
    answer_type: str | None = None
    question_type: str | None = None


@dataclass(frozen=True)
class NLVR2Example:
    """One NLVR2 statement about the image pair (img0, img1); ``label`` 1 true, 0 false, None unknown."""

    identifier: str
    uid: str
    img0: str
    img1: str
    sent: str
    label: int | None


def _name(value: object) -> str:
    return type(value).__name__


def _read_list(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[tuple[str, int, object]]:
    """``(path, i, datum)`` of each datum of the JSON list files ``paths``."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    out = []
    for path in paths:
        path = os.fspath(path)
        data = read_json(path)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of data, got {_name(data)}")
        out.extend((path, i, datum) for i, datum in enumerate(data))
    return out


def _field(datum: dict, key: str, types: type | tuple[type, ...], where: str, expected: str) -> object:
    if key not in datum:
        raise ValueError(f"{where}: lacks {key!r} (expected {expected})")
    value = datum[key]
    if not isinstance(value, types) or isinstance(value, bool):
        raise ValueError(f"{where}: {key!r} expected {expected}, got {_name(value)} {value!r:.60}")
    return value


def _check_label(label: object, where: str) -> dict[str, float]:
    if not isinstance(label, dict):
        raise ValueError(f"{where}: 'label' expected an object {{answer: score}}, got {_name(label)}")
    for answer, score in label.items():
        ok = isinstance(score, int | float) and not isinstance(score, bool) and math.isfinite(score)
        if not ok or not 0.0 <= score <= 1.0:
            raise ValueError(f"{where}: label[{answer!r}] expected a score in [0, 1], got {score!r}")
    return {answer: float(score) for answer, score in label.items()}


def _check_unique(ids: list, paths: object, what: str) -> None:
    seen: set = set()
    for value in ids:
        if value in seen:
            raise ValueError(f"{paths}: duplicate {what} {value!r}")
        seen.add(value)


def _read_qa(paths, qid_type: type, qid_expected: str, vqa: bool) -> list[QAExample]:
    examples = []
    for path, i, datum in _read_list(paths):
        where = f"{path}: datum {i}"
        if not isinstance(datum, dict):
            raise ValueError(f"{where}: expected an object, got {_name(datum)}")
        qid = _field(datum, "question_id", qid_type, where, qid_expected)
        where = f"{where} (question {qid})"
        img_id = _field(datum, "img_id", str, where, "an image id string")
        sent = _field(datum, "sent", str, where, "the question string")
        label = _check_label(datum["label"], where) if "label" in datum else None
        types = {}
        if vqa:
            for key in ("answer_type", "question_type"):
                if key in datum:
                    types[key] = _field(datum, key, str, where, "a string")
        examples.append(QAExample(qid, img_id, sent, label, **types))
    _check_unique([e.question_id for e in examples], paths, "question_id")
    return examples


def read_vqa(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[QAExample]:
    """The authors' VQA files (``train.json``, ``nominival.json``, ``minival.json``, ``test.json``), concatenated."""
    return _read_qa(paths, int, "an integer (the VQA question id)", vqa=True)


def read_gqa(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[QAExample]:
    """The authors' GQA files (``train.json``, ``valid.json``, ``testdev.json``, ``submit.json``), concatenated."""
    return _read_qa(paths, str, "a string (GQA question ids are strings)", vqa=False)


def read_nlvr2(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[NLVR2Example]:
    """The authors' NLVR2 files (``train.json``, ``valid.json``, ``test.json``), concatenated."""
    examples = []
    for path, i, datum in _read_list(paths):
        where = f"{path}: datum {i}"
        if not isinstance(datum, dict):
            raise ValueError(f"{where}: expected an object, got {_name(datum)}")
        identifier = _field(datum, "identifier", str, where, "a string like 'dev-850-0-0'")
        where = f"{where} ({identifier})"
        uid = datum.get("uid", identifier)
        if not isinstance(uid, str):
            raise ValueError(f"{where}: 'uid' expected a string, got {_name(uid)}")
        img0 = _field(datum, "img0", str, where, "an image id string")
        img1 = _field(datum, "img1", str, where, "an image id string")
        sent = _field(datum, "sent", str, where, "the statement string")
        label = None
        if "label" in datum:
            label = datum["label"]
            if isinstance(label, bool) or not isinstance(label, int) or label not in (0, 1):
                raise ValueError(f"{where}: 'label' expected 0 or 1, got {_name(label)} {label!r:.60}")
        examples.append(NLVR2Example(identifier, uid, img0, img1, sent, label))
    _check_unique([e.identifier for e in examples], paths, "identifier")
    return examples


def read_label_tables(ans2label_path: str | os.PathLike, label2ans_path: str | os.PathLike) -> list[str]:
    """The answer list (label → answer) of ``trainval_label2ans.json``, checked against
    ``trainval_ans2label.json``: the same answers, each the inverse of the other."""
    ans2label = read_json(ans2label_path)
    label2ans = read_json(label2ans_path)
    if not isinstance(label2ans, list) or not all(isinstance(a, str) for a in label2ans):
        raise ValueError(f"{label2ans_path}: expected a JSON list of answer strings, got {_name(label2ans)}")
    if not isinstance(ans2label, dict):
        raise ValueError(
            f"{ans2label_path}: expected a JSON object {{answer: label}}, got {_name(ans2label)}"
        )
    if len(set(label2ans)) != len(label2ans):
        dup = next(a for i, a in enumerate(label2ans) if a in label2ans[:i])
        raise ValueError(f"{label2ans_path}: answer {dup!r} appears twice")
    if len(ans2label) != len(label2ans):
        raise ValueError(
            f"{ans2label_path}: {len(ans2label)} answers, {label2ans_path}: {len(label2ans)}; expected the same"
        )
    for answer, label in ans2label.items():
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(label2ans):
            raise ValueError(
                f"{ans2label_path}: answer {answer!r} expected a label in [0, {len(label2ans)}), got {label!r}"
            )
        if label2ans[label] != answer:
            raise ValueError(
                f"{ans2label_path}: answer {answer!r} has label {label}, but {label2ans_path} "
                f"gives label {label} to {label2ans[label]!r}"
            )
    return label2ans
