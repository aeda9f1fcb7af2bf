"""``python -m lxmert_fast.data.synthetic OUT_DIR``: a small learnable pre-training set in the real formats.

Writes ``train_obj6.tsv``/``valid_obj6.tsv`` (feature TSV, 6 boxes per image), ``train.json``/
``valid.json`` (pre-training JSON with mscoco/vg captions and vqa questions + ``labelf``),
``vocab.txt`` (WordPiece; plurals are ``word ##s``), ``all_ans.json`` (answer table, authors'
format), ``object_words.txt`` (the nouns, for the masked-object-word probe) and ``meta.json``
(written last; it records the format version and the box count).

Structure that only the image resolves: each image shows one object class in one colour
(1-3 instances) among background boxes ("wall", "sky", ... in "dark"/"bright"). An RoI feature
is ``class prototype + 0.7 * attribute prototype + 0.5 * noise``. Captions name the object, its
colour and count ("two red dogs ."); questions ask for the colour, the count, the presence of a
class and the class of the coloured object. Masked object words, object/attribute prediction
and QA therefore need the image, and a caption of another image is told apart only by comparing
it with this one (matching).

It is deliberately easier than real data: one object per image keeps the grounding first-order
so that the small CPU model learns it within the default run (about 3 minutes); several objects
per image (colour-to-object binding) took far longer than that in our runs.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from lxmert_fast.atomic import atomic_write_text
from lxmert_fast.data.tsv import write_feature_tsv

OBJECTS = ("dog", "car", "tree", "cup")
BACKGROUND = ("wall", "sky", "floor", "grass")
ATTRIBUTES = ("red", "blue", "green")
BACKGROUND_ATTRIBUTES = ("dark", "bright")
COUNT_WORDS = ("zero", "one", "two", "three")
FUNCTION_WORDS = (
    "a", "an", "the", "and", "is", "are", "there", "what", "color", "how", "many", "object",
    "with", "next", "to", "photo", "of", "in", "yes", "no", "0", "1", "2", "3", "?", ".", ",",
)  # fmt: skip
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
NUM_BOXES = 6
# The longest sentence, "[CLS] a photo of three green tree ##s . [SEP]", has 10 pieces.
MAX_SEQ_LEN = 12
MAX_INSTANCES = 3
FORMAT_VERSION = 2
SPLITS = ("train", "valid")


def feature_file(split: str) -> str:
    """The feature TSV of ``split``, named like the authors' files (``*_obj36.tsv`` holds 36 boxes)."""
    return f"{split}_obj{NUM_BOXES}.tsv"


def _plural(word: str, n: int) -> str:
    return word if n == 1 else word + "s"


def _image(
    rng: np.random.Generator, img_id: str, protos: dict, feat_dim: int
) -> tuple[dict, tuple[str, str, int]]:
    cls = int(rng.integers(len(OBJECTS)))
    attr = int(rng.integers(len(ATTRIBUTES)))
    count = int(rng.integers(1, MAX_INSTANCES + 1))
    background = NUM_BOXES - count
    # Label ids: objects then background classes; colours then background attributes.
    obj = np.array([cls] * count + list(len(OBJECTS) + rng.integers(len(BACKGROUND), size=background)))
    attrs = np.array(
        [attr] * count + list(len(ATTRIBUTES) + rng.integers(len(BACKGROUND_ATTRIBUTES), size=background))
    )
    order = rng.permutation(NUM_BOXES)
    obj, attrs, is_object = obj[order], attrs[order], order < count
    noise = rng.standard_normal((NUM_BOXES, feat_dim))
    feats = protos["obj"][obj] + 0.7 * protos["attr"][attrs] + 0.5 * noise
    h, w = int(rng.integers(300, 481)), int(rng.integers(400, 641))
    xy = rng.uniform(0, 0.7, (NUM_BOXES, 2)) * [w, h]
    wh = rng.uniform(0.1, 0.3, (NUM_BOXES, 2)) * [w, h]
    boxes = np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1)
    item = {
        "img_id": img_id,
        "img_h": h,
        "img_w": w,
        "objects_id": obj.astype(np.int64),
        "objects_conf": np.where(
            is_object, rng.uniform(0.6, 1.0, NUM_BOXES), rng.uniform(0.3, 0.9, NUM_BOXES)
        ).astype(np.float32),
        "attrs_id": attrs.astype(np.int64),
        "attrs_conf": rng.uniform(0.4, 1.0, NUM_BOXES).astype(np.float32),
        "num_boxes": NUM_BOXES,
        "boxes": boxes.astype(np.float32),
        "features": feats.astype(np.float32),
    }
    return item, (OBJECTS[cls], ATTRIBUTES[attr], count)


