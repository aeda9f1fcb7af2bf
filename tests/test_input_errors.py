"""Bad input gets an error naming the argument, what was expected and what came."""

import pytest
import torch
from lxmert_testing import SMALL, make_batch

from lxmert_fast import LxmertConfig, LxmertForPreTraining, LxmertModel, ops

CONFIG = LxmertConfig(**SMALL)


@pytest.fixture(scope="module")
def model():
    return LxmertModel(CONFIG).eval()


def good():
    return make_batch(CONFIG, 2, 6, 5, True, True)


CASES = [
    (
        "input_ids",
        lambda b: b.update(input_ids=b["input_ids"][0]),
        ValueError,
        "input_ids: expected a 2-D tensor",
    ),
    (
        "input_ids dtype",
        lambda b: b.update(input_ids=b["input_ids"].float()),
        TypeError,
        "input_ids: expected an integer",
    ),
    (
        "input_ids range",
        lambda b: b["input_ids"].__setitem__((0, 0), 97),
        ValueError,
        r"input_ids: expected ids in \[0, 97\)",
    ),
    ("negative ids", lambda b: b["input_ids"].__setitem__((0, 0), -1), ValueError, "input_ids: expected ids"),
    (
        "visual_feats rank",
        lambda b: b.update(visual_feats=b["visual_feats"][0]),
        ValueError,
        "visual_feats: expected a 3-D",
    ),
    (
        "visual_feats width",
        lambda b: b.update(visual_feats=b["visual_feats"][..., :-1]),
        ValueError,
        "visual_feats: expected last dimension 40",
    ),
    (
        "visual_feats dtype",
        lambda b: b.update(visual_feats=b["visual_feats"].long()),
        TypeError,
        "visual_feats: expected a floating-point",
    ),
    (
        "batch mismatch",
        lambda b: b.update(visual_feats=b["visual_feats"][:1], visual_pos=b["visual_pos"][:1]),
        ValueError,
        "visual_feats: expected batch size 2",
    ),
    (
        "visual_pos width",
        lambda b: b.update(visual_pos=b["visual_pos"][..., :3]),
        ValueError,
        "visual_pos: expected last dimension 4",
    ),
    (
        "visual_pos boxes",
        lambda b: b.update(visual_pos=b["visual_pos"][:, :4]),
        ValueError,
        r"visual_pos: expected shape \[2, 5, 4\]",
    ),
    (
        "pixel boxes",
        lambda b: b.update(visual_pos=b["visual_pos"] * 640),
        ValueError,
        r"visual_pos: expected boxes normalised to \[0, 1\]",
    ),
    (
        "attention_mask",
        lambda b: b.update(attention_mask=b["attention_mask"][:, :-1]),
        ValueError,
        r"attention_mask: expected shape \[2, 6\]",
    ),
    (
        "visual mask",
        lambda b: b.update(visual_attention_mask=torch.ones(2, 6)),
        ValueError,
        r"visual_attention_mask: expected shape \[2, 5\]",
    ),
    (
        "token types",
        lambda b: b.update(token_type_ids=torch.full((2, 6), 2)),
        ValueError,
        r"token_type_ids: expected values in \[0, 2\)",
    ),
    (
        "missing feats",
        lambda b: b.pop("visual_feats"),
        ValueError,
        "visual_feats / visual_pos: both are required",
    ),
    (
        "too long",
        lambda b: b.update(
            input_ids=torch.ones(2, 65, dtype=torch.long), attention_mask=None, token_type_ids=None
        ),
        ValueError,
        "max_position_embeddings=64",
    ),
]


@pytest.mark.parametrize(("what", "corrupt", "error", "message"), CASES, ids=[c[0] for c in CASES])
def test_model_rejects_bad_input(model, what, corrupt, error, message):
    batch = good()
    corrupt(batch)
    with pytest.raises(error, match=message):
        model(**batch)


def test_both_ids_and_embeddings_is_an_error(model):
    batch = good()
    batch["inputs_embeds"] = torch.randn(2, 6, CONFIG.hidden_size)
    with pytest.raises(ValueError, match="exactly one"):
        model(**batch)


