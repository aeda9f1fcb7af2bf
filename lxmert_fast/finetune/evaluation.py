"""Held-out scores as the evaluators count them, and the running-log counts on the device.

* VQA (the authors' ``VQAEvaluator``): a prediction scores the soft score its answer has in
  the question's ``label`` (0 if absent); accuracy is the mean over the predictions. Also per
  ``answer_type`` ("yes/no", "number", "other").
* GQA (the authors' ``GQAEvaluator``): the same count; GQA labels are ``{answer: 1.0}``, so it is
  exact-match accuracy.
* NLVR2 (the official ``nlvr2/eval/metrics.py``): accuracy over statements, and consistency:
  the share of sentences all of whose image pairs are predicted right. Statements of one
  sentence share the identifier but for its third, the pair, component
  (``dev-850-0-0`` and ``dev-850-1-0`` are one sentence about pairs 0 and 1 of set 850).

Predictions are ``[(id, answer)]``: the question id with an answer string (VQA/GQA), the
identifier with 1/0 (NLVR2). A prediction for an id that the examples lack is an error, as is
an example without label.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from lxmert_fast.finetune.formats import NLVR2Example, QAExample

Tensor = torch.Tensor


def _lookup(by_id: dict, pred_id: object, what: str):
    try:
        example = by_id[pred_id]
    except KeyError:
        raise ValueError(f"predictions: {what} {pred_id!r} is not among the {len(by_id)} examples") from None
    if example.label is None:
        raise ValueError(f"predictions: {what} {pred_id!r} has no label (a test split cannot be scored)")
    return example


def qa_scores(
    predictions: Iterable[tuple[int | str, str]], examples: Sequence[QAExample]
) -> dict[str, float]:
    """``{"accuracy": mean soft score, "accuracy_<answer type>": ..., "count": n}`` (module docs)."""
    by_id = {e.question_id: e for e in examples}
    total, count = 0.0, 0
    per_type: dict[str, list[float]] = {}
    for qid, answer in dict(predictions).items():
        example = _lookup(by_id, qid, "question")
        score = example.label.get(answer, 0.0)
        total += score
        count += 1
        if example.answer_type is not None:
            sums = per_type.setdefault(example.answer_type, [0.0, 0])
            sums[0] += score
            sums[1] += 1
    if count == 0:
        raise ValueError("predictions: empty, nothing to score")
    out = {"accuracy": total / count, "count": count}
    out.update({f"accuracy_{kind}": s / n for kind, (s, n) in sorted(per_type.items())})
    return out


def consistency_group(identifier: str) -> str:
    """The sentence an NLVR2 identifier ``split-set-pair-sentence`` belongs to (pair blanked)."""
    parts = identifier.split("-")
    if len(parts) < 4:
        raise ValueError(
            f"identifier {identifier!r}: expected NLVR2's 'split-set-pair-sentence' (e.g. 'dev-850-0-0')"
        )
    parts[2] = ""
    return "-".join(parts)


def nlvr2_scores(
    predictions: Iterable[tuple[str, int]], examples: Sequence[NLVR2Example]
) -> dict[str, float]:
    """``{"accuracy", "consistency", "count", "sentences"}`` of predictions keyed by identifier."""
    by_id = {e.identifier: e for e in examples}
    correct = 0
    consistent: dict[str, bool] = {}
    predictions = dict(predictions)
    for identifier, answer in predictions.items():
        example = _lookup(by_id, identifier, "identifier")
        right = int(answer) == example.label
        correct += right
        group = consistency_group(identifier)
        consistent[group] = consistent.get(group, True) and right
    if not predictions:
        raise ValueError("predictions: empty, nothing to score")
    return {
        "accuracy": correct / len(predictions),
        "consistency": sum(consistent.values()) / len(consistent),
        "count": len(predictions),
        "sentences": len(consistent),
    }


def qa_counts(scores: Tensor, target: Tensor) -> Tensor:
    """[correct, total] on the device: the summed soft score of each row's top answer, and the rows.
    No host read (the running log sums these and reads them once per window)."""
    picked = target.gather(1, scores.argmax(1, keepdim=True)).sum().float()
    return torch.stack([picked, torch.tensor(float(target.shape[0]), device=scores.device)])


def nlvr2_counts(logits: Tensor, target: Tensor) -> Tensor:
    """[correct, total] on the device over labelled rows (target >= 0)."""
    valid = target >= 0
    correct = ((logits.argmax(1) == target) & valid).sum().float()
    return torch.stack([correct, valid.sum().float()])