def _sentences(
    rng: np.random.Generator, shown: tuple[str, str, int]
) -> tuple[list[str], list[str], list[str], list[dict]]:
    name, color, count = shown
    plural = _plural(name, count)
    captions = [f"a photo of {COUNT_WORDS[count]} {color} {plural} .", f"a {color} {name} ."]
    vg = [f"the {name} is {color} ."]
    questions = [f"what color is the {name} ?", f"how many {plural} are there ?"]
    # Raw answers as annotators write them; normalisation maps them onto the table.
    labels = [
        {color: 1.0} if rng.random() < 0.7 else {color.capitalize() + ".": 0.9, "the " + color: 0.3},
        {COUNT_WORDS[count]: 1.0} if rng.random() < 0.5 else {str(count): 1.0},
    ]
    if rng.random() < 0.5:
        questions.append(f"is there a {name} ?")
        labels.append({"yes": 1.0})
    else:
        other = str(rng.choice([o for o in OBJECTS if o != name]))
        questions.append(f"is there a {other} ?")
        labels.append({"no": 1.0})
    questions.append(f"what is the {color} object ?")
    labels.append({name: 1.0})
    return captions, vg, questions, labels


def write_vocab(path: str) -> list[str]:
    words = [
        *SPECIAL,
        *FUNCTION_WORDS,
        *OBJECTS,
        *BACKGROUND,
        *ATTRIBUTES,
        *BACKGROUND_ATTRIBUTES,
        *COUNT_WORDS,
        "##s",
    ]
    words = list(dict.fromkeys(words))
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(words) + "\n")
    return words


def write_answer_table(path: str) -> list[dict]:
    entries = [{"ans": a, "dsets": ["vqa"]} for a in (*ATTRIBUTES, "1", "2", "3", "yes", "no", *OBJECTS)]
    # An answer of another dataset, so filtering the table by dataset is exercised.
    entries.append({"ans": "left", "dsets": ["gqa"]})
    with open(path, "w") as f:
        json.dump(entries, f, indent=0)
    return entries


def is_current(out_dir: str) -> bool:
    """Whether ``out_dir`` holds a complete set written by this version of the generator."""
    try:
        with open(os.path.join(out_dir, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return meta.get("format_version") == FORMAT_VERSION


def generate(
    out_dir: str, num_train: int = 1000, num_valid: int = 200, feat_dim: int = 256, seed: int = 0
) -> dict:
    """Write the synthetic set into ``out_dir``; returns ``meta.json``'s content."""
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # an interrupted rewrite must not pass for a complete set
    rng = np.random.default_rng(seed)
    protos = {
        "obj": rng.standard_normal((len(OBJECTS) + len(BACKGROUND), feat_dim)),
        "attr": rng.standard_normal((len(ATTRIBUTES) + len(BACKGROUND_ATTRIBUTES), feat_dim)),
    }
    for split, count in zip(SPLITS, (num_train, num_valid), strict=True):
        items, data = [], []
        for i in range(count):
            img_id = f"syn_{split}_{i:06d}"
            item, shown = _image(rng, img_id, protos, feat_dim)
            captions, vg, questions, labels = _sentences(rng, shown)
            items.append(item)
            data.append(
                {
                    "img_id": img_id,
                    "sentf": {"mscoco": captions, "vg": vg, "vqa": questions},
                    "labelf": {"vqa": labels},
                }
            )
        write_feature_tsv(os.path.join(out_dir, feature_file(split)), items)
        with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
            json.dump(data, f)
    write_vocab(os.path.join(out_dir, "vocab.txt"))
    write_answer_table(os.path.join(out_dir, "all_ans.json"))
    with open(os.path.join(out_dir, "object_words.txt"), "w") as f:
        f.write("\n".join(OBJECTS) + "\n")
    meta = {
        "format_version": FORMAT_VERSION,
        "num_train": num_train,
        "num_valid": num_valid,
        "feat_dim": feat_dim,
        "num_boxes": NUM_BOXES,
        "seed": seed,
        "feature_files": {split: feature_file(split) for split in SPLITS},
        "objects": list(OBJECTS) + list(BACKGROUND),
        "attributes": list(ATTRIBUTES) + list(BACKGROUND_ATTRIBUTES),
    }
    # meta.json is written last, atomically: its presence marks a complete dataset.
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir")
    parser.add_argument("--num_train", type=int, default=1000, help="training images (7 sentences each)")
    parser.add_argument("--num_valid", type=int, default=200, help="held-out images")
    parser.add_argument("--feat_dim", type=int, default=256, help="RoI feature width (real data: 2048)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    generate(args.out_dir, args.num_train, args.num_valid, args.feat_dim, args.seed)
    print(f"wrote {args.out_dir}: {args.num_train} train / {args.num_valid} valid images")


if __name__ == "__main__":
    main()
