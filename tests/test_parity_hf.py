"""Exact numerics: our models against transformers' with the same weights (fp32, eval mode).

Random-init transformers models are built from a small and from the paper's config
(nothing is downloaded), their state dicts loaded strictly into ours, and every output —
language/vision/pooled outputs, hidden states, attentions, head scores, losses — compared
at 1e-5 max abs. Then the other way round: our weights into transformers.
"""

import pytest
import torch
from lxmert_testing import FULL, SMALL, hf_config, make_batch, max_abs_diff, twins

import lxmert_fast
from lxmert_fast import LxmertForPreTraining, LxmertForQuestionAnswering, LxmertModel
from lxmert_fast.layers import unfuse_names

transformers = pytest.importorskip("transformers")

TOL = 1e-5
PAIRS = {
    "LxmertModel": LxmertModel,
    "LxmertForPreTraining": LxmertForPreTraining,
    "LxmertForQuestionAnswering": LxmertForQuestionAnswering,
}
_cache: dict = {}


def cached_twins(name: str, size: str):
    key = (name, size)
    if key not in _cache:
        _cache.clear()  # keep at most one pair of full-size models in memory
        _cache[key] = twins(name, PAIRS[name], **(SMALL if size == "small" else FULL))
    return _cache[key]


def run_both(hf, ours, inputs, **flags):
    with torch.no_grad():
        return hf(**inputs, **flags), ours(**inputs, **flags)


SMALL_CASES = [
    (batch, lang_len, num_boxes, lang_mask, visual_mask)
    for batch, lang_len, num_boxes in [(1, 1, 1), (1, 7, 5), (3, 9, 36), (3, 20, 13)]
    for lang_mask in (False, True)
    for visual_mask in (False, True)
]


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: "B{}-L{}-V{}-lm{:d}-vm{:d}".format(*c))
def test_small_config_all_outputs_match(name, case):
    hf, ours = cached_twins(name, "small")
    inputs = make_batch(hf.config, *case)
    for flags in ({"return_dict": False}, {"output_hidden_states": True, "output_attentions": True}):
        a, b = run_both(hf, ours, inputs, **flags)
        a = a.to_tuple() if hasattr(a, "to_tuple") else a
        b = b.to_tuple() if hasattr(b, "to_tuple") else b
        assert max_abs_diff(a, b) <= TOL


FULL_CASES = [
    ("LxmertModel", (1, 11, 36, True, False)),
    ("LxmertModel", (3, 20, 36, True, True)),
    ("LxmertForPreTraining", (3, 17, 29, False, True)),
    ("LxmertForQuestionAnswering", (2, 20, 36, True, True)),
]


@pytest.mark.parametrize(("name", "case"), FULL_CASES, ids=lambda c: str(c))
def test_full_config_all_outputs_match(name, case, record_property):
    hf, ours = cached_twins(name, "full")
    inputs = make_batch(hf.config, *case)
    a, b = run_both(hf, ours, inputs, output_hidden_states=True, output_attentions=True, return_dict=False)
    diff = max_abs_diff(a, b)
    record_property("max_abs_diff", diff)
    print(f"{name} full config {case}: max abs diff {diff:.3g}")
    assert diff <= TOL


def _labels(config, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    batch, lang_len = inputs["input_ids"].shape
    num_boxes = inputs["visual_feats"].shape[1]
    mlm = torch.randint(0, config.vocab_size, (batch, lang_len), generator=g)
    mlm[torch.rand(batch, lang_len, generator=g) > 0.3] = -100
    mlm[:, 0] = 3  # at least one label per batch
    obj_labels = {
        "obj": (
            torch.randint(0, config.num_object_labels, (batch, num_boxes), generator=g),
            torch.rand(batch, num_boxes, generator=g),
        ),
        "attr": (
            torch.randint(0, config.num_attr_labels, (batch, num_boxes), generator=g),
            torch.rand(batch, num_boxes, generator=g),
        ),
        "feat": (inputs["visual_feats"].clone(), (torch.rand(batch, num_boxes, generator=g) < 0.15).float()),
    }
    return {
        "labels": mlm,
        "obj_labels": obj_labels,
        "matched_label": torch.randint(0, 2, (batch,), generator=g),
        "ans": torch.randint(0, config.num_qa_labels, (batch,), generator=g),
    }


@pytest.mark.parametrize("size", ["full", "small"])
def test_pretraining_loss_matches(size, record_property):
    hf, ours = cached_twins("LxmertForPreTraining", size)
    inputs = make_batch(hf.config, 3, 13, 36, True, False)
    labels = _labels(hf.config, inputs)
    a, b = run_both(hf, ours, {**inputs, **labels})
    assert abs(a.loss.item() - b.loss.item()) <= TOL * max(1.0, abs(a.loss.item()))
    assert set(b.losses) == {"mlm", "matched", "obj", "attr", "feat", "qa"}
    assert torch.allclose(sum(b.losses.values()), b.loss, atol=1e-6)
    assert max_abs_diff(a.to_tuple(), b.to_tuple()) <= TOL * max(1.0, abs(a.loss.item()))
    record_property("loss_diff", abs(a.loss.item() - b.loss.item()))


def test_question_answering_loss_matches():
    hf, ours = cached_twins("LxmertForQuestionAnswering", "small")
    inputs = make_batch(hf.config, 3, 9, 10, True, True)
    inputs["labels"] = torch.tensor([1, 0, 12])
    a, b = run_both(hf, ours, inputs)
    assert abs(a.loss.item() - b.loss.item()) <= TOL
    assert max_abs_diff(a.to_tuple(), b.to_tuple()) <= TOL


def test_gradients_match_transformers():
    hf, ours = twins("LxmertForPreTraining", LxmertForPreTraining, **SMALL)
    inputs = make_batch(hf.config, 3, 9, 12, True, True)
    labels = _labels(hf.config, inputs)
    hf(**inputs, **labels).loss.backward()
    ours(**inputs, **labels).loss.backward()
    hf_grads = {name: p.grad for name, p in hf.named_parameters()}
    # Our fused Q/K/V gradients compared slice by slice under transformers' names.
    grads = unfuse_names((name, p.grad) for name, p in ours.named_parameters())
    assert set(grads) == set(hf_grads)
    for name, grad in grads.items():
        ref = hf_grads[name]
        assert grad is not None and ref is not None, name
        assert (grad - ref).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize("name", list(PAIRS))
def test_our_weights_load_into_transformers(name):
    ours = PAIRS[name](lxmert_fast.LxmertConfig(**SMALL)).eval()
    hf = getattr(transformers, name)(hf_config(**SMALL)).eval()
    hf.load_state_dict(ours.state_dict(), strict=True)
    inputs = make_batch(hf.config, 3, 8, 6, True, True)
    a, b = run_both(hf, ours, inputs, output_hidden_states=True, output_attentions=True, return_dict=False)
    assert max_abs_diff(a, b) <= TOL


def test_disabled_heads_and_visual_losses_match_transformers():
    config = dict(SMALL, task_qa=False, visual_attr_loss=False, task_matched=False)
    hf, ours = twins("LxmertForPreTraining", LxmertForPreTraining, **config)
    assert "answer_head.logit_fc.0.weight" not in ours.state_dict()
    inputs = make_batch(hf.config, 2, 6, 5, True, False)
    labels = _labels(hf.config, inputs)
    labels["obj_labels"].pop("attr")
    a, b = run_both(hf, ours, {**inputs, **labels})
    assert set(b.losses) == {"mlm", "obj", "feat"}
    assert abs(a.loss.item() - b.loss.item()) <= TOL
