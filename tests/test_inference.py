"""lxmert_fast.Answerer: question strings, RoI features and pixel boxes in, answer strings out
(issue #17 point 4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lxmert_fast
from lxmert_fast.data.tokenization import WordPieceTokenizer
from lxmert_fast.data.tsv import read_feature_tsv

pytest.importorskip("tokenizers")

TINY = dict(hidden_size=32, num_attention_heads=2, intermediate_size=48, l_layers=1, x_layers=1, r_layers=1)


def make_export(data: Path, out: Path, cls=lxmert_fast.LxmertForPreTraining, labels: bool = False) -> Path:
    """A directory laid out as train.py's export: config.json + model.safetensors, vocab.txt and
    all_ans.json (the vqa answers: the table the QA head was sized for)."""
    from lxmert_fast.data import AnswerTable

    table = AnswerTable.load(data / "all_ans.json", dsets=["vqa"])
    vocab = (data / "vocab.txt").read_text().splitlines()
    config = lxmert_fast.LxmertConfig(
        **TINY,
        vocab_size=len(vocab),
        visual_feat_dim=24,
        num_qa_labels=len(table),
        max_position_embeddings=20,
    )
    torch.manual_seed(0)
    model = cls(config)
    if labels:
        lxmert_fast.set_answer_labels(model, table.answers)
    model.save_pretrained(out)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    entries = json.loads((data / "all_ans.json").read_text())
    (out / "all_ans.json").write_text(json.dumps([e for e in entries if "vqa" in e["dsets"]]))
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from lxmert_fast.data.synthetic import generate

    path = tmp_path_factory.mktemp("synthetic")
    generate(str(path), num_train=2, num_valid=6, feat_dim=24, seed=3)
    return path


@pytest.fixture(scope="module")
def export(data_dir, tmp_path_factory) -> Path:
    return make_export(data_dir, tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def images(data_dir) -> list[dict]:
    return list(read_feature_tsv(data_dir / "valid_obj6.tsv"))[:3]


QUESTIONS = ["what color is the dog ?", "how many cats are there ?", "what is it ?"]


def by_hand(answerer, question: str, item: dict) -> torch.Tensor:
    """What the Answerer must compute for one question: [CLS] pieces [SEP], boxes / (w, h, w, h)."""
    tok = WordPieceTokenizer(answerer.tokenizer.vocab_path)
    ids = torch.tensor([tok.encode(question, 20)])
    size = np.array([item["img_w"], item["img_h"], item["img_w"], item["img_h"]], np.float32)
    boxes = torch.from_numpy(np.clip(item["boxes"] / size, 0, 1))[None]
    with torch.no_grad():
        logits = answerer.model(
            input_ids=ids, visual_feats=torch.from_numpy(item["features"])[None], visual_pos=boxes
        ).question_answering_score
    return logits.softmax(-1)[0]


def test_answers_of_the_pretraining_head_through_the_answer_table(export, images):
    answerer = lxmert_fast.Answerer.from_pretrained(export, device="cpu")
    table = [e["ans"] for e in json.loads((export / "all_ans.json").read_text())]
    assert isinstance(answerer.model, lxmert_fast.LxmertForPreTraining) and answerer.answers == table
    feats, boxes = [i["features"] for i in images], [i["boxes"] for i in images]
    sizes = [(i["img_h"], i["img_w"]) for i in images]
    assert boxes[0].max() > 1  # pixel boxes go in
    results = answerer(QUESTIONS, feats, boxes, sizes, top_k=3)
    assert [len(r) for r in results] == [3, 3, 3]
    scores = answerer.scores_of(QUESTIONS, feats, boxes, sizes)
    for question, item, result, row in zip(QUESTIONS, images, results, scores, strict=True):
        expected = by_hand(answerer, question, item)
        assert torch.allclose(row, expected, atol=1e-6)
        best = expected.topk(3)
        assert [a for a, _ in result] == [table[i] for i in best.indices.tolist()]
        assert [s for _, s in result] == pytest.approx(best.values.tolist(), abs=1e-6)
    # Batching and padding change nothing: one question at a time, and an image cut to 4 boxes
    # next to full ones (padded, masked) scores as it does alone.
    one_by_one = lxmert_fast.Answerer(answerer.model, answerer.tokenizer, table, batch_size=1)
    assert torch.allclose(one_by_one.scores_of(QUESTIONS, feats, boxes, sizes), scores, atol=1e-6)
    cut = [feats[0][:4], *feats[1:]], [boxes[0][:4], *boxes[1:]]
    mixed = answerer.scores_of(QUESTIONS, *cut, sizes)
    alone = answerer.scores_of(QUESTIONS[:1], cut[0][:1], cut[1][:1], sizes[:1])
    assert torch.allclose(mixed[0], alone[0], atol=1e-5) and torch.allclose(mixed[1:], scores[1:], atol=1e-6)


def test_qa_model_answers_through_id2label(data_dir, tmp_path, images):
    export = make_export(data_dir, tmp_path / "qa", lxmert_fast.LxmertForQuestionAnswering, labels=True)
    (export / "all_ans.json").unlink()
    answerer = lxmert_fast.Answerer.from_pretrained(export, device="cpu")
    assert isinstance(answerer.model, lxmert_fast.LxmertForQuestionAnswering)
    assert answerer.answers == [answerer.model.config.id2label[i] for i in range(len(answerer.answers))]
    item = images[0]
    [[(text, score)]] = lxmert_fast.answer(export, QUESTIONS[:1], [item["features"]], [item["boxes"]],
                                           [(item["img_h"], item["img_w"])])  # fmt: skip
    assert text in answerer.answers and 0 < score <= 1


def test_bad_inputs_name_what_is_wrong(data_dir, tmp_path, export, images):
    plain = make_export(data_dir, tmp_path / "plain", lxmert_fast.LxmertForQuestionAnswering)
    (plain / "all_ans.json").unlink()
    with pytest.raises(ValueError, match=r"no answer names.*set_answer_labels"):
        lxmert_fast.Answerer.from_pretrained(plain, device="cpu")
    answerer = lxmert_fast.Answerer.from_pretrained(export, device="cpu")
    item = images[0]
    feats, boxes, size = [item["features"]], [item["boxes"]], [(item["img_h"], item["img_w"])]
    with pytest.raises(ValueError, match="one image per question"):
        answerer(QUESTIONS, feats, boxes, size)
    with pytest.raises(ValueError, match=r"image_sizes\[0\]: expected a positive"):
        answerer(QUESTIONS[:1], feats, boxes, [(0, 640)])
    with pytest.raises(ValueError, match=r"features\[0\]: expected a 2-D array \[boxes, 24\]"):
        answerer(QUESTIONS[:1], [item["features"][:, :5]], boxes, size)
    with pytest.raises(ValueError, match=r"boxes\[0\]: 5 boxes for 6 features"):
        answerer(QUESTIONS[:1], feats, [item["boxes"][:5]], size)
