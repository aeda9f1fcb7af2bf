"""``python -m lxmert_fast.data.synthetic OUT_DIR``: a small learnable pre-training set in the real formats.

Writes ``train_obj36.tsv``/``valid_obj36.tsv`` (feature TSV), ``train.json``/``valid.json``
(pre-training JSON with mscoco/vg captions and vqa questions + ``labelf``), ``vocab.txt``
(WordPiece; plurals are ``word ##s``), ``all_ans.json`` (answer table, authors' format),
``object_words.txt`` (the nouns, for the masked-object-word probe) and ``meta.json``.

Structure that only the image resolves: each image holds 2–4 "salient" objects (class +
colour attribute, 1–2 instances each) and clutter boxes of other classes. An RoI feature is
``class prototype + 0.7 * attribute prototype + 0.5 * noise``. Captions name salient objects
with their colours ("a red dog and a blue car ."), questions ask for a colour, a count, a
presence or a class ("what color is the dog ?" → red), so matching, masked object words,
object/attribute prediction and QA all need the image.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from lxmert_fast.data.tsv import write_feature_tsv

OBJECTS = ("dog", "cat", "car", "tree", "horse", "bus", "table", "chair", "bird", "boat", "cup", "kite")
CLUTTER = ("wall", "sky", "floor", "window", "road", "grass")
ATTRIBUTES = ("red", "blue", "green", "yellow", "white", "black", "brown", "orange")
COUNT_WORDS = ("zero", "one", "two", "three")
FUNCTION_WORDS = (
    "a", "an", "the", "and", "is", "are", "there", "what", "color", "how", "many", "object",
    "with", "next", "to", "photo", "of", "yes", "no", "0", "1", "2", "3", "?", ".", ",",
)  # fmt: skip
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
NUM_BOXES = 36
FILES = ("train_obj36.tsv", "valid_obj36.tsv", "train.json", "valid.json", "vocab.txt", "all_ans.json")


def _plural(word: str, n: int) -> str:
    return word if n == 1 else word + "s"


def _image(rng: np.random.Generator, img_id: str, protos: dict, feat_dim: int) -> tuple[dict, dict]:
    num_salient = int(rng.integers(2, 5))
    classes = rng.choice(len(OBJECTS), num_salient, replace=False)
    attrs = rng.choice(len(ATTRIBUTES), num_salient, replace=True)
    counts = rng.integers(1, 3, num_salient)
    obj_ids, attr_ids = [], []
    for c, a, k in zip(classes, attrs, counts, strict=True):
        obj_ids += [int(c)] * int(k)
        attr_ids += [int(a)] * int(k)
    num_salient_boxes = len(obj_ids)
    while len(obj_ids) < NUM_BOXES:
        obj_ids.append(len(OBJECTS) + int(rng.integers(len(CLUTTER))))
        attr_ids.append(int(rng.integers(len(ATTRIBUTES))))
    order = rng.permutation(NUM_BOXES)
    obj = np.asarray(obj_ids, np.int64)[order]
    attr = np.asarray(attr_ids, np.int64)[order]
    conf_obj = np.where(
        order < num_salient_boxes, rng.uniform(0.6, 1.0, NUM_BOXES), rng.uniform(0.3, 0.9, NUM_BOXES)
    )
    feats = protos["obj"][obj] + 0.7 * protos["attr"][attr] + 0.5 * rng.standard_normal((NUM_BOXES, feat_dim))
    h, w = int(rng.integers(300, 481)), int(rng.integers(400, 641))
    xy = rng.uniform(0, 0.7, (NUM_BOXES, 2)) * [w, h]
    wh = rng.uniform(0.1, 0.3, (NUM_BOXES, 2)) * [w, h]
    boxes = np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1)
    item = {
        "img_id": img_id,
        "img_h": h,
        "img_w": w,
        "objects_id": obj,
        "objects_conf": conf_obj.astype(np.float32),
        "attrs_id": attr,
        "attrs_conf": rng.uniform(0.4, 1.0, NUM_BOXES).astype(np.float32),
        "num_boxes": NUM_BOXES,
        "boxes": boxes.astype(np.float32),
        "features": feats.astype(np.float32),
    }
    present = {OBJECTS[c]: (ATTRIBUTES[a], int(k)) for c, a, k in zip(classes, attrs, counts, strict=True)}
    return item, present


def _sentences(rng: np.random.Generator, present: dict) -> tuple[list[str], list[str], list[str], list[dict]]:
    names = list(present)
    first, second = rng.choice(names, 2, replace=False)
    captions = [
        f"a {present[first][0]} {first} and a {present[second][0]} {second} .",
        f"a photo of {present[first][1]} {present[first][0]} {_plural(first, present[first][1])} .",
    ]
    vg = [f"the {second} is {present[second][0]} ."]
    absent = [o for o in OBJECTS if o not in present]
    target = str(rng.choice(names))
    other = str(rng.choice(absent))
    color, count = present[target]
    questions = [f"what color is the {target} ?", f"how many {target}s are there ?"]
    # Raw answers as annotators write them; normalisation maps them onto the table.
    labels = [
        {color: 1.0} if rng.random() < 0.7 else {color.capitalize() + ".": 0.9, "the " + color: 0.3},
        {COUNT_WORDS[count]: 1.0} if rng.random() < 0.5 else {str(count): 1.0},
    ]
    if rng.random() < 0.5:
        questions.append(f"is there a {target} ?")
        labels.append({"yes": 1.0})
    else:
        questions.append(f"is there a {other} ?")
        labels.append({"no": 1.0})
    questions.append(f"what is the {color} object ?")
    holders = [n for n in names if present[n][0] == color]
    labels.append({n: 1.0 / len(holders) for n in holders})
    return captions, vg, questions, labels


def write_vocab(path: str) -> list[str]:
    words = [*SPECIAL, *FUNCTION_WORDS, *OBJECTS, *CLUTTER, *ATTRIBUTES, *COUNT_WORDS, "##s"]
    words = list(dict.fromkeys(words))
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(words) + "\n")
    return words


def write_answer_table(path: str) -> list[dict]:
    entries = [{"ans": a, "dsets": ["vqa"]} for a in (*ATTRIBUTES, "0", "1", "2", "3", "yes", "no", *OBJECTS)]
    # An answer of another dataset, so filtering the table by dataset is exercised.
    entries.append({"ans": "left", "dsets": ["gqa"]})
    with open(path, "w") as f:
        json.dump(entries, f, indent=0)
    return entries


def generate(
    out_dir: str, num_train: int = 1000, num_valid: int = 200, feat_dim: int = 256, seed: int = 0
) -> dict:
    """Write the synthetic set into ``out_dir``; returns ``meta.json``'s content."""
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    protos = {
        "obj": rng.standard_normal((len(OBJECTS) + len(CLUTTER), feat_dim)),
        "attr": rng.standard_normal((len(ATTRIBUTES), feat_dim)),
    }
    for split, count in (("train", num_train), ("valid", num_valid)):
        items, data = [], []
        for i in range(count):
            img_id = f"syn_{split}_{i:06d}"
            item, present = _image(rng, img_id, protos, feat_dim)
            captions, vg, questions, labels = _sentences(rng, present)
            items.append(item)
            data.append(
                {
                    "img_id": img_id,
                    "sentf": {"mscoco": captions, "vg": vg, "vqa": questions},
                    "labelf": {"vqa": labels},
                }
            )
        write_feature_tsv(os.path.join(out_dir, f"{split}_obj36.tsv"), items)
        with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
            json.dump(data, f)
    write_vocab(os.path.join(out_dir, "vocab.txt"))
    write_answer_table(os.path.join(out_dir, "all_ans.json"))
    with open(os.path.join(out_dir, "object_words.txt"), "w") as f:
        f.write("\n".join(OBJECTS) + "\n")
    meta = {
        "num_train": num_train,
        "num_valid": num_valid,
        "feat_dim": feat_dim,
        "seed": seed,
        "objects": list(OBJECTS) + list(CLUTTER),
        "attributes": list(ATTRIBUTES),
    }
    # meta.json is written last: its presence marks a complete dataset.
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir")
    parser.add_argument("--num_train", type=int, default=1000, help="training images (5 sentences each)")
    parser.add_argument("--num_valid", type=int, default=200, help="held-out images")
    parser.add_argument("--feat_dim", type=int, default=256, help="RoI feature width (real data: 2048)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    generate(args.out_dir, args.num_train, args.num_valid, args.feat_dim, args.seed)
    print(f"wrote {args.out_dir}: {args.num_train} train / {args.num_valid} valid images")


if __name__ == "__main__":
    main()
