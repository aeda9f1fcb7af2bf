"""The reference ops: gradcheck in float64, explicit randomness, masking edge cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from lxmert_fast import reference
from lxmert_fast.philox import philox4x32, philox_bits

D = torch.float64


def rand(*shape, grad=True):
    return torch.randn(*shape, dtype=D, requires_grad=grad)


def test_gradcheck_bidirectional_cross_attention():
    qkv = rand(2, 3 + 4, 3 * 4)
    lang_bias = torch.tensor([[0.0, 0.0, -1e4], [0.0, 0.0, 0.0]], dtype=D)
    visual_bias = torch.tensor([[0.0, -1e4, 0.0, 0.0], [0.0, 0.0, 0.0, -1e4]], dtype=D)
    keep = (torch.rand(2, 2, 3, 4) > 0.3, torch.rand(2, 2, 4, 3) > 0.3)

    def fn(x):
        return reference.bidirectional_cross_attention(x, 3, 2, lang_bias, visual_bias, 0.3, keep)[0]

    assert torch.autograd.gradcheck(fn, (qkv,))


def test_gradcheck_self_attention():
    bias = torch.tensor([[0.0, 0.0, 0.0, -1e4, -1e4]], dtype=D)
    keep = torch.rand(1, 2, 5, 5) > 0.2
    assert torch.autograd.gradcheck(
        lambda x: reference.self_attention(x, 2, bias, 0.2, keep)[0], (rand(1, 5, 12),)
    )


def test_gradcheck_residual_dropout_layer_norm():
    keep = torch.rand(3, 5, 8) > 0.25
    args = (rand(3, 5, 8), rand(3, 5, 8), rand(8), rand(8))
    assert torch.autograd.gradcheck(
        lambda h, r, w, b: reference.residual_dropout_layer_norm(h, r, w, b, 1e-12, 0.25, keep), args
    )


def test_gradcheck_visual_embedding():
    keep = torch.rand(2, 3, 6) > 0.1
    args = (
        rand(2, 3, 5),
        rand(2, 3, 4),
        rand(6, 5),
        rand(6),
        rand(6),
        rand(6),
        rand(6, 4),
        rand(6),
        rand(6),
        rand(6),
    )
    assert torch.autograd.gradcheck(lambda *a: reference.visual_embedding(*a, 1e-12, 0.1, keep), args)


def test_cross_attention_directions_and_fully_masked_rows():
    torch.manual_seed(0)
    heads, d, lang_len, vis_len = 2, 4, 3, 5
    qkv = torch.randn(1, lang_len + vis_len, 3 * heads * d, dtype=D)
    visual_bias = torch.full((1, vis_len), float("-inf"), dtype=D)  # language rows see no key
    ctx, lang_probs, _ = reference.bidirectional_cross_attention(qkv, lang_len, heads, None, visual_bias)
    assert torch.equal(lang_probs, torch.zeros_like(lang_probs))
    assert torch.equal(ctx[:, :lang_len], torch.zeros_like(ctx[:, :lang_len]))
    assert not ctx.isnan().any()
    q, k, v = qkv.chunk(3, -1)
    # vision queries over language keys, by hand, head 0
    scores = q[0, lang_len:, :d] @ k[0, :lang_len, :d].T / math.sqrt(d)
    expected = torch.softmax(scores, -1) @ v[0, :lang_len, :d]
    assert torch.allclose(ctx[0, lang_len:, :d], expected)
    # finite finfo.min bias (transformers' convention): uniform attention, like transformers
    finite = torch.full((1, vis_len), torch.finfo(D).min, dtype=D)
    _, probs, _ = reference.bidirectional_cross_attention(qkv, lang_len, heads, None, finite)
    assert torch.allclose(probs, torch.full_like(probs, 1 / vis_len))


def test_dropout_keep_mask_is_applied_and_scaled():
    x = torch.ones(4, 6)
    keep = torch.rand(4, 6) > 0.5
    assert torch.equal(reference.dropout(x, 0.5, keep), keep.float() * 2)
    assert torch.equal(reference.dropout(x, 1.0, keep), torch.zeros_like(x))
    assert reference.dropout(x, 0.0) is x


def test_residual_layer_norm_matches_torch():
    h, r, w, b = torch.randn(3, 7, 16), torch.randn(3, 7, 16), torch.randn(16), torch.randn(16)
    expected = F.layer_norm(h + r, (16,), w, b, 1e-12)
    assert torch.equal(reference.residual_dropout_layer_norm(h, r, w, b, 1e-12), expected)


def test_philox_known_answers():
    # Random123's known-answer vectors for Philox4x32-10.
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, expected in cases:
        assert philox4x32(torch.tensor([counter]), key)[0].tolist() == list(expected)
    bits = philox_bits(7, 2**32 - 1, 3)
    assert bits.shape == (3, 4) and int(bits.min()) >= 0 and int(bits.max()) < 2**32
    assert philox_bits(7, 2**32, 1).tolist() == bits[1:2].tolist()


def test_roi_feature_mask_rule():
    b, n, d = 4, 36, 8
    features = torch.randn(b, n, d)
    bits = philox_bits(123, 0, b * n).view(b, n, 4)
    out, action = reference.roi_feature_mask(features, bits, 0.5, 0.6, 0.3)
    u0, u1 = bits[..., 0] >> 8, bits[..., 1] >> 8
    selected = u0 < reference.probability_threshold(0.5)
    assert torch.equal(action > 0, selected)
    zeroed = action == reference.ROI_ZEROED
    assert torch.equal(zeroed, selected & (u1 < reference.probability_threshold(0.6)))
    assert torch.equal(out[zeroed], torch.zeros_like(out[zeroed]))
    untouched = (action == reference.ROI_UNSELECTED) | (action == reference.ROI_KEPT)
    assert torch.equal(out[untouched], features[untouched])
    flat = features.reshape(b * n, d)
    for img, obj in (action == reference.ROI_REPLACED).nonzero().tolist():
        matches = (flat == out[img, obj]).all(-1).nonzero().flatten().tolist()
        assert matches and all(m // n != img for m in matches), "replacement must come from another image"


def test_roi_feature_mask_single_image_keeps_replaced_objects():
    features = torch.randn(1, 36, 4)
    out, action = reference.roi_feature_mask(features, philox_bits(5, 0, 36).view(1, 36, 4), 1.0, 0.0, 1.0)
    assert (action == reference.ROI_REPLACED).all()
    assert torch.equal(out, features)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_roi_feature_mask_probability_extremes(p):
    features = torch.randn(3, 10, 4)
    _, action = reference.roi_feature_mask(features, philox_bits(1, 0, 30).view(3, 10, 4), p, 1.0, 0.0)
    assert bool((action > 0).all()) is (p == 1.0) and bool((action == 0).all()) is (p == 0.0)
