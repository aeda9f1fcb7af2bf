"""lxmert_fast.apply_to: transformers' LXMERT models patched in place keep outputs and gradients
(issue #17 point 2)."""

from __future__ import annotations

import copy

import pytest
import torch
from lxmert_testing import SMALL, hf_config, make_batch, max_abs_diff, max_scaled_diff

import lxmert_fast
from lxmert_fast.layers import AttentionOutput, CrossLayer, Output, VisualFeatureEncoder, unfuse_names
from lxmert_fast.patch import TransformersLayer

transformers = pytest.importorskip("transformers")


def patched_pair(cls_name: str, **config):
    torch.manual_seed(0)
    hf = getattr(transformers, cls_name)(hf_config(**config))
    ours = copy.deepcopy(hf)
    assert lxmert_fast.apply_to(ours) is ours
    return hf, ours


def labels_for(cls_name: str, config, batch: int, lang_len: int, num_boxes: int) -> dict:
    g = torch.Generator().manual_seed(1)
    if cls_name == "LxmertForQuestionAnswering":
        return {"labels": torch.randint(0, config.num_qa_labels, (batch,), generator=g)}
    if cls_name == "LxmertForPreTraining":
        return {
            "labels": torch.randint(0, config.vocab_size, (batch, lang_len), generator=g),
            "matched_label": torch.randint(0, 2, (batch,), generator=g),
            "ans": torch.randint(0, config.num_qa_labels, (batch,), generator=g),
            "obj_labels": {
                "obj": (torch.randint(0, config.num_object_labels, (batch, num_boxes), generator=g),
                        torch.rand(batch, num_boxes, generator=g)),
                "attr": (torch.randint(0, config.num_attr_labels, (batch, num_boxes), generator=g),
                         torch.rand(batch, num_boxes, generator=g)),
                "feat": (torch.randn(batch, num_boxes, config.visual_feat_dim, generator=g),
                         torch.rand(batch, num_boxes, generator=g)),
            },
        }  # fmt: skip
    return {}


def grads_by_name(model) -> dict[str, torch.Tensor]:
    return unfuse_names((name, p.grad) for name, p in model.named_parameters() if p.grad is not None)


@pytest.mark.parametrize("cls_name", ["LxmertModel", "LxmertForPreTraining", "LxmertForQuestionAnswering"])
def test_patched_model_keeps_outputs_and_gradients(cls_name):
    hf, ours = patched_pair(cls_name, **SMALL)
    prefix = "" if cls_name == "LxmertModel" else "lxmert."
    assert ours.lxmert_fast_swapped == {
        "visual_embedding": [f"{prefix}encoder.visn_fc"],
        "layers": [f"{prefix}encoder.layer.{i}" for i in range(SMALL["l_layers"])]
        + [f"{prefix}encoder.r_layers.{i}" for i in range(SMALL["r_layers"])],
        "cross_layers": [f"{prefix}encoder.x_layers.{i}" for i in range(SMALL["x_layers"])],
    }
    encoder = ours.get_submodule(f"{prefix}encoder")
    assert isinstance(encoder.visn_fc, VisualFeatureEncoder)
    assert all(isinstance(m, TransformersLayer) for m in [*encoder.layer, *encoder.r_layers])
    assert all(isinstance(m, CrossLayer) for m in encoder.x_layers)
    # The state dict is transformers' own, names and values.
    hf_state, our_state = hf.state_dict(), ours.state_dict()
    assert hf_state.keys() == our_state.keys()
    assert all(torch.equal(hf_state[k], our_state[k]) for k in hf_state)

    inputs = make_batch(hf.config, 3, 9, 10, True, True)
    labels = labels_for(cls_name, hf.config, 3, 9, 10)
    for model in (hf, ours):
        model.eval()
    with torch.no_grad():
        before = hf(**inputs, output_attentions=True, output_hidden_states=True, return_dict=False)
        after = ours(**inputs, output_attentions=True, output_hidden_states=True, return_dict=False)
    assert max_abs_diff(before, after) <= 1e-5

    results = []
    for model in (hf, ours):
        out = model(**inputs, **labels, return_dict=True)
        loss = out.loss if out.get("loss") is not None else out.pooled_output.square().sum()
        loss.backward()
        results.append((loss.detach(), grads_by_name(model)))
    (hf_loss, hf_grads), (our_loss, our_grads) = results
    assert torch.allclose(hf_loss, our_loss, atol=1e-5, rtol=1e-5)
    assert hf_grads.keys() == our_grads.keys() and hf_grads
    assert (
        max_scaled_diff([hf_grads[k] for k in sorted(hf_grads)], [our_grads[k] for k in sorted(hf_grads)])
        <= 1e-5
    )


def test_train_mode_device_dtype_and_second_call():
    hf = transformers.LxmertModel(hf_config(**SMALL)).to(torch.float64).train()
    lxmert_fast.apply_to(hf)
    assert (
        hf.encoder.x_layers[0].training and next(hf.encoder.x_layers[0].parameters()).dtype == torch.float64
    )
    assert lxmert_fast.apply_to(hf).lxmert_fast_swapped == {}
    assert lxmert_fast.replace_cross_layers(hf) == 0


def test_output_blocks_outside_layers_are_swapped():
    from transformers.models.lxmert.modeling_lxmert import LxmertAttentionOutput, LxmertOutput

    config = hf_config(**SMALL)
    custom = torch.nn.ModuleDict({"a": LxmertAttentionOutput(config), "b": LxmertOutput(config)}).eval()
    x, r, h = torch.randn(2, 5, 48), torch.randn(2, 5, 48), torch.randn(2, 5, SMALL["intermediate_size"])
    before = (custom["a"](x, r), custom["b"](h, r))
    lxmert_fast.apply_to(custom, config)
    assert isinstance(custom["a"], AttentionOutput) and type(custom["b"]) is Output
    assert max_abs_diff(before, (custom["a"](x, r), custom["b"](h, r))) <= 1e-6
    assert custom.lxmert_fast_swapped == {"output_blocks": ["a", "b"]}


def test_full_default_config_forward():
    # transformers' default LxmertConfig (the paper model, 228M parameters with heads): forward only.
    hf, ours = patched_pair("LxmertForPreTraining")
    assert (
        len(ours.lxmert_fast_swapped["layers"]) == 14 and len(ours.lxmert_fast_swapped["cross_layers"]) == 5
    )
    inputs = make_batch(hf.config, 2, 8, 36, True, False)
    with torch.no_grad():
        before = hf.eval()(**inputs, return_dict=False)
        after = ours.eval()(**inputs, return_dict=False)
    assert max_abs_diff(before, after) <= 1e-5
