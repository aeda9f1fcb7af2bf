"""The pre-training Dataset, the resumable sampler, object masking targets and the optimiser pieces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lxmert_testing import synthetic_corpus

from lxmert_fast import pretraining as pt
from lxmert_fast.data import (
    EpochBatchSampler,
    PretrainDataset,
    read_feature_tsv,
)
from lxmert_fast.data.synthetic import NUM_BOXES, OBJECTS, feature_file


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("syn")
    store, tok, table, examples = synthetic_corpus(path, num_train=30, num_valid=4, feat_dim=16, seed=2)
    rows = {row["img_id"]: row for row in read_feature_tsv(path / feature_file("train"))}
    return store, tok, table, examples["train"], rows


def test_item_contents(corpus):
    store, tok, _, examples, rows = corpus
    data = PretrainDataset(examples, store, tok, max_seq_len=20, num_boxes=NUM_BOXES, seed=5)
    for index in range(0, len(data), 7):
        item = data[index]
        ex = examples[index]
        row = rows[ex.img_id]
        assert item["input_ids"].shape == (20,) and item["input_ids"][0] == tok.cls_id
        length = int(item["attention_mask"].sum())
        assert (
            item["input_ids"][length - 1] == tok.sep_id and (item["input_ids"][length:] == tok.pad_id).all()
        )
        size = torch.tensor([row["img_w"], row["img_h"], row["img_w"], row["img_h"]], dtype=torch.float32)
        torch.testing.assert_close(item["visual_pos"], torch.from_numpy(row["boxes"]) / size)
        assert float(item["visual_pos"].min()) >= 0 and float(item["visual_pos"].max()) <= 1
        torch.testing.assert_close(item["visual_feats"], torch.from_numpy(row["features"]), rtol=0, atol=0)
        assert (item["obj_ids"].numpy() == row["objects_id"]).all()
        assert (item["attr_conf"].numpy() == row["attrs_conf"]).all()
        assert (item["visual_mask"] == 1).all()
        labelled = item["mlm_labels"] >= 0
        assert not labelled[0] and not labelled[length - 1 :].any()
        if item["matched_label"] == 1:
            original = tok.encode(ex.sent, 20)
            restored = torch.where(labelled, item["mlm_labels"], item["input_ids"])[:length]
            assert restored.tolist() == original
        if item["matched_label"] == 0 or not ex.label:
            assert item["qa_label"] == -1
        else:
            assert int(item["qa_label"]) in ex.label
    # Deterministic in (seed, epoch, index); another epoch draws differently.
    assert all(torch.equal(a, b) for a, b in zip(data[3].values(), data[3].values(), strict=True))
    first = [data[i]["input_ids"] for i in range(40)]
    data.set_epoch(1)
    assert any(not torch.equal(a, data[i]["input_ids"]) for i, a in enumerate(first))


def test_boxes_padded_to_num_boxes(corpus):
    store, tok, _, examples, rows = corpus
    extra = 3
    item = PretrainDataset(examples, store, tok, num_boxes=NUM_BOXES + extra, seed=5)[0]
    row = rows[examples[0].img_id]
    assert item["visual_feats"].shape == (NUM_BOXES + extra, row["features"].shape[1])
    assert item["visual_mask"].tolist() == [1.0] * NUM_BOXES + [0.0] * extra
    assert (item["visual_feats"][NUM_BOXES:] == 0).all() and (item["visual_pos"][NUM_BOXES:] == 0).all()
    assert (item["obj_ids"][NUM_BOXES:] == -1).all() and (item["attr_conf"][NUM_BOXES:] == 0).all()
    fewer = PretrainDataset(examples, store, tok, num_boxes=NUM_BOXES - 1, seed=5)[0]
    torch.testing.assert_close(fewer["visual_feats"], torch.from_numpy(row["features"][: NUM_BOXES - 1]))


def test_masking_and_mismatch_rates(corpus):
    store, tok, _, examples, _ = corpus
    data = PretrainDataset(examples, store, tok, seed=0)
    items = [data[i] for i in range(len(data))]
    words = sum(int(it["attention_mask"].sum()) - 2 for it in items)
    labelled = sum(int((it["mlm_labels"] >= 0).sum()) for it in items)
    assert 0.10 < labelled / words < 0.20
    mismatched = sum(int(it["matched_label"] == 0) for it in items) / len(items)
    assert 0.4 < mismatched < 0.6
    masked = sum(int(((it["mlm_labels"] >= 0) & (it["input_ids"] == tok.mask_id)).sum()) for it in items)
    assert 0.7 < masked / labelled < 0.9


def test_object_word_probe(corpus):
    store, tok, _, examples, _ = corpus
    nouns = {tok.vocab[w] for w in OBJECTS}
    data = PretrainDataset(
        examples, store, tok, word_mask_rate=0.0, mismatch_rate=0.0, mask_object_words=nouns
    )
    item = data[0]
    labels = item["mlm_labels"]
    assert (labels >= 0).any() and all(int(t) in nouns for t in labels[labels >= 0])
    assert (item["input_ids"][labels >= 0] == tok.mask_id).all()


def test_sampler_resumes_and_shards():
    full = list(EpochBatchSampler(50, 4, seed=3))
    sampler = EpochBatchSampler(50, 4, seed=3)
    sampler.set_epoch(0, skip=5)
    assert list(sampler) == full[5:]
    ranks = [list(EpochBatchSampler(50, 4, rank=r, world=2, seed=3)) for r in range(2)]
    flat = [i for batches in ranks for batch in batches for i in batch]
    assert len(flat) == len(set(flat)) == 48
    other = EpochBatchSampler(50, 4, seed=3)
    other.set_epoch(1)
    assert list(other) != full


@pytest.mark.parametrize("obj_loss_on", ["all", "masked"])
def test_mask_objects_targets(obj_loss_on):
    b, n, d = 4, 36, 8
    batch = {
        "visual_feats": torch.randn(b, n, d),
        "visual_mask": torch.ones(b, n),
        "obj_ids": torch.randint(0, 10, (b, n)),
        "obj_conf": torch.rand(b, n),
        "attr_ids": torch.randint(0, 5, (b, n)),
        "attr_conf": torch.rand(b, n),
    }
    feats, labels, selected = pt.mask_objects(batch, seed=7, offset=0, rate=0.15, obj_loss_on=obj_loss_on)
    assert 5 < int(selected.sum()) < 40
    assert torch.equal(feats[~selected], batch["visual_feats"][~selected])
    assert torch.equal(labels["feat"][0], batch["visual_feats"]) and torch.equal(
        labels["feat"][1], selected.float()
    )
    weight = labels["obj"][1]
    if obj_loss_on == "all":
        assert torch.equal(weight, batch["obj_conf"])
    else:
        assert torch.equal(weight, batch["obj_conf"] * selected)
    again, _, _ = pt.mask_objects(batch, seed=7, offset=0, rate=0.15, obj_loss_on=obj_loss_on)
    assert torch.equal(feats, again)


def test_bert_adam_has_no_bias_correction():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    p.grad = torch.tensor([0.5, -0.25])
    opt = pt.BertAdam([p], lr=0.1, eps=0.0, weight_decay=0.0)
    opt.step()
    # m = 0.1 g, sqrt(v) = sqrt(0.001) |g|: the first update is lr * 0.1 / sqrt(0.001) * sign(g).
    expected = torch.tensor([1.0, -2.0]) - 0.1 * (0.1 / np.sqrt(0.001)) * torch.tensor([1.0, -1.0])
    torch.testing.assert_close(p.detach(), expected)


def test_schedules():
    f = pt.linear_warmup_decay(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == 1.0 and f(55) == pytest.approx(0.5) and f(100) == 0.0
    assert pt.qa_weight("constant", 0, 10) == 1.0
    assert [pt.qa_weight("authors", s, 10) for s in (0, 4, 5, 9)] == [0.0, 0.0, 2.0, 2.0]
