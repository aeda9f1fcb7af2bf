"""Prediction files in the submission formats, each published atomically (never left torn).

* VQA (EvalAI): JSON ``[{"question_id": int, "answer": str}, ...]``;
* GQA (EvalAI): JSON ``[{"questionId": str, "prediction": str}, ...]``;
* NLVR2 (the official ``metrics.py``): CSV lines ``identifier,True`` / ``identifier,False``.

The types are checked before anything is written: a question id of the wrong type is refused
by the servers only after the upload.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from lxmert_fast.atomic import atomic_write_text


def _check(value: object, kind: type, what: str) -> None:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{what}: expected {kind.__name__}, got {type(value).__name__} {value!r:.60}")


def _write_qa_json(
    predictions: Iterable[tuple[object, str]],
    path: str | os.PathLike,
    task: str,
    id_key: str,
    id_type: type,
    answer_key: str,
) -> None:
    """JSON ``[{id_key: question id, answer_key: answer}, ...]`` with the ids' and answers' types checked."""
    rows = []
    for qid, answer in predictions:
        _check(qid, id_type, f"{task} {id_key}")
        _check(answer, str, f"{answer_key} of question {qid}")
        rows.append({id_key: qid, answer_key: answer})
    atomic_write_text(path, json.dumps(rows, indent=1) + "\n")


def write_vqa(predictions: Iterable[tuple[int, str]], path: str | os.PathLike) -> None:
    _write_qa_json(predictions, path, "VQA", "question_id", int, "answer")


def write_gqa(predictions: Iterable[tuple[str, str]], path: str | os.PathLike) -> None:
    _write_qa_json(predictions, path, "GQA", "questionId", str, "prediction")


def write_nlvr2(predictions: Iterable[tuple[str, int]], path: str | os.PathLike) -> None:
    lines = []
    for identifier, answer in predictions:
        _check(identifier, str, "NLVR2 identifier")
        if "," in identifier or answer not in (0, 1):
            raise ValueError(f"NLVR2 prediction {identifier!r}: expected an identifier without ',' and 0/1")
        lines.append(f"{identifier},{'True' if answer == 1 else 'False'}\n")
    atomic_write_text(path, "".join(lines))