def test_boxes_on_the_edge_are_accepted_and_value_checks_can_be_disabled(model):
    batch = good()
    batch["visual_pos"][0, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    model(**batch)
    batch["visual_pos"] *= 2
    model.check_inputs = False
    try:
        model(**batch)
    finally:
        model.check_inputs = True


@pytest.mark.parametrize("heads", ["LxmertForPreTraining", "LxmertForQuestionAnswering"])
def test_check_inputs_on_a_heads_model_controls_the_backbone(heads):
    # Issue #17: model.check_inputs = False on a heads model used to set an unused attribute.
    import lxmert_fast

    model = getattr(lxmert_fast, heads)(CONFIG).eval()
    assert model.check_inputs is True and model.lxmert.check_inputs is True
    batch = good()
    batch["visual_pos"] *= 2
    with pytest.raises(ValueError, match="visual_pos: expected boxes normalised"):
        model(**batch)
    model.check_inputs = False
    assert model.lxmert.check_inputs is False
    model(**batch)
    model.lxmert.check_inputs = True
    assert model.check_inputs is True
    assert "check_inputs" not in vars(model)


def test_inputs_embeds_path_matches_ids(model):
    batch = good()
    embeds = model.embeddings.word_embeddings(batch["input_ids"])
    ids = batch.pop("input_ids")
    with torch.no_grad():
        a = model(**batch, inputs_embeds=embeds).language_output
        b = model(**batch, input_ids=ids).language_output
    assert torch.allclose(a, b)


def test_pretraining_label_errors():
    model = LxmertForPreTraining(CONFIG).eval()
    batch = good()
    with pytest.raises(ValueError, match=r"obj_labels\['feat'\]\[0\]: expected shape"):
        model(
            **batch,
            obj_labels={
                "obj": (torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5)),
                "attr": (torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5)),
                "feat": (torch.zeros(2, 5, 3), torch.ones(2, 5)),
            },
        )
    with pytest.raises(ValueError, match="obj_labels: missing entry 'attr'"):
        model(**batch, obj_labels={"obj": (torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5))})


OP_CASES = [
    (
        lambda: ops.bidirectional_cross_attention(torch.randn(2, 5, 30), 2, 4, None, None),
        "qkv: expected last dimension 3 \\* hidden",
    ),
    (
        lambda: ops.bidirectional_cross_attention(torch.randn(2, 5, 24), 5, 2, None, None),
        "lang_len: expected 0 < lang_len < 5",
    ),
    (
        lambda: ops.bidirectional_cross_attention(torch.randn(2, 5, 24), 2, 2, torch.zeros(2, 3), None),
        r"lang_bias: expected shape \[2, 2\]",
    ),
    (
        lambda: ops.bidirectional_cross_attention(torch.randn(2, 5, 24), 2, 2, None, torch.zeros(2, 2)),
        r"visual_bias: expected shape \[2, 3\]",
    ),
    (
        lambda: ops.bidirectional_cross_attention(torch.randn(2, 5, 24), 2, 2, None, None, dropout_p=1.5),
        r"dropout_p: expected a probability",
    ),
    (
        lambda: ops.residual_dropout_layer_norm(
            torch.randn(2, 8), torch.randn(2, 7), torch.ones(8), torch.zeros(8), 1e-12
        ),
        "residual: expected the shape of hidden",
    ),
    (
        lambda: ops.residual_dropout_layer_norm(
            torch.randn(2, 8), torch.randn(2, 8), torch.ones(7), torch.zeros(8), 1e-12
        ),
        r"weight: expected shape \[8\]",
    ),
    (lambda: ops.roi_feature_mask(torch.randn(2, 36), 0), "features: expected a 3-D"),
    (
        lambda: ops.roi_feature_mask(torch.randn(2, 3, 4), 0, p_select=-0.1),
        "p_select: expected a probability",
    ),
    (
        lambda: ops.roi_feature_mask(torch.randn(2, 3, 4), 0, p_zero=0.8, p_replace=0.3),
        "p_zero \\+ p_replace",
    ),
]


