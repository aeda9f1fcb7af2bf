"""Synthetic VQA, GQA and NLVR2 sets in the tasks' real formats, made from the pre-training set.

:func:`generate` reuses (or writes) the pre-training synthetic set of
:mod:`lxmert_fast.data.synthetic` in ``data_dir`` — its images, feature TSVs, ``vocab.txt`` and
the store ``data_dir/feature_store`` that ``train.py`` converts from them — and writes the
task's files into ``data_dir/<task>/``: ``train.json``, ``valid.json``, ``test.json``, the answer
tables ``trainval_ans2label.json``/``trainval_label2ans.json`` (VQA, GQA) and ``meta.json``
(last, atomically: its presence marks a complete set). Training questions come from the
training images; ``valid`` and ``test`` from the held-out images (first and second half).
Pre-training on the same ``data_dir`` uses the same feature prototypes, so a model
pre-trained there transfers.

Each image shows one object class in one colour (1-3 instances) among background boxes. The
tasks ask what only the image answers:

* VQA: the pre-training set's questions (colour, count, presence, class of the coloured
  object), labels normalised as the authors' answers; test has no labels (as VQA's).
* GQA: "what is the color of the dog ?", "is the dog red ?", "what is the red object ?",
  "is there a red dog ?"; one answer per question with score 1 (as GQA's); test has no labels.
* NLVR2: statements about two images, each sentence paired with :data:`PAIRS_PER_SENTENCE`
  image pairs (identifiers ``split-set-pair-0``): "there is a red dog ." (true when either
  image shows one) and "two photos of a dog ." (true when both do), labels balanced per
  sentence, so the statement alone says nothing.

:func:`text_only_baseline` scores the best answer the question text alone gives (the majority
answer per question string of the training split; NLVR2: the majority label per sentence) on
a held-out split: the bar a fine-tuned model must clear.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Sequence

import numpy as np

from lxmert_fast.atomic import atomic_write_text
from lxmert_fast.data import synthetic as pretrain_synthetic
from lxmert_fast.data.answers import normalize_answer
from lxmert_fast.data.jsonfile import read_json
from lxmert_fast.data.store import convert_tsv_to_store, is_store, store_mismatch
from lxmert_fast.finetune.evaluation import nlvr2_scores, qa_scores
from lxmert_fast.finetune.formats import NLVR2Example, QAExample

TASK_NAMES = ("vqa", "gqa", "nlvr2")
FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
PAIRS_PER_SENTENCE = 4
STORE_NAME = "feature_store"
ANS2LABEL_NAME = "trainval_ans2label.json"
LABEL2ANS_NAME = "trainval_label2ans.json"
NUM_BOXES = pretrain_synthetic.NUM_BOXES
MAX_SEQ_LEN = pretrain_synthetic.MAX_SEQ_LEN


def task_dir(task: str, data_dir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(data_dir), task)


def is_current(task: str, data_dir: str | os.PathLike) -> bool:
    """Whether ``data_dir/<task>`` holds a complete set written by this version of the generator."""
    try:
        meta = read_json(os.path.join(task_dir(task, data_dir), "meta.json"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format_version") == FORMAT_VERSION


def files(task: str, data_dir: str | os.PathLike) -> dict:
    """The paths of a generated set: ``{"train"|"valid"|"test": [json], "ans2label", "label2ans"
    (VQA/GQA, else None), "features": [TSVs], "store", "vocab", "num_boxes", "max_seq_len"}``."""
    data_dir, out = os.fspath(data_dir), task_dir(task, data_dir)
    qa = task != "nlvr2"
    return {
        **{split: [os.path.join(out, f"{split}.json")] for split in SPLITS},
        "ans2label": os.path.join(out, ANS2LABEL_NAME) if qa else None,
        "label2ans": os.path.join(out, LABEL2ANS_NAME) if qa else None,
        "features": [
            os.path.join(data_dir, pretrain_synthetic.feature_file(s)) for s in pretrain_synthetic.SPLITS
        ],
        "store": os.path.join(data_dir, STORE_NAME),
        "vocab": os.path.join(data_dir, "vocab.txt"),
        "num_boxes": NUM_BOXES,
        "max_seq_len": MAX_SEQ_LEN,
    }


def _images(pretrain_json: str) -> list[tuple[str, dict, tuple[str, str, int]]]:
    """``(img_id, datum, (object, colour, count))`` of each image of a pre-training synthetic split,
    read back from its captions ("a photo of two red dogs .", "a red dog .")."""
    out = []
    for datum in read_json(pretrain_json):
        color, name = datum["sentf"]["mscoco"][1].split()[1:3]
        count = pretrain_synthetic.COUNT_WORDS.index(datum["sentf"]["mscoco"][0].split()[3])
        out.append((datum["img_id"], datum, (name, color, count)))
    return out


def _answer_type(answer: str) -> str:
    return "yes/no" if answer in ("yes", "no") else "number" if answer.isdigit() else "other"


def _vqa_split(images, code: int, labelled: bool, rng: np.random.Generator) -> list[dict]:
    data = []
    for i, (img_id, datum, _) in enumerate(images):
        for k, (sent, raw) in enumerate(zip(datum["sentf"]["vqa"], datum["labelf"]["vqa"], strict=True)):
            label: dict[str, float] = {}
            for answer, score in raw.items():
                answer = normalize_answer(answer)
                label[answer] = min(1.0, label.get(answer, 0.0) + score)
            top = max(label, key=label.get)
            item = {
                "question_id": (code * 1_000_000 + i) * 10 + k,
                "img_id": img_id,
                "sent": sent,
                "answer_type": _answer_type(top),
                "question_type": " ".join(sent.split()[:3]),
            }
            if labelled:
                item["label"] = label
            data.append(item)
    return data


def _gqa_split(images, code: int, labelled: bool, rng: np.random.Generator) -> list[dict]:
    colors, objects = pretrain_synthetic.ATTRIBUTES, pretrain_synthetic.OBJECTS
    data = []
    for i, (img_id, _, (name, color, _count)) in enumerate(images):
        asked = str(rng.choice(colors)) if rng.random() < 0.5 else color
        pair = (color, name)
        if rng.random() < 0.5:  # half the time another colour or class than the image shows
            while pair == (color, name):
                pair = (str(rng.choice(colors)), str(rng.choice(objects)))
        questions = [
            (f"what is the color of the {name} ?", color),
            (f"is the {name} {asked} ?", "yes" if asked == color else "no"),
            (f"what is the {color} object ?", name),
            (f"is there a {pair[0]} {pair[1]} ?", "yes" if pair == (color, name) else "no"),
        ]
        for k, (sent, answer) in enumerate(questions):
            item = {"question_id": f"{code}{i:07d}{k}", "img_id": img_id, "sent": sent}
            if labelled:
                item["label"] = {answer: 1.0}
            data.append(item)
    return data


def _statement_true(kind: int, color: str, name: str, *shown: tuple[str, str, int]) -> bool:
    """ "there is a {color} {name} ." (kind 0): either image shows one; "two photos of a {name} ."
    (kind 1): both images show the class."""
    if kind == 0:
        return any((n, c) == (name, color) for n, c, _ in shown)
    return all(n == name for n, _, _ in shown)


def _nlvr2_split(images, split: str, num_sentences: int, rng: np.random.Generator) -> list[dict]:
    colors, objects = pretrain_synthetic.ATTRIBUTES, pretrain_synthetic.OBJECTS
    data = []
    for s in range(num_sentences):
        kind, color, name = int(rng.integers(2)), str(rng.choice(colors)), str(rng.choice(objects))
        sent = f"there is a {color} {name} ." if kind == 0 else f"two photos of a {name} ."
        wanted = [p % 2 == 0 for p in range(PAIRS_PER_SENTENCE)]  # balanced per sentence
        rng.shuffle(wanted)
        for p, want in enumerate(wanted):
            for _ in range(1000):
                i, j = rng.choice(len(images), 2, replace=False)
                label = _statement_true(kind, color, name, images[i][2], images[j][2])
                if label == want:
                    break
            data.append(
                {
                    "identifier": f"{split}-{s}-{p}-0",
                    "uid": f"nlvr2_{split}_{len(data)}",
                    "img0": images[i][0],
                    "img1": images[j][0],
                    "sent": sent,
                    "label": int(label),
                }
            )
    return data


def _ensure_pretrain_set(data_dir: str, num_train: int, num_valid: int, feat_dim: int, seed: int) -> None:
    if not pretrain_synthetic.is_current(data_dir):
        pretrain_synthetic.generate(data_dir, num_train, num_valid, feat_dim, seed)
    paths = files("vqa", data_dir)
    store, tsvs = paths["store"], paths["features"]
    if is_store(store) and any(store_mismatch(store, tsvs, fp16) is None for fp16 in (False, True)):
        return  # train.py's conversion of these TSVs (fp32 or --fp16_features) serves as it is
    if is_store(store):  # converted from an older set: rebuilt, as train.py does
        shutil.rmtree(store)
    convert_tsv_to_store(tsvs, store)


def generate(
    task: str,
    data_dir: str | os.PathLike,
    num_train: int = 1000,
    num_valid: int = 200,
    feat_dim: int = 256,
    seed: int = 0,
) -> dict:
    """Write the synthetic ``task`` set (module docs) and return :func:`files`. The pre-training set
    already in ``data_dir`` is reused as it is (``num_train``/``num_valid``/``feat_dim``/``seed``
    only size a new one)."""
    if task not in TASK_NAMES:
        raise ValueError(f"task: expected one of {', '.join(TASK_NAMES)}, got {task!r}")
    data_dir = os.fspath(data_dir)
    _ensure_pretrain_set(data_dir, num_train, num_valid, feat_dim, seed)
    out = task_dir(task, data_dir)
    os.makedirs(out, exist_ok=True)
    meta_path = os.path.join(out, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # an interrupted rewrite must not pass for a complete set
    rng = np.random.default_rng([seed, TASK_NAMES.index(task)])
    train = _images(os.path.join(data_dir, "train.json"))
    held_out = _images(os.path.join(data_dir, "valid.json"))
    half = len(held_out) // 2
    sources = {"train": train, "valid": held_out[:half], "test": held_out[half:]}
    splits = {}
    for code, (split, images) in enumerate(sources.items()):
        if task == "nlvr2":
            splits[split] = _nlvr2_split(images, split, len(images), rng)
        else:
            make = _vqa_split if task == "vqa" else _gqa_split
            splits[split] = make(images, code, split != "test", rng)
    paths = files(task, data_dir)
    for split, data in splits.items():
        atomic_write_text(paths[split][0], json.dumps(data))
    if task != "nlvr2":
        answers = sorted({a for split in ("train", "valid") for d in splits[split] for a in d["label"]})
        atomic_write_text(paths["label2ans"], json.dumps(answers))
        atomic_write_text(paths["ans2label"], json.dumps({a: i for i, a in enumerate(answers)}))
    counts = {split: len(data) for split, data in splits.items()}
    meta = {"format_version": FORMAT_VERSION, "task": task, "examples": counts}
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    return paths


def text_only_baseline(
    task: str, train: Sequence[QAExample | NLVR2Example], held_out: Sequence[QAExample | NLVR2Example]
) -> float:
    """Accuracy on ``held_out`` of answering from the text alone: per question string (NLVR2:
    statement) the answer with the highest summed score (the majority label) in ``train``; a
    string never seen gets the overall majority. Scored as the task's evaluator scores."""
    per_sent: dict[str, Counter] = {}
    overall: Counter = Counter()
    for e in train:
        votes = {e.label: 1.0} if task == "nlvr2" else e.label
        for answer, score in (votes or {}).items():
            per_sent.setdefault(e.sent, Counter())[answer] += score
            overall[answer] += score
    fallback = overall.most_common(1)[0][0]

    def guess(sent: str):
        return per_sent[sent].most_common(1)[0][0] if sent in per_sent else fallback

    if task == "nlvr2":
        return nlvr2_scores([(e.identifier, guess(e.sent)) for e in held_out], held_out)["accuracy"]
    return qa_scores([(e.question_id, guess(e.sent)) for e in held_out], held_out)["accuracy"]


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m lxmert_fast.finetune.synthetic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("task", choices=TASK_NAMES)
    parser.add_argument("data_dir", help="the pre-training synthetic set's directory (written if absent)")
    parser.add_argument(
        "--num_train", type=int, default=1000, help="training images of a new pre-training set"
    )
    parser.add_argument(
        "--num_valid", type=int, default=200, help="held-out images of a new pre-training set"
    )
    parser.add_argument("--feat_dim", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = generate(args.task, args.data_dir, args.num_train, args.num_valid, args.feat_dim, args.seed)
    print(
        f"wrote {task_dir(args.task, args.data_dir)}: {', '.join(os.path.basename(p[0]) for p in (paths[s] for s in SPLITS))}"
    )


if __name__ == "__main__":
    main()
