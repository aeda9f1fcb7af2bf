"""Pre-training and QA losses: the authors' conventions and weighting."""

import pytest
import torch
import torch.nn.functional as F
from lxmert_testing import SMALL, make_batch

from lxmert_fast import LxmertConfig, LxmertForPreTraining, LxmertForQuestionAnswering
from lxmert_fast.modeling import masked_cross_entropy


def test_masked_cross_entropy_accepts_both_ignore_conventions_and_never_nans():
    logits = torch.randn(6, 5)
    labels = torch.tensor([1, -1, 3, -100, 0, -1])
    expected = F.cross_entropy(logits, labels.masked_fill(labels < 0, -100))
    assert torch.allclose(masked_cross_entropy(logits, labels), expected)
    none = masked_cross_entropy(logits, torch.full((6,), -1))
    assert none.item() == 0.0


def test_per_task_losses_follow_the_authors_formulas():
    torch.manual_seed(0)
    config = LxmertConfig(**SMALL, visual_loss_normalizer=1 / 0.15)
    model = LxmertForPreTraining(config).eval()
    batch = make_batch(config, 2, 7, 6, True, False)
    obj = (torch.randint(0, 11, (2, 6)), torch.rand(2, 6))
    attr = (torch.randint(0, 7, (2, 6)), torch.rand(2, 6))
    feat = (torch.randn(2, 6, 40), (torch.rand(2, 6) < 0.5).float())
    labels = torch.full((2, 7), -1)
    labels[0, 2], labels[1, 4] = 5, 9
    ans = torch.tensor([3, -1])  # the unmatched pair carries no QA label
    with torch.no_grad():
        out = model(
            **batch,
            labels=labels,
            obj_labels={"obj": obj, "attr": attr, "feat": feat},
            matched_label=torch.tensor([1, 0]),
            ans=ans,
        )
        base = model.lxmert(**batch)
        visual = model.obj_predict_head(base.vision_output)
    w = 1 / 0.15
    expected_obj = (
        F.cross_entropy(visual["obj"].reshape(-1, 11), obj[0].reshape(-1), reduction="none")
        * obj[1].reshape(-1)
    ).mean() * w
    feat_loss = F.smooth_l1_loss(visual["feat"], feat[0], reduction="none").mean(-1)
    expected_feat = (feat_loss * feat[1]).mean() * w
    expected_qa = F.cross_entropy(out.question_answering_score[:1], ans[:1])
    expected_mlm = F.cross_entropy(out.prediction_logits[[0, 1], [2, 4]], torch.tensor([5, 9]))
    assert torch.allclose(out.losses["obj"], expected_obj, atol=1e-6)
    assert torch.allclose(out.losses["feat"], expected_feat, atol=1e-6)
    assert torch.allclose(out.losses["qa"], expected_qa, atol=1e-6)
    assert torch.allclose(out.losses["mlm"], expected_mlm, atol=1e-6)
    assert torch.allclose(out.loss, sum(out.losses.values()))
    assert out.to_tuple()[0] is out.loss and len(out.to_tuple()) == 4  # losses dict is not in the tuple


def test_no_labels_no_loss():
    model = LxmertForPreTraining(LxmertConfig(**SMALL)).eval()
    out = model(**make_batch(model.config, 1, 4, 3, False, False))
    assert out.loss is None and out.losses is None


def test_qa_soft_scores_use_the_authors_bce():
    model = LxmertForQuestionAnswering(LxmertConfig(**SMALL)).eval()
    batch = make_batch(model.config, 3, 5, 4, True, False)
    target = torch.zeros(3, 13)
    target[0, 2], target[1, 5], target[1, 6], target[2, 0] = 1.0, 0.6, 0.3, 0.9
    out = model(**batch, labels=target)
    expected = F.binary_cross_entropy_with_logits(out.question_answering_score, target) * 13
    assert torch.allclose(out.loss, expected)
    hard = model(**batch, labels=torch.tensor([2, 5, -1]))
    assert torch.allclose(hard.loss, F.cross_entropy(hard.question_answering_score[:2], torch.tensor([2, 5])))
    with pytest.raises(ValueError, match="labels: expected shape"):
        model(**batch, labels=torch.zeros(3, 12))
    with pytest.raises(ValueError, match="labels: expected 3 answer ids"):
        model(**batch, labels=torch.tensor([1, 2]))


def test_training_step_reduces_the_loss():
    torch.manual_seed(0)
    model = LxmertForPreTraining(LxmertConfig(**SMALL)).train()
    batch = make_batch(model.config, 4, 8, 6, True, False)
    labels = {"matched_label": torch.tensor([1, 0, 1, 0]), "ans": torch.tensor([1, 2, -1, 3])}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(15):
        loss = model(**batch, **labels).loss
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first * 0.5
