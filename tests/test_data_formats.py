"""The data formats: feature TSV, memory-mapped store, answer table, tokenizer, pre-training JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
from lxmert_testing import feature_items, top_answer

from lxmert_fast.data import (
    AnswerTable,
    FeatureFileError,
    FeatureStore,
    WordPieceTokenizer,
    build_examples,
    convert_tsv_to_store,
    load_pretrain_json,
    normalize_answer,
    read_feature_tsv,
    write_feature_tsv,
)
from lxmert_fast.data.synthetic import (
    ATTRIBUTES,
    MAX_SEQ_LEN,
    NUM_BOXES,
    OBJECTS,
    feature_file,
    generate,
    is_current,
    write_answer_table,
    write_vocab,
)
from lxmert_fast.data.tsv import FIELDNAMES


def assert_items_equal(got: dict, want: dict, feature_atol: float = 0.0) -> None:
    assert set(got) == set(FIELDNAMES)
    for key in FIELDNAMES:
        if key == "features":
            np.testing.assert_allclose(got[key], want[key], rtol=0, atol=feature_atol)
        elif isinstance(want[key], np.ndarray):
            assert got[key].dtype == want[key].dtype, key
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        else:
            assert got[key] == want[key], key


def test_tsv_round_trip(tmp_path):
    items = feature_items(5)
    path = tmp_path / "feats.tsv"
    assert write_feature_tsv(path, items) == 5
    back = list(read_feature_tsv(path))
    assert len(back) == 5
    for got, want in zip(back, items, strict=True):
        assert_items_equal(got, want)


def test_tsv_huge_field(tmp_path):
    """A real row is ~400 KB, above the csv module's default 128 KB field limit."""
    items = feature_items(1, dim=20000)
    write_feature_tsv(tmp_path / "big.tsv", items)
    (got,) = read_feature_tsv(tmp_path / "big.tsv")
    assert_items_equal(got, items[0])


@pytest.mark.parametrize("cut", ["mid_features", "mid_boxes", "after_id"])
def test_truncated_row_names_file_and_line(tmp_path, cut):
    path = tmp_path / "feats.tsv"
    write_feature_tsv(path, feature_items(3))
    lines = path.read_text().splitlines(keepends=True)
    row = lines[1]
    fields = row.split("\t")
    if cut == "mid_features":
        row = row[: len(row) - len(fields[-1]) // 2]
    elif cut == "mid_boxes":
        row = "\t".join(fields[:8]) + "\t" + fields[8][: len(fields[8]) // 2] + "\n"
    else:
        row = fields[0] + "\n"
    path.write_text(lines[0] + row + lines[2])
    with pytest.raises(FeatureFileError, match=r"feats\.tsv:2: "):
        list(read_feature_tsv(path))


def test_corrupted_base64_names_field(tmp_path):
    path = tmp_path / "feats.tsv"
    write_feature_tsv(path, feature_items(2))
    lines = path.read_text().splitlines(keepends=True)
    fields = lines[1].split("\t")
    fields[4] = "!!" + fields[4][2:]
    path.write_text(lines[0] + "\t".join(fields))
    with pytest.raises(FeatureFileError, match=r"feats\.tsv:2: field 'objects_conf'"):
        list(read_feature_tsv(path))


@pytest.mark.parametrize("fp16", [False, True])
def test_store_round_trips_every_field(tmp_path, fp16):
    items = feature_items(7)
    write_feature_tsv(tmp_path / "a.tsv", items[:4])
    write_feature_tsv(tmp_path / "b.tsv", items[4:])
    index = convert_tsv_to_store([tmp_path / "a.tsv", tmp_path / "b.tsv"], tmp_path / "store", fp16=fp16)
    assert index["feature_dtype"] == ("float16" if fp16 else "float32")
    assert index["num_boxes_total"] == sum(item["num_boxes"] for item in items)
    store = FeatureStore(tmp_path / "store")
    assert len(store) == 7 and store.feature_dim == 7
    for want in items:
        got = store[want["img_id"]]
        assert got["features"].dtype == np.float32
        assert_items_equal(got, want, feature_atol=1e-2 if fp16 else 0.0)
    with pytest.raises(KeyError, match="not in the feature store"):
        store["missing"]


def test_store_rejects_duplicate_image(tmp_path):
    items = feature_items(2)
    write_feature_tsv(tmp_path / "a.tsv", items)
    with pytest.raises(ValueError, match="duplicate img_id"):
        convert_tsv_to_store([tmp_path / "a.tsv", tmp_path / "a.tsv"], tmp_path / "store")


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("Yes", "yes"),
        ("two", "2"),
        ("Red.", "red"),
        ("the man", "man"),
        ("A woman", "woman"),
        ("an apple", "apple"),
        ("grey", "gray"),
        ("the grey.", "gray"),
        ("", ""),
        ("tennis racket", "tennis racket"),
    ],
)
def test_answer_normalisation(raw, want):
    assert normalize_answer(raw) == want


