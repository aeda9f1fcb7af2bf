"""Fine-tuning pieces (issue #15): formats, datasets, the NLVR2 model, --load_qa, metrics,
submissions, the synthetic sets and the task objects a loop drives."""

import json

import pytest
import torch
import torch.nn.functional as F
from lxmert_testing import SMALL, twins
from torch.utils.data import DataLoader

import lxmert_fast
from lxmert_fast import CheckpointError, LxmertForPreTraining, LxmertForQuestionAnswering
from lxmert_fast.finetune import (
    TASKS,
    LxmertForNLVR2,
    evaluation,
    load_pretrained_qa,
    submission,
    transfer_qa_head,
)
from lxmert_fast.finetune import synthetic as ft_synthetic
from lxmert_fast.finetune.datasets import eval_batches
from lxmert_fast.finetune.formats import read_gqa, read_label_tables, read_nlvr2, read_vqa

FEAT_DIM = SMALL["visual_feat_dim"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One small synthetic pre-training set with the three task sets made from it."""
    path = tmp_path_factory.mktemp("finetune")
    files = {
        name: ft_synthetic.generate(name, path, num_train=60, num_valid=40, feat_dim=FEAT_DIM)
        for name in TASKS
    }
    return path, files


def task_data(files, name):
    paths = files[name]
    return TASKS[name].build_data(
        paths["store"],
        paths["vocab"],
        train=paths["train"],
        valid=paths["valid"],
        test=paths["test"],
        ans2label=paths["ans2label"],
        label2ans=paths["label2ans"],
        max_seq_len=paths["max_seq_len"],
        num_boxes=paths["num_boxes"],
    )


def small_config(data, **overrides):
    vocab = len((data.train or data.valid).tokenizer)
    return dict(SMALL, vocab_size=vocab, **overrides)


def first_batch(dataset, size=4):
    return next(iter(DataLoader(dataset, batch_size=size)))


# ----------------------------------------------------------------------------- formats


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


VQA_OK = {
    "question_id": 458752000,
    "img_id": "COCO_train2014_000000458752",
    "sent": "What is this photo taken looking through?",
    "label": {"net": 1, "window": 0.3},
    "answer_type": "other",
    "question_type": "what is this",
}


def test_each_format_reads_the_authors_examples(tmp_path):
    vqa = read_vqa(
        write(
            tmp_path,
            "v.json",
            [VQA_OK, {k: v for k, v in VQA_OK.items() if k != "label"} | {"question_id": 1}],
        )
    )
    assert (
        vqa[0].label == {"net": 1.0, "window": 0.3} and vqa[0].answer_type == "other" and vqa[1].label is None
    )
    gqa = read_gqa(
        write(
            tmp_path,
            "g.json",
            [
                {
                    "img_id": "2375429",
                    "label": {"pipe": 1.0},
                    "question_id": "07333408",
                    "sent": "What is on the white wall?",
                }
            ],
        )
    )
    assert gqa[0].question_id == "07333408" and gqa[0].answer_type is None
    nlvr2 = read_nlvr2(
        write(
            tmp_path,
            "n.json",
            [
                {
                    "identifier": "train-10171-0-0",
                    "img0": "train-10171-0-img0",
                    "img1": "train-10171-0-img1",
                    "label": 0,
                    "sent": "An image shows one leather pencil case.",
                    "uid": "nlvr2_train_0",
                }
            ],
        )
    )
    assert nlvr2[0].label == 0 and nlvr2[0].img1 == "train-10171-0-img1"


@pytest.mark.parametrize(
    ("reader", "datum", "message"),
    [
        (
            read_vqa,
            {**VQA_OK, "question_id": "458752000"},
            r"datum 1: 'question_id' expected an integer .*got str",
        ),
        (
            read_vqa,
            {**VQA_OK, "label": {"net": 3}},
            r"datum 1 \(question 458752000\): label\['net'\] expected a score in \[0, 1\], got 3",
        ),
        (
            read_vqa,
            {**VQA_OK, "label": ["net"]},
            r"datum 1 \(question 458752000\): 'label' expected an object",
        ),
        (
            read_gqa,
            {"question_id": 7, "img_id": "1", "sent": "?"},
            r"datum 1: 'question_id' expected a string",
        ),
        (read_gqa, {"question_id": "7", "sent": "?"}, r"datum 1 \(question 7\): lacks 'img_id'"),
        (
            read_nlvr2,
            {"identifier": "dev-1-0-0", "img0": "a", "img1": "b", "sent": "s", "label": "True"},
            r"datum 1 \(dev-1-0-0\): 'label' expected 0 or 1, got str",
        ),
        (
            read_nlvr2,
            {"identifier": "dev-1-0-0", "img0": "a", "sent": "s", "label": 1},
            r"datum 1 \(dev-1-0-0\): lacks 'img1'",
        ),
    ],
)
def test_malformed_data_are_refused_naming_file_and_datum(tmp_path, reader, datum, message):
    first = {"vqa": VQA_OK | {"question_id": 1}, "gqa": {"question_id": "1", "img_id": "1", "sent": "?"}}
    first = first.get(
        reader.__name__[5:], {"identifier": "dev-0-0-0", "img0": "a", "img1": "b", "sent": "s", "label": 1}
    )
    path = write(tmp_path, "split.json", [first, datum])
    with pytest.raises(ValueError, match=rf"split\.json: {message}"):
        reader(path)


def test_truncated_file_and_duplicates_are_refused(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps([VQA_OK])[:-5])
    with pytest.raises(ValueError, match=r"t\.json: not valid JSON \(line 1"):
        read_vqa(path)
    with pytest.raises(ValueError, match="duplicate question_id 458752000"):
        read_vqa(write(tmp_path, "d.json", [VQA_OK, VQA_OK]))


def test_answer_tables_must_be_inverse(tmp_path):
    assert read_label_tables(
        write(tmp_path, "a.json", {"yes": 0, "no": 1}), write(tmp_path, "l.json", ["yes", "no"])
    ) == ["yes", "no"]
    with pytest.raises(
        ValueError, match=r"a2\.json: answer 'yes' has label 1, but .*l\.json gives label 1 to 'no'"
    ):
        read_label_tables(write(tmp_path, "a2.json", {"yes": 1, "no": 0}), tmp_path / "l.json")
    with pytest.raises(ValueError, match=r"a3\.json: 1 answers, .*l\.json: 2"):
        read_label_tables(write(tmp_path, "a3.json", {"yes": 0}), tmp_path / "l.json")


# ----------------------------------------------------------------------------- datasets


def test_items_have_fixed_shapes_and_pretraining_boxes(data_dir):
    from lxmert_fast.data.images import image_tensors
    from lxmert_fast.data.pretrain import Example, PretrainDataset

    _, files = data_dir
    vqa, nlvr2 = task_data(files, "vqa"), task_data(files, "nlvr2")
    item = vqa.train[3]
    example = vqa.train.examples[3]
    image = image_tensors(vqa.train.store, example.img_id, files["vqa"]["num_boxes"])
    # The same tensors as the pre-training items, padding included (8 > 6 boxes).
    pretrain = PretrainDataset(
        [Example("u", example.img_id, "s", "vqa", None)], vqa.train.store, vqa.train.tokenizer, num_boxes=8
    )
    reference, ours = pretrain._image(example.img_id), image_tensors(vqa.train.store, example.img_id, 8)
    assert reference.keys() == ours.keys() and all(torch.equal(reference[k], ours[k]) for k in ours)
    assert torch.equal(item["visual_pos"], image["visual_pos"]) and torch.equal(
        item["visual_feats"], image["visual_feats"]
    )
    answer, score = max(example.label.items(), key=lambda kv: kv[1])
    assert item["target"][vqa.label2ans.index(answer)] == score and item["target"].shape == (vqa.num_labels,)
    assert not vqa.test.has_labels and float(vqa.test[0]["target"].sum()) == 0.0
    batch = first_batch(nlvr2.train, 3)
    assert batch["visual_feats"].shape == (3, 2, files["nlvr2"]["num_boxes"], FEAT_DIM)
    assert batch["visual_pos"].shape == (3, 2, files["nlvr2"]["num_boxes"], 4) and batch["target"].shape == (
        3,
    )
    e = nlvr2.train.examples[1]
    assert torch.equal(
        batch["visual_feats"][1, 1], image_tensors(nlvr2.train.store, e.img1, 6)["visual_feats"]
    )


def test_examples_without_features_are_refused_naming_the_file(data_dir, tmp_path):
    _, files = data_dir
    paths = files["gqa"]
    lost = write(
        tmp_path, "lost.json", [{"question_id": "1", "img_id": "COCO_1", "sent": "what ?", "label": {}}]
    )
    with pytest.raises(
        ValueError, match=r"lost\.json: none of the 1 examples has its images in the feature store"
    ):
        TASKS["gqa"].build_data(
            paths["store"],
            paths["vocab"],
            valid=lost,
            ans2label=paths["ans2label"],
            label2ans=paths["label2ans"],
        )


def test_eval_batches_cover_every_item_with_full_batches():
    for world in (1, 3):
        batches = [b for rank in range(world) for b in eval_batches(10, 4, rank, world)]
        assert all(len(b) == 4 for b in batches) and {i for b in batches for i in b} == set(range(10))
        assert len({len(eval_batches(10, 4, r, world)) for r in range(world)}) == 1


# ----------------------------------------------------------------------------- models


def test_vqa_model_matches_transformers_on_a_task_batch(data_dir):
    _, files = data_dir
    data = task_data(files, "vqa")
    hf, ours = twins(
        "LxmertForQuestionAnswering",
        LxmertForQuestionAnswering,
        **small_config(data, num_qa_labels=data.num_labels),
    )
    task = TASKS["vqa"]
    # From a pre-trained config that names its own answers (the export's 9500 in real runs).
    pretrained = lxmert_fast.LxmertConfig(
        **small_config(data, num_qa_labels=3), id2label={0: "a", 1: "b", 2: "c"}
    )
    built = task.build_model(pretrained, data.num_labels, data.label2ans)
    assert type(built) is LxmertForQuestionAnswering and built.config.num_qa_labels == data.num_labels
    assert built.config.id2label == dict(enumerate(data.label2ans))
    batch = first_batch(data.train)
    inputs = task.model_inputs(batch)
    with torch.no_grad():
        expected = hf(**inputs).question_answering_score
        out = ours(**inputs)
    assert (task.scores(out) - expected).abs().max() <= 1e-5
    authors = F.binary_cross_entropy_with_logits(expected, batch["target"]) * data.num_labels
    assert abs(float(task.loss(out, batch)) - float(authors)) <= 1e-5


def test_nlvr2_model_runs_both_pairs_and_concatenates_img0_first(data_dir):
    _, files = data_dir
    data = task_data(files, "nlvr2")
    model = LxmertForNLVR2(lxmert_fast.LxmertConfig(**small_config(data))).eval()
    head = model.answer_head.logit_fc
    assert [tuple(head[i].weight.shape) for i in (0, 2, 3)] == [(96, 96), (96,), (2, 96)]
    assert head[2].eps == 1e-12 and float(head[3].bias.detach().abs().sum()) == 0.0
    batch = first_batch(data.train, 3)
    batch["target"][2] = -1
    inputs = TASKS["nlvr2"].model_inputs(batch)
    with torch.no_grad():
        out = model(**inputs, labels=batch["target"])
        pooled = [
            model.lxmert(
                input_ids=batch["input_ids"],
                visual_feats=batch["visual_feats"][:, k],
                visual_pos=batch["visual_pos"][:, k],
                attention_mask=batch["attention_mask"],
                token_type_ids=batch["token_type_ids"],
            ).pooled_output
            for k in (0, 1)
        ]
        expected = head(torch.cat(pooled, 1))
    assert out.logits.shape == (3, 2) and (out.logits - expected).abs().max() <= 1e-5
    assert torch.allclose(out.loss, F.cross_entropy(expected[:2], batch["target"][:2]), atol=1e-6)
    assert torch.allclose(TASKS["nlvr2"].loss(out, batch), out.loss)
    with pytest.raises(ValueError, match=r"visual_feats: expected \[batch, 2, boxes, features\]"):
        model(**{**inputs, "visual_feats": inputs["visual_feats"][:, 0]})


def authors_names(state: dict, parallel: bool = False) -> dict:
    encoder = "lxrt_encoder.model.module.bert." if parallel else "lxrt_encoder.model.bert."
    renamed = {}
    for key, value in state.items():
        if key.startswith("lxmert."):
            renamed[encoder + key[len("lxmert.") :]] = value
        else:
            renamed[key.replace("answer_head.logit_fc.", "logit_fc.")] = value
    return renamed


def test_nlvr2_best_pth_in_the_authors_names_round_trips(tmp_path):
    config = lxmert_fast.LxmertConfig(**SMALL)
    model = LxmertForNLVR2(config).eval()
    inputs = {
        "input_ids": torch.randint(1, SMALL["vocab_size"], (2, 7)),
        "visual_feats": torch.randn(2, 2, 5, FEAT_DIM),
        "visual_pos": torch.rand(2, 2, 5, 4),
    }
    for parallel in (False, True):
        state = authors_names(model.state_dict(), parallel)
        assert any(k.startswith("logit_fc.0.") for k in state) and all("answer_head" not in k for k in state)
        torch.save(state, tmp_path / "BEST.pth")
        loaded = LxmertForNLVR2.from_pretrained(tmp_path / "BEST.pth", config=config)
        with torch.no_grad():
            assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
    with pytest.raises(
        CheckpointError, match=r"answer_head\.logit_fc\.0\.weight: checkpoint \(96, 96\) vs model \(96, 48\)"
    ):
        LxmertForQuestionAnswering.from_pretrained(tmp_path / "BEST.pth", config=config)


# ----------------------------------------------------------------------------- --load_qa


PRETRAIN_ANSWERS = ["yes", "no", "red", "2", "man"]
TASK_ANSWERS = ["Red", "two", "cat", "the man", "yes"]  # normalised: red, 2, cat, man, yes


def test_load_qa_copies_rows_of_shared_answers(tmp_path):
    config = dict(SMALL, num_qa_labels=len(PRETRAIN_ANSWERS))
    pretrained = LxmertForPreTraining(lxmert_fast.LxmertConfig(**config))
    with torch.no_grad():
        for p in pretrained.answer_head.parameters():
            p.normal_()
    source = pretrained.state_dict()
    model = LxmertForQuestionAnswering(
        lxmert_fast.LxmertConfig(**dict(config, num_qa_labels=len(TASK_ANSWERS)))
    )
    fresh = model.answer_head.logit_fc[3].weight.detach().clone()
    result = transfer_qa_head(model, source, PRETRAIN_ANSWERS, TASK_ANSWERS, unmatched="keep")
    assert (result.matched, result.unmatched) == (4, 1) and "4 of 5 answers" in str(result)
    w, b = model.answer_head.logit_fc[3].weight, model.answer_head.logit_fc[3].bias
    for label, row in ((0, 2), (1, 3), (3, 4), (4, 0)):
        assert torch.equal(w[label], source["answer_head.logit_fc.3.weight"][row])
        assert torch.equal(b[label], source["answer_head.logit_fc.3.bias"][row])
    assert torch.equal(w[2], fresh[2])
    for key in ("0.weight", "0.bias", "2.weight", "2.bias"):
        assert torch.equal(
            model.state_dict()[f"answer_head.logit_fc.{key}"], source[f"answer_head.logit_fc.{key}"]
        )

    # From an authors' pre-training .pth (module.bert.*, module.answer_head.*) and its all_ans.json:
    # the backbone loads strictly, the unmatched row is zeroed as the authors do.
    authors = {"module." + k.replace("lxmert.", "bert.", 1): v for k, v in source.items()}
    torch.save(authors, tmp_path / "Epoch20_LXRT.pth")
    write(tmp_path, "all_ans.json", [{"ans": a, "dsets": ["vqa"]} for a in PRETRAIN_ANSWERS])
    model = LxmertForQuestionAnswering(
        lxmert_fast.LxmertConfig(**dict(config, num_qa_labels=len(TASK_ANSWERS)))
    )
    result = load_pretrained_qa(model, tmp_path / "Epoch20_LXRT.pth", TASK_ANSWERS)
    assert result.matched == 4
    zeroed = model.answer_head.logit_fc[3]
    assert not zeroed.weight[2].detach().any() and not zeroed.bias[2].detach().any()
    emb = "lxmert.embeddings.word_embeddings.weight"
    assert torch.equal(model.state_dict()[emb], source[emb])

    no_head = {k: v for k, v in source.items() if not k.startswith("answer_head")}
    with pytest.raises(CheckpointError, match="no QA head"):
        transfer_qa_head(model, no_head, PRETRAIN_ANSWERS, TASK_ANSWERS)
    with pytest.raises(CheckpointError, match="QA head has 5 answers, its answer table 4"):
        transfer_qa_head(model, source, PRETRAIN_ANSWERS[:4], TASK_ANSWERS)


# ----------------------------------------------------------------------------- metrics


def test_vqa_and_gqa_scores_by_hand():
    from lxmert_fast.finetune.formats import QAExample

    examples = [
        QAExample(1, "i", "q", {"yes": 1.0}, "yes/no"),
        QAExample(2, "i", "q", {"2": 0.6, "3": 0.3}, "number"),
        QAExample(3, "i", "q", {"red": 0.9, "dark red": 0.3}, "other"),
        QAExample(4, "i", "q", {"net": 1.0}, "other"),
    ]
    scores = evaluation.qa_scores([(1, "yes"), (2, "3"), (3, "dark red"), (4, "window")], examples)
    # (1 + 0.3 + 0.3 + 0) / 4; other: (0.3 + 0) / 2
    assert scores["accuracy"] == pytest.approx(0.4) and scores["accuracy_other"] == pytest.approx(0.15)
    assert scores["accuracy_yes/no"] == 1.0 and scores["accuracy_number"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="question 9 is not among the 4 examples"):
        evaluation.qa_scores([(9, "yes")], examples)
    with pytest.raises(ValueError, match="has no label"):
        evaluation.qa_scores([(1, "yes")], [QAExample(1, "i", "q", None)])
    target = torch.tensor([[0.0, 1.0, 0.0], [0.3, 0.0, 0.9]])
    counts = evaluation.qa_counts(torch.tensor([[0.0, 5.0, 1.0], [2.0, 1.0, 0.0]]), target)
    assert counts.tolist() == pytest.approx([1.3, 2.0])


def test_nlvr2_accuracy_and_consistency_by_hand():
    from lxmert_fast.finetune.formats import NLVR2Example

    labels = {"dev-1-0-0": 1, "dev-1-1-0": 0, "dev-1-2-0": 1, "dev-1-0-1": 0, "dev-2-0-0": 1, "dev-2-1-0": 1}
    examples = [NLVR2Example(i, i, "a", "b", "s", label) for i, label in labels.items()]
    predictions = {
        "dev-1-0-0": 1,
        "dev-1-1-0": 0,
        "dev-1-2-0": 1,
        "dev-1-0-1": 1,
        "dev-2-0-0": 1,
        "dev-2-1-0": 0,
    }
    scores = evaluation.nlvr2_scores(predictions.items(), examples)
    # Sentences (pair blanked): dev-1--0 (3 pairs, all right), dev-1--1 (wrong), dev-2--0 (one wrong).
    assert scores["accuracy"] == pytest.approx(4 / 6) and scores["consistency"] == pytest.approx(1 / 3)
    assert scores["sentences"] == 3 and evaluation.consistency_group("test1-77-3-2") == "test1-77--2"
    with pytest.raises(ValueError, match="split-set-pair-sentence"):
        evaluation.consistency_group("dev-1")
    counts = evaluation.nlvr2_counts(
        torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor([1, 1, -1])
    )
    assert counts.tolist() == [1.0, 2.0]


def test_submission_files(tmp_path):
    submission.write_vqa([(458752000, "net")], tmp_path / "vqa.json")
    assert json.loads((tmp_path / "vqa.json").read_text()) == [{"question_id": 458752000, "answer": "net"}]
    submission.write_gqa([("07333408", "pipe")], tmp_path / "gqa.json")
    assert json.loads((tmp_path / "gqa.json").read_text()) == [
        {"questionId": "07333408", "prediction": "pipe"}
    ]
    submission.write_nlvr2([("dev-1-0-0", 1), ("dev-1-1-0", 0)], tmp_path / "nlvr2.csv")
    assert (tmp_path / "nlvr2.csv").read_text() == "dev-1-0-0,True\ndev-1-1-0,False\n"
    with pytest.raises(ValueError, match="VQA question_id: expected int, got str"):
        submission.write_vqa([("1", "net")], tmp_path / "bad.json")
    with pytest.raises(ValueError, match="GQA questionId: expected str, got int"):
        submission.write_gqa([(1, "pipe")], tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "gqa.json",
        "nlvr2.csv",
        "vqa.json",
    ]


# ----------------------------------------------------------------------------- synthetic sets and tasks


def test_synthetic_sets_need_the_image(data_dir):
    path, files = data_dir
    for name, task in TASKS.items():
        data = task_data(files, name)
        assert data.train.skipped == 0 and len(data.test) > 0
        baseline = task.text_only_baseline(data.train.examples, data.valid.examples)
        assert 0.3 < baseline < 0.6, (name, baseline)
        # The same question string has several answers in training: the text alone cannot tell.
        answers: dict[str, set] = {}
        for e in data.train.examples:
            answers.setdefault(e.sent, set()).add(
                e.label if name == "nlvr2" else max(e.label, key=e.label.get)
            )
        assert sum(len(a) > 1 for a in answers.values()) > len(answers) // 2
    assert ft_synthetic.is_current("gqa", path)
    nlvr2 = task_data(files, "nlvr2").valid.examples
    groups: dict[str, list[int]] = {}
    for e in nlvr2:
        groups.setdefault(evaluation.consistency_group(e.identifier), []).append(e.label)
    assert all(len(g) == ft_synthetic.PAIRS_PER_SENTENCE for g in groups.values())


@pytest.mark.parametrize("name", list(TASKS))
def test_task_drives_a_step_predictions_and_submission(data_dir, tmp_path, name):
    _, files = data_dir
    task = TASKS[name]
    data = task_data(files, name)
    model = task.build_model(lxmert_fast.LxmertConfig(**small_config(data)), data.num_labels)
    batch = first_batch(data.train, 4)
    out = model(**task.model_inputs(batch, use_visual_mask=True))
    loss = task.loss(out, batch)
    loss.backward()
    assert torch.isfinite(loss) and model.lxmert.embeddings.word_embeddings.weight.grad is not None
    counts = task.accuracy_counts(out, batch)[name]
    assert counts.shape == (2,) and float(counts[1]) == 4
    model.eval()
    predictions = []
    with torch.no_grad():
        for split in (data.valid, data.test):
            loader = DataLoader(split, batch_sampler=eval_batches(len(split), 8))
            predictions.append(
                [p for b in loader for p in task.predictions(model(**task.model_inputs(b)), b, split)]
            )
    assert {p[0] for p in predictions[0]} == {ft_id(e) for e in data.valid.examples}
    scores = task.evaluate(predictions[0], data.valid.examples)
    assert 0.0 <= scores["accuracy"] <= 1.0
    task.write_submission(predictions[1], tmp_path / f"test_predict.{task.submission_suffix}")
    assert (tmp_path / f"test_predict.{task.submission_suffix}").stat().st_size > 0


def ft_id(example):
    return getattr(example, "identifier", None) or example.question_id
