"""Our models where users touch them behave like transformers' (issue #17 point 3): from_pretrained's
arguments, answer labels in config.json, .device/.dtype, gradient checkpointing, resize_num_qa_labels,
and the messages for Hub names and heads that do not fit."""

from __future__ import annotations

import pytest
import torch
from lxmert_testing import SMALL, make_batch

import lxmert_fast
from lxmert_fast import CheckpointError, LxmertConfig, LxmertForPreTraining, LxmertForQuestionAnswering

ANSWERS = [f"answer {i}" for i in range(SMALL["num_qa_labels"])]


@pytest.fixture(scope="module")
def pretrain_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = LxmertForPreTraining(LxmertConfig(**SMALL))
    lxmert_fast.set_answer_labels(model, ANSWERS)
    path = tmp_path_factory.mktemp("pretrain")
    model.save_pretrained(path)
    return path


def test_from_pretrained_dtype_device_and_overrides(pretrain_dir):
    model = LxmertForPreTraining.from_pretrained(pretrain_dir, torch_dtype=torch.float64)
    assert model.dtype == torch.float64 and model.device == torch.device("cpu")
    assert LxmertForPreTraining.from_pretrained(pretrain_dir, dtype=torch.bfloat16).dtype == torch.bfloat16
    config = LxmertConfig.from_pretrained(pretrain_dir)
    config.hidden_dropout_prob = 0.0
    assert LxmertForPreTraining.from_pretrained(pretrain_dir, config).config.hidden_dropout_prob == 0.0
    assert (
        LxmertForPreTraining.from_pretrained(pretrain_dir, hidden_dropout_prob=0.3).config.hidden_dropout_prob
        == 0.3
    )
    with pytest.raises(TypeError, match=r"unknown config field.*num_answers"):
        LxmertForPreTraining.from_pretrained(pretrain_dir, num_answers=3)


def test_answer_labels_round_trip_through_config_json(pretrain_dir):
    model = LxmertForPreTraining.from_pretrained(pretrain_dir)
    assert model.config.id2label == dict(enumerate(ANSWERS))
    assert model.config.label2id["answer 3"] == 3
    transformers = pytest.importorskip("transformers")
    hf = transformers.LxmertConfig.from_pretrained(pretrain_dir)
    assert hf.id2label == dict(enumerate(ANSWERS))
    # transformers' placeholder labels (LABEL_0, LABEL_1) name no answer.
    assert LxmertConfig.from_hf(transformers.LxmertConfig()).id2label is None
    with pytest.raises(ValueError, match="one per QA label"):
        lxmert_fast.set_answer_labels(model, ANSWERS[:-1])
    with pytest.raises(ValueError, match="duplicates"):
        lxmert_fast.set_answer_labels(model.config, ["a"] * len(ANSWERS))


def test_hub_name_says_how_to_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"Hub model name.*huggingface-cli download unc-nlp/lxmert-base-uncased"
    ):
        LxmertForPreTraining.from_pretrained("unc-nlp/lxmert-base-uncased")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        LxmertForPreTraining.from_pretrained(tmp_path / "nothing" / "here" / "x.pth")


def test_heads_model_from_a_pretraining_directory_says_backbone_only(pretrain_dir):
    with pytest.raises(CheckpointError) as info:
        LxmertForQuestionAnswering.from_pretrained(pretrain_dir, num_qa_labels=5)
    message = str(info.value)
    assert "backbone (lxmert.*) fits" in message and "backbone_only=True" in message
    assert "unexpected cls.* (" in message and "obj_predict_head.* (" in message
    assert "mis-shaped answer_head.logit_fc.3.weight" in message
    assert len(message.splitlines()) == 1  # grouped by head, not one line per key

    qa = LxmertForQuestionAnswering.from_pretrained(pretrain_dir, backbone_only=True, num_qa_labels=5)
    source = LxmertForPreTraining.from_pretrained(pretrain_dir)
    assert qa.answer_head.logit_fc[3].out_features == 5 and qa.config.id2label is None
    for name, tensor in source.lxmert.state_dict().items():
        assert torch.equal(qa.lxmert.state_dict()[name], tensor), name


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = LxmertForQuestionAnswering(LxmertConfig(**SMALL)).train()  # dropout on
    inputs = make_batch(model.config, 3, 7, 6, True, False)
    labels = torch.tensor([1, 4, 0])
    calls = []
    model.lxmert.encoder.x_layers[0].visual_attention.register_forward_pre_hook(lambda *_: calls.append(1))
    model.lxmert.encoder.layer[0].register_forward_pre_hook(lambda *_: calls.append(1))

    def grads(seed):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        model(**inputs, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads(3)
    assert len(calls) == 2 and not model.is_gradient_checkpointing
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    calls.clear()
    checkpointed = grads(3)
    assert len(calls) == 4  # a language and a cross layer each ran again in the backward
    for name, grad in plain.items():
        assert torch.allclose(checkpointed[name], grad, rtol=0, atol=1e-6), name
    assert not torch.allclose(
        grads(4)["answer_head.logit_fc.0.weight"], plain["answer_head.logit_fc.0.weight"]
    )
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


def test_resize_num_qa_labels_like_transformers(pretrain_dir):
    for cls in (LxmertForPreTraining, LxmertForQuestionAnswering):
        model = cls.from_pretrained(pretrain_dir, backbone_only=cls is LxmertForQuestionAnswering)
        lxmert_fast.set_answer_labels(model, ANSWERS)
        old = model.answer_head.logit_fc[3]
        weight = old.weight.detach().clone()
        layer = model.resize_num_qa_labels(5)
        assert layer is model.answer_head.logit_fc[3] and layer.weight.shape == (5, SMALL["hidden_size"] * 2)
        assert torch.equal(layer.weight.detach(), weight[:5]) and model.config.num_qa_labels == 5
        assert model.config.id2label == dict(enumerate(ANSWERS[:5]))
        grown = model.resize_num_qa_labels(20)
        assert torch.equal(grown.weight.detach()[:5], weight[:5]) and model.config.id2label is None
        assert model.resize_num_qa_labels(20) is grown and model.resize_num_qa_labels(None) is grown
        out = model(**make_batch(model.config, 2, 5, 4, False, False))
        assert out.question_answering_score.shape == (2, 20)