def test_answer_table_authors_format(tmp_path):
    path = tmp_path / "all_ans.json"
    path.write_text(json.dumps([{"ans": "yes", "dsets": ["vqa", "gqa"]}, {"ans": "2", "dsets": ["vqa"]},
                                {"ans": "left", "dsets": ["gqa"]}]))  # fmt: skip
    table = AnswerTable.load(path)
    assert len(table) == 3 and table.ans2id("left") == 2
    vqa = AnswerTable.load(path, dsets=["vqa"])
    assert vqa.answers == ["yes", "2"]
    assert vqa.convert_label({"Two": 0.6, "2.": 0.3, "Yes": 1.0, "left": 1.0}) == {
        1: pytest.approx(0.9),
        0: 1.0,
    }


def test_tokenizer_keeps_real_words(tmp_path):
    write_vocab(str(tmp_path / "vocab.txt"))
    tok = WordPieceTokenizer(tmp_path / "vocab.txt")
    assert tok.tokenize("A Red dog and two Cars?") == ["a", "red", "dog", "and", "two", "car", "##s", "?"]
    assert tok.tokenize("zebra") == ["[UNK]"]
    ids = tok.encode("what color is the dog ?", max_len=5)
    assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id and len(ids) == 5
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["what", "color", "is"]


def test_pretrain_json_and_examples(tmp_path):
    write_answer_table(str(tmp_path / "all_ans.json"))
    data = [
        {"img_id": "x", "sentf": {"mscoco": ["a red dog ."], "vqa": ["what color ?", "how many ?"]},
         "labelf": {"vqa": [{"Red.": 1.0}, {"zebra": 1.0}]}},
    ]  # fmt: skip
    (tmp_path / "p.json").write_text(json.dumps(data))
    table = AnswerTable.load(tmp_path / "all_ans.json", dsets=["vqa"])
    examples = build_examples(load_pretrain_json(tmp_path / "p.json"), table)
    assert [e.sent for e in examples] == ["a red dog .", "what color ?", "how many ?"]
    assert examples[0].label is None
    assert examples[1].label == {table.ans2id("red"): 1.0}
    assert examples[2].label == {}  # answer outside the table: the sentence stays, QA label -1
    assert build_examples(data, table, image_ids=["y"]) == []
    bad = [{"img_id": "x", "sentf": {"vqa": ["a", "b"]}, "labelf": {"vqa": [{}]}}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="labelf"):
        load_pretrain_json(tmp_path / "bad.json")


def test_synthetic_files_in_real_formats(tmp_path):
    meta = generate(str(tmp_path), num_train=6, num_valid=2, feat_dim=16, seed=3)
    assert meta["feat_dim"] == 16
    assert meta["num_boxes"] == NUM_BOXES and meta["feature_files"]["train"] == feature_file("train")
    rows = list(read_feature_tsv(tmp_path / feature_file("train")))
    assert len(rows) == 6 and rows[0]["features"].shape == (NUM_BOXES, 16)
    assert (rows[0]["boxes"][:, 2] <= rows[0]["img_w"]).all() and (
        rows[0]["boxes"][:, 3] <= rows[0]["img_h"]
    ).all()
    data = load_pretrain_json(tmp_path / "train.json")
    tok = WordPieceTokenizer(tmp_path / "vocab.txt")
    for datum in data:
        for sents in datum["sentf"].values():
            for sent in sents:
                assert "[UNK]" not in tok.tokenize(sent), sent
                assert len(tok.tokenize(sent)) + 2 <= MAX_SEQ_LEN, sent


def test_synthetic_sentences_describe_their_image(tmp_path):
    generate(str(tmp_path), num_train=40, num_valid=2, feat_dim=8, seed=4)
    rows = {row["img_id"]: row for row in read_feature_tsv(tmp_path / feature_file("train"))}
    table = AnswerTable.load(tmp_path / "all_ans.json", dsets=["vqa"])
    for datum in load_pretrain_json(tmp_path / "train.json"):
        row = rows[datum["img_id"]]
        shown = row["objects_id"] < len(OBJECTS)
        (cls,) = set(row["objects_id"][shown].tolist())
        (attr,) = set(row["attrs_id"][shown].tolist())
        name, color, count = OBJECTS[cls], ATTRIBUTES[attr], int(shown.sum())
        assert 1 <= count < NUM_BOXES and (row["attrs_id"][~shown] >= len(ATTRIBUTES)).all()
        for caption in datum["sentf"]["mscoco"] + datum["sentf"]["vg"]:
            assert name in caption and color in caption, (caption, name, color)
        answers = {}
        for question, label in zip(datum["sentf"]["vqa"], datum["labelf"]["vqa"], strict=True):
            answers[question.split()[0] + " " + question.split()[1]] = table.id2ans(top_answer(table, label))
        assert answers["what color"] == color and answers["how many"] == str(count)
        assert answers["what is"] == name and answers["is there"] in ("yes", "no")
    # Images differ in class, colour and count: matching cannot be solved from the text alone.
    classes = {int(r["objects_id"][r["objects_id"] < len(OBJECTS)][0]) for r in rows.values()}
    assert len(classes) == len(OBJECTS)


