"""lxmert_fast.CrossLayer as a drop-in for transformers' LxmertXLayer."""

import pytest
import torch
from lxmert_testing import SMALL, hf_config, make_batch, max_abs_diff, twins

import lxmert_fast
from lxmert_fast import CrossLayer, replace_cross_layers
from lxmert_fast.layers import unfuse_names

transformers = pytest.importorskip("transformers")
from transformers.models.lxmert.modeling_lxmert import LxmertXLayer  # noqa: E402


def extended(mask):
    return None if mask is None else ((1.0 - mask[:, None, None, :]) * torch.finfo(torch.float32).min)


def layer_pair():
    config = hf_config(**SMALL)
    hf = LxmertXLayer(config).eval()
    ours = CrossLayer(config).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


@pytest.mark.parametrize("lang_mask", [False, True])
@pytest.mark.parametrize("visual_mask", [False, True])
@pytest.mark.parametrize(("batch", "lang_len", "num_boxes"), [(1, 1, 1), (2, 7, 36), (3, 20, 10)])
def test_outputs_and_attentions_match(lang_mask, visual_mask, batch, lang_len, num_boxes):
    hf, ours = layer_pair()
    assert set(hf.state_dict()) == set(ours.state_dict())
    lang = torch.randn(batch, lang_len, SMALL["hidden_size"])
    vis = torch.randn(batch, num_boxes, SMALL["hidden_size"])
    masks = make_batch(hf_config(**SMALL), batch, lang_len, num_boxes, lang_mask, visual_mask)
    lm, vm = extended(masks.get("attention_mask")), extended(masks.get("visual_attention_mask"))
    for output_attentions in (False, True):
        a = hf(lang, lm, vis, vm, output_attentions=output_attentions)
        b = ours(lang, lm, vis, vm, output_attentions=output_attentions)
        assert len(a) == len(b) == (3 if output_attentions else 2)
        assert max_abs_diff(a, b) <= 1e-5


def test_gradients_match():
    hf, ours = layer_pair()
    lang = torch.randn(2, 9, SMALL["hidden_size"], requires_grad=True)
    vis = torch.randn(2, 12, SMALL["hidden_size"], requires_grad=True)
    lm = extended(torch.tensor([[1.0] * 9, [1.0] * 5 + [0.0] * 4]))
    grads = []
    for layer in (hf, ours):
        lang.grad = vis.grad = None
        layer.zero_grad()
        out = layer(lang, lm, vis, None)
        (out[0].square().sum() + out[1].sin().sum()).backward()
        # Parameter gradients by transformers' name (ours: fused Q/K/V split in its slices).
        named = unfuse_names((name, p.grad.clone()) for name, p in layer.named_parameters())
        grads.append([lang.grad.clone(), vis.grad.clone()] + [named[name] for name in sorted(named)])
    assert max_abs_diff(grads[0], grads[1]) <= 1e-5


def test_train_mode_dropout_is_active_and_eval_is_deterministic():
    _, ours = layer_pair()
    lang, vis = torch.randn(2, 5, SMALL["hidden_size"]), torch.randn(2, 6, SMALL["hidden_size"])
    ours.train()
    assert not torch.equal(ours(lang, None, vis, None)[0], ours(lang, None, vis, None)[0])
    ours.eval()
    assert torch.equal(ours(lang, None, vis, None)[0], ours(lang, None, vis, None)[0])


def test_replace_cross_layers_keeps_outputs():
    hf, _ = twins("LxmertModel", lxmert_fast.LxmertModel, **SMALL)
    inputs = make_batch(hf.config, 3, 8, 10, True, True)
    with torch.no_grad():
        before = hf(**inputs, output_attentions=True, return_dict=False)
        assert replace_cross_layers(hf) == SMALL["x_layers"]
        assert all(isinstance(layer, CrossLayer) for layer in hf.encoder.x_layers)
        after = hf(**inputs, output_attentions=True, return_dict=False)
    assert max_abs_diff(before, after) <= 1e-5
    assert replace_cross_layers(hf) == 0


def test_replace_cross_layers_needs_a_config():
    with pytest.raises(ValueError, match="config"):
        replace_cross_layers(torch.nn.Sequential(LxmertXLayer(hf_config(**SMALL))))


def test_bad_masks_and_inputs_name_the_argument():
    _, ours = layer_pair()
    lang, vis = torch.randn(2, 5, SMALL["hidden_size"]), torch.randn(2, 6, SMALL["hidden_size"])
    with pytest.raises(ValueError, match="visual_attention_mask"):
        ours(lang, None, vis, torch.zeros(2, 1, 1, 7))
    with pytest.raises(ValueError, match="lang_attention_mask"):
        ours(lang, torch.zeros(2, 1, 5, 5), vis, None)
    with pytest.raises(ValueError, match=r"visual_feats.*batch size 2"):
        ours(lang, None, vis[:1], None)
    with pytest.raises(ValueError, match=r"visual_feats.*last dimension"):
        ours(lang, None, vis[..., :7], None)
    with pytest.raises(ValueError, match=r"lang_feats.*3-D"):
        ours(lang[0], None, vis, None)
