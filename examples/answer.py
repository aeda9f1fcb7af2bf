"""Answer questions with a trained model: question strings, RoI features and pixel boxes in, answers out.

    deepspeed train.py --deepspeed_config ds.json      # writes runs/pretrain/export (and runs/synthetic_data)
    python examples/answer.py [EXPORT] [--data DIR] [--images 4] [--top_k 3]

EXPORT (default ``runs/pretrain/export``) is a transformers-format directory with ``vocab.txt`` and, for
the pre-training QA head, ``all_ans.json`` — what train.py exports. The questions and images come from
the held-out split of the synthetic set the default run trains on (``--data``, default
``runs/synthetic_data``): each image's RoI features and pixel boxes are read from its feature TSV, as a
detector would give them, with the image's height and width. Prints each question, the best answers
with their scores, and the answer the data gives.
"""

from __future__ import annotations

import argparse
import json
import os

import lxmert_fast
from lxmert_fast.data import normalize_answer
from lxmert_fast.data.synthetic import feature_file
from lxmert_fast.data.tsv import read_feature_tsv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def questions_with_images(data_dir: str, split: str, count: int) -> list[dict]:
    """The first ``count`` images of ``split`` that have a vqa question: question, labelled answers,
    features [n, D], pixel boxes [n, 4] and the image's (h, w)."""
    with open(os.path.join(data_dir, f"{split}.json"), encoding="utf-8") as f:
        data = [d for d in json.load(f) if d["sentf"].get("vqa")][:count]
    wanted = {d["img_id"]: d for d in data}
    images = {}
    for item in read_feature_tsv(os.path.join(data_dir, feature_file(split))):
        if item["img_id"] in wanted:
            images[item["img_id"]] = item
        if len(images) == len(wanted):
            break
    return [
        {
            "question": d["sentf"]["vqa"][0],
            "labels": d["labelf"]["vqa"][0],
            "features": images[d["img_id"]]["features"],
            "boxes": images[d["img_id"]]["boxes"],
            "size": (images[d["img_id"]]["img_h"], images[d["img_id"]]["img_w"]),
        }
        for d in data
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("export", nargs="?", default=os.path.join(ROOT, "runs", "pretrain", "export"))
    parser.add_argument("--data", default=os.path.join(ROOT, "runs", "synthetic_data"))
    parser.add_argument("--split", default="valid")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--top_k", type=int, default=3)
    args = parser.parse_args()
    if not os.path.isdir(args.export):
        raise SystemExit(
            f"{args.export}: no export; run `deepspeed train.py --deepspeed_config ds.json` first"
        )

    answerer = lxmert_fast.Answerer.from_pretrained(args.export)
    samples = questions_with_images(args.data, args.split, args.images)
    results = answerer(
        [s["question"] for s in samples],
        [s["features"] for s in samples],
        [s["boxes"] for s in samples],
        [s["size"] for s in samples],
        top_k=args.top_k,
    )
    print(
        f"model {type(answerer.model).__name__} on {answerer.model.device}, {len(answerer.answers)} answers"
    )
    correct = 0
    for sample, best in zip(samples, results, strict=True):
        # The data's answers are raw ("Blue."); the answer table holds them normalised, as training did.
        expected = (
            normalize_answer(max(sample["labels"], key=sample["labels"].get)) if sample["labels"] else "-"
        )
        correct += best[0][0] == expected
        shown = ", ".join(f"{answer} {score:.2f}" for answer, score in best)
        print(f"Q: {sample['question']}\n   A: {shown}   (data: {expected})")
    print(f"top-1 matches the data's answer for {correct} of {len(samples)}")


if __name__ == "__main__":
    main()