def test_synthetic_format_version(tmp_path):
    assert not is_current(str(tmp_path))
    generate(str(tmp_path), num_train=2, num_valid=1, feat_dim=4, seed=0)
    assert is_current(str(tmp_path))
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["format_version"] = 1  # a set written by an older generator (36 boxes, other file names)
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert not is_current(str(tmp_path))


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (
            lambda item: item.update(img_h=0, img_w=0),
            "expected a positive image size .* got img_h=0, img_w=0",
        ),
        (lambda item: item["boxes"].__setitem__((1, 2), np.nan), "field 'boxes' has 1 non-finite values"),
        (
            lambda item: item["features"].__setitem__((0, 0), np.inf),
            "field 'features' has 1 non-finite values",
        ),
    ],
    ids=["zero_size", "nan_box", "inf_feature"],
)
def test_tsv_rows_that_would_train_nan_name_file_and_line(tmp_path, corrupt, message):
    items = feature_items(3)
    corrupt(items[1])
    write_feature_tsv(tmp_path / "feats.tsv", items)
    with pytest.raises(
        FeatureFileError, match=rf"feats\.tsv:2: image 'COCO_val2014_000000000001': {message}"
    ):
        list(read_feature_tsv(tmp_path / "feats.tsv"))


def test_dataset_rejects_a_store_image_of_zero_size(tmp_path):
    # A store converted before the TSV check (or edited by hand): the dataset checks each image on
    # the host, because train.py runs the model without its value checks.
    from lxmert_fast.data import Example, PretrainDataset

    write_feature_tsv(tmp_path / "a.tsv", feature_items(2))
    convert_tsv_to_store([tmp_path / "a.tsv"], tmp_path / "store")
    index = json.loads((tmp_path / "store" / "index.json").read_text())
    index["images"]["COCO_val2014_000000000001"][2:] = [0, 0]
    (tmp_path / "store" / "index.json").write_text(json.dumps(index))
    write_vocab(str(tmp_path / "vocab.txt"))
    examples = [Example(f"u{i}", f"COCO_val2014_{i:012d}", "a red dog", "mscoco", None) for i in range(2)]
    dataset = PretrainDataset(
        examples, FeatureStore(tmp_path / "store"), WordPieceTokenizer(tmp_path / "vocab.txt")
    )
    assert dataset[0]["visual_pos"].isfinite().all()
    with pytest.raises(
        ValueError, match=r"image 'COCO_val2014_000000000001' in .*store: expected a positive image size"
    ):
        dataset[1]


def test_pretrain_json_sentf_string_names_file_datum_and_key(tmp_path):
    data = [
        {"img_id": "a", "sentf": {"mscoco": ["a dog ."]}},
        {"img_id": "b", "sentf": {"mscoco": "a dog ."}},
    ]
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(
        ValueError,
        match=r"p\.json: datum 1 \(b\): sentf\['mscoco'\] expected a list of sentence strings, got str",
    ):
        load_pretrain_json(tmp_path / "p.json")
    with pytest.raises(ValueError, match=r"datum 1 \(b\): sentf\['mscoco'\] expected a list"):
        build_examples(data, None)


@pytest.mark.parametrize(
    "content", ["", '[{"img_id": "a", "sentf": {"mscoco": ["a'], ids=["empty", "truncated"]
)
def test_empty_or_truncated_json_names_the_file(tmp_path, content):
    for name in ("p.json", "all_ans.json"):
        (tmp_path / name).write_text(content)
    what = "empty file" if not content else "line 1 column"
    with pytest.raises(ValueError, match=rf"p\.json: not valid JSON \({what}"):
        load_pretrain_json(tmp_path / "p.json")
    with pytest.raises(ValueError, match=rf"all_ans\.json: not valid JSON \({what}"):
        AnswerTable.load(tmp_path / "all_ans.json")


def test_empty_vocab_names_the_file(tmp_path):
    (tmp_path / "vocab.txt").write_text("")
    with pytest.raises(ValueError, match=r"vocab\.txt: special tokens .* missing .*the file is empty"):
        WordPieceTokenizer(tmp_path / "vocab.txt")


@pytest.mark.parametrize("damage", ["empty_index", "short_features"])
def test_damaged_store_names_the_file(tmp_path, damage):
    write_feature_tsv(tmp_path / "a.tsv", feature_items(3))
    convert_tsv_to_store([tmp_path / "a.tsv"], tmp_path / "store")
    if damage == "empty_index":
        (tmp_path / "store" / "index.json").write_text("")
        with pytest.raises(ValueError, match=r"index\.json: not valid JSON \(empty file"):
            FeatureStore(tmp_path / "store")
        return
    features = tmp_path / "store" / "features.bin"
    features.write_bytes(features.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"features\.bin: 100 bytes, expected \d+ bytes .* truncated"):
        FeatureStore(tmp_path / "store")["COCO_val2014_000000000000"]
