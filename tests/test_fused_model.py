"""CrossLayer and whole models on the fused kernels (backend ``triton``) against transformers.

Without a GPU the kernels run under the Triton interpreter; fp32 dots are exact there, so
the fused path is held to the same 1e-5 as the reference.
"""

import pytest
import torch
from lxmert_testing import SMALL, hf_config, make_batch, max_abs_diff, max_scaled_diff, twins

import lxmert_fast
from lxmert_fast import CrossLayer
from lxmert_fast.layers import unfuse_names

pytest.importorskip("triton")
transformers = pytest.importorskip("transformers")
from transformers.models.lxmert.modeling_lxmert import LxmertXLayer  # noqa: E402

# Heads of 32 features: the smallest head size the fused attention serves.
FUSED = dict(SMALL, hidden_size=64, num_attention_heads=2, intermediate_size=96)


def extended(mask):
    return (1.0 - mask[:, None, None, :]) * torch.finfo(torch.float32).min


def batch_on(device, config, *args):
    """``make_batch`` (drawn on the CPU, so every device sees the same batch) moved to ``device``."""
    return {name: t.to(device) for name, t in make_batch(config, *args).items()}


@pytest.mark.parametrize(("batch", "lang_len", "num_boxes"), [(1, 1, 1), (3, 20, 36), (2, 7, 10)])
def test_cross_layer_matches_transformers_forward_and_gradients(batch, lang_len, num_boxes, kernel_device):
    config = hf_config(**FUSED)
    hf = LxmertXLayer(config).eval()
    ours = CrossLayer(config).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    hf, ours = hf.to(kernel_device), ours.to(kernel_device)
    masks = batch_on(kernel_device, config, batch, lang_len, num_boxes, True, True)
    lm, vm = extended(masks["attention_mask"]), extended(masks["visual_attention_mask"])
    lang = torch.randn(batch, lang_len, 64, device=kernel_device, requires_grad=True)
    vis = torch.randn(batch, num_boxes, 64, device=kernel_device, requires_grad=True)
    results = []
    for layer, backend in ((hf, "reference"), (ours, "triton")):
        lang.grad = vis.grad = None
        with lxmert_fast.use_backend(backend):
            out = layer(lang, lm, vis, vm)
        (out[0].square().mean() + out[1].tanh().sum()).backward()
        # Parameter gradients by transformers' name (ours: fused Q/K/V split in its slices).
        grads = unfuse_names((name, p.grad) for name, p in layer.named_parameters())
        results.append([*out, lang.grad.clone(), vis.grad.clone(), *(grads[name] for name in sorted(grads))])
    assert max_abs_diff(results[0][:2], results[1][:2]) <= 1e-5
    assert max_scaled_diff(results[0], results[1]) <= 1e-5


def test_whole_pretraining_model_on_fused_kernels_matches_transformers(kernel_device):
    hf, ours = twins("LxmertForPreTraining", lxmert_fast.LxmertForPreTraining, **FUSED)
    hf, ours = hf.to(kernel_device), ours.to(kernel_device)
    inputs = batch_on(kernel_device, hf.config, 2, 9, 12, True, True)
    with torch.no_grad(), lxmert_fast.use_backend("triton"):
        b = ours(**inputs, output_hidden_states=True, return_dict=False)
    with torch.no_grad():
        a = hf(**inputs, output_hidden_states=True, return_dict=False)
    assert max_abs_diff(a, b) <= 1e-5


def test_output_attentions_uses_the_reference_under_triton(kernel_device):
    hf, ours = twins("LxmertModel", lxmert_fast.LxmertModel, **FUSED)
    hf, ours = hf.to(kernel_device), ours.to(kernel_device)
    inputs = batch_on(kernel_device, hf.config, 2, 5, 6, True, False)
    with torch.no_grad(), lxmert_fast.use_backend("triton"):
        b = ours(**inputs, output_attentions=True, return_dict=False)
    with torch.no_grad():
        a = hf(**inputs, output_attentions=True, return_dict=False)
    assert max_abs_diff(a, b) <= 1e-5


def test_training_step_on_fused_kernels_runs_and_is_seeded(kernel_device):
    torch.manual_seed(0)
    config = lxmert_fast.LxmertConfig(**dict(FUSED, l_layers=1, x_layers=1, r_layers=1))
    model = lxmert_fast.LxmertForPreTraining(config).train().to(kernel_device)
    inputs = batch_on(kernel_device, model.config, 2, 6, 5, True, False)
    matched_label = torch.tensor([1, 0], device=kernel_device)
    losses = []
    for _ in range(2):
        torch.manual_seed(1)
        with lxmert_fast.use_backend("triton"):
            out = model(**inputs, matched_label=matched_label)
        out.loss.backward()
        losses.append(out.loss.item())
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        model.zero_grad()
    assert losses[0] == losses[1]