@pytest.mark.parametrize(("call", "message"), OP_CASES)
def test_ops_reject_bad_input(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def pretraining_labels(batch: int = 2, words: int = 6, boxes: int = 5) -> dict:
    long = dict(dtype=torch.long)
    return {
        "labels": torch.full((batch, words), -1, **long),
        "matched_label": torch.ones(batch, **long),
        "ans": torch.zeros(batch, **long),
        "obj_labels": {
            "obj": (torch.zeros(batch, boxes, **long), torch.ones(batch, boxes)),
            "attr": (torch.zeros(batch, boxes, **long), torch.ones(batch, boxes)),
            "feat": (torch.zeros(batch, boxes, CONFIG.visual_feat_dim), torch.ones(batch, boxes)),
        },
    }


LABEL_CASES = [
    ("matched_label rows", lambda x: x.update(matched_label=torch.ones(3, dtype=torch.long)), r"matched_label: expected shape \[2\]"),
    ("labels length", lambda x: x.update(labels=torch.full((2, 7), -1)), r"labels: expected shape \[2, 6\]"),
    ("labels flat", lambda x: x.update(labels=torch.full((12,), -1)), r"labels: expected shape \[2, 6\]"),
    ("ans column", lambda x: x.update(ans=torch.zeros(2, 1, dtype=torch.long)), r"ans: expected shape \[2\]"),
    ("ans float", lambda x: x.update(ans=torch.zeros(2)), "ans: expected an integer tensor"),
    ("obj boxes", lambda x: x["obj_labels"].update(obj=(torch.zeros(2, 6, dtype=torch.long), torch.ones(2, 6))), r"obj_labels\['obj'\]\[0\]: expected shape \[2, 5\]"),
    ("attr weight", lambda x: x["obj_labels"].update(attr=(torch.zeros(2, 5, dtype=torch.long), torch.ones(10))), r"obj_labels\['attr'\]\[1\]: expected shape \[2, 5\]"),
    ("feat width", lambda x: x["obj_labels"].update(feat=(torch.zeros(2, 5, 3), torch.ones(2, 5))), r"obj_labels\['feat'\]\[0\]: expected shape \[2, 5, 40\]"),
    ("obj not a pair", lambda x: x["obj_labels"].update(obj=torch.zeros(2, 5, dtype=torch.long)), r"obj_labels\['obj'\]: expected a \(labels, weights\) pair"),
]  # fmt: skip


@pytest.fixture(scope="module")
def pretraining_model():
    return LxmertForPreTraining(CONFIG).eval()


@pytest.mark.parametrize(("what", "corrupt", "message"), LABEL_CASES, ids=[c[0] for c in LABEL_CASES])
def test_pretraining_label_shapes_are_checked_against_the_batch(pretraining_model, what, corrupt, message):
    # A loss flattens its labels: without the check, 3 matched labels for 2 pairs (or MLM labels of
    # another length) were reshaped against the logits and trained on scrambled rows.
    labels = pretraining_labels()
    corrupt(labels)
    with pytest.raises((ValueError, TypeError), match=message):
        pretraining_model(**good(), **labels)


LABEL_VALUE_CASES = [
    ("labels", lambda x: x["labels"].__setitem__((0, 1), 99), r"labels: expected class ids in \[0, 97\)"),
    ("matched_label", lambda x: x["matched_label"].__setitem__(0, 2), r"matched_label: expected class ids in \[0, 2\)"),
    ("ans", lambda x: x["ans"].__setitem__(1, 13), r"ans: expected class ids in \[0, 13\)"),
    ("obj", lambda x: x["obj_labels"]["obj"][0].__setitem__((0, 0), 11), r"obj_labels\['obj'\]\[0\]: expected class ids in \[0, 11\)"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("what", "corrupt", "message"), LABEL_VALUE_CASES, ids=[c[0] for c in LABEL_VALUE_CASES]
)
def test_pretraining_label_values_out_of_range_name_the_argument(pretraining_model, what, corrupt, message):
    labels = pretraining_labels()
    corrupt(labels)
    with pytest.raises(ValueError, match=message + r" or negative \(ignored\), got values in"):
        pretraining_model(**good(), **labels)


@pytest.mark.parametrize(("words", "boxes", "message"), [(0, 5, "input_ids: expected at least one token"),
                                                         (6, 0, "visual_feats: expected at least one box")])  # fmt: skip
def test_zero_tokens_or_zero_boxes_are_a_clear_error(pretraining_model, words, boxes, message):
    batch = make_batch(CONFIG, 2, words, boxes, False, False)
    with pytest.raises(ValueError, match=message):
        pretraining_model(**batch, **pretraining_labels(2, words, boxes))


@pytest.mark.parametrize("seed", [1.5, "7", True])
def test_roi_feature_mask_seed_of_another_type_names_the_argument(seed):
    with pytest.raises(TypeError, match="seed: expected an int"):
        ops.roi_feature_mask(torch.randn(2, 3, 4), seed)


def test_roi_feature_mask_takes_every_64_bit_seed():
    features = torch.randn(2, 3, 4)
    for seed in (2**63, 2**64 - 1, -(2**63)):
        ops.roi_feature_mask(features, seed)
    with pytest.raises(ValueError, match=r"seed: expected a 64-bit value"):
        ops.roi_feature_mask(features, 2**64)


def test_training_batches_get_the_model_checks_on_the_host():
    # train.py runs the model with check_inputs off (no device sync per step) and checks each CPU
    # batch with pretraining.check_batch instead: the same checks, the same messages.
    from lxmert_fast import pretraining as pt

    model = LxmertForPreTraining(CONFIG)
    model.lxmert.check_inputs = False
    labels = pretraining_labels()
    batch = {
        **good(),
        "mlm_labels": labels["labels"],
        "matched_label": labels["matched_label"],
        "qa_label": labels["ans"],
        **{f"{k}_ids": labels["obj_labels"][k][0] for k in ("obj", "attr")},
        **{f"{k}_conf": labels["obj_labels"][k][1] for k in ("obj", "attr")},
    }
    pt.check_batch(model, batch)
    batch["visual_pos"][1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"visual_pos: expected boxes normalised .* got 1 NaN values"):
        pt.check_batch(model, batch)
    batch["visual_pos"][1, 2, 0] = 0.5
    batch["obj_ids"][0, 0] = 11
    with pytest.raises(ValueError, match=r"obj_labels\['obj'\]\[0\]: expected class ids in \[0, 11\)"):
        pt.check_batch(model, batch)
