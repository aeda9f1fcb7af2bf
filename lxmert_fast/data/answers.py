"""The QA answer table in the authors' format and their answer normalisation.

The table file (the authors' ``all_ans.json``) is a JSON list of
``{"ans": answer, "dsets": [dataset, ...]}``; an answer's index in the list (after the
optional dataset filter) is its class id. Raw answers in the data are normalised with
:func:`normalize_answer` before lookup, exactly as the authors' ``AnswerTable.convert_ans``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from lxmert_fast.data.jsonfile import read_json

ANSWER_CONVERSIONS = {
    "a man": "man",
    "the man": "man",
    "a woman": "woman",
    "the woman": "woman",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "grey": "gray",
}


def normalize_answer(answer: str) -> str:
    """Lower-case, drop one trailing '.', one leading article ('a ', 'an ', 'the ', checked in
    that order, as the authors do), then map number words and a few synonyms."""
    if not answer:
        return ""
    answer = answer.lower()
    if answer[-1] == ".":
        answer = answer[:-1].strip()
    for article in ("a ", "an ", "the "):
        if answer.startswith(article):
            answer = answer[len(article) :].strip()
    return ANSWER_CONVERSIONS.get(answer, answer)


class AnswerTable:
    """Answer ↔ id map read from the authors' answer-table JSON, optionally limited to ``dsets``."""

    def __init__(
        self, entries: list[dict], dsets: Iterable[str] | None = None, source: str = "<memory>"
    ) -> None:
        wanted = None if dsets is None else set(dsets)
        answers = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or "ans" not in entry:
                raise ValueError(f"{source}: entry {i} is not an {{'ans', 'dsets'}} object: {entry!r}")
            if wanted is None or wanted & set(entry.get("dsets", [])):
                answers.append(entry["ans"])
        self.answers = answers
        self.ids = {ans: i for i, ans in enumerate(answers)}
        if len(self.ids) != len(answers):
            raise ValueError(f"{source}: duplicate answers in the table")

    @classmethod
    def load(cls, path: str | os.PathLike, dsets: Iterable[str] | None = None) -> AnswerTable:
        entries = read_json(path)
        if not isinstance(entries, list):
            raise ValueError(
                f"{path}: expected a JSON list of {{'ans', 'dsets'}}, got {type(entries).__name__}"
            )
        return cls(entries, dsets, source=os.fspath(path))

    def __len__(self) -> int:
        return len(self.answers)

    def __contains__(self, answer: str) -> bool:
        return answer in self.ids

    def ans2id(self, answer: str) -> int:
        return self.ids[answer]

    def id2ans(self, index: int) -> str:
        return self.answers[index]

    def convert_label(self, label: dict[str, float]) -> dict[int, float]:
        """``{raw answer: score}`` → ``{answer id: score}``, normalised, answers outside the table dropped.
        Scores of answers that normalise to the same string are summed."""
        out: dict[int, float] = {}
        for raw, score in label.items():
            answer = normalize_answer(raw)
            if answer in self.ids:
                out[self.ids[answer]] = out.get(self.ids[answer], 0.0) + float(score)
        return out
