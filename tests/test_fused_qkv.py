"""Q, K and V as one [3*hidden, hidden] parameter per attention module, saved and loaded under
transformers' and the authors' names (query.weight, key.weight, value.weight, their biases)."""

import pytest
import torch
from lxmert_testing import SMALL, hf_config, make_batch
from torch.overrides import TorchFunctionMode

from lxmert_fast import CheckpointError, LxmertConfig, LxmertForPreTraining
from lxmert_fast.checkpoint import load_state_dict_strict
from lxmert_fast.layers import Attention, unfuse_names

transformers = pytest.importorskip("transformers")

KEY = "lxmert.encoder.x_layers.0.visual_attention.att.key.weight"


@pytest.fixture(scope="module")
def hf():
    torch.manual_seed(0)
    return transformers.LxmertForPreTraining(hf_config(**SMALL)).eval()


def fresh():
    return LxmertForPreTraining(LxmertConfig(**SMALL)).eval()


def assert_same_weights(ours, hf):
    theirs = hf.state_dict()
    mine = ours.state_dict()
    assert list(mine) == list(theirs)
    for name, value in theirs.items():
        assert torch.equal(mine[name], value), name


def test_attention_holds_one_fused_parameter_and_no_linears():
    attention = Attention(LxmertConfig(**SMALL))
    hidden = SMALL["hidden_size"]
    assert {name: tuple(p.shape) for name, p in attention.named_parameters()} == {
        "qkv_weight": (3 * hidden, hidden),
        "qkv_bias": (3 * hidden,),
    }
    assert not list(attention.children())


def test_state_dict_has_transformers_names_in_their_order(hf):
    ours = fresh()
    assert list(ours.state_dict()) == list(hf.state_dict())
    assert not any("qkv" in name for name in ours.state_dict())
    # The saved slices are views of the fused parameter (as a plain parameter's entry is itself).
    att = ours.lxmert.encoder.x_layers[0].visual_attention.att
    state = ours.state_dict()
    assert state[KEY].data_ptr() == att.qkv_weight[SMALL["hidden_size"] :].data_ptr()


def test_transformers_weights_round_trip_strictly(hf):
    ours = fresh()
    ours.load_state_dict(hf.state_dict(), strict=True)
    assert_same_weights(ours, hf)
    back = transformers.LxmertForPreTraining(hf_config(**SMALL)).eval()
    back.load_state_dict(ours.state_dict(), strict=True)
    assert_same_weights(ours, back)
    # named_parameters (fused) map back to the same tensors under transformers' names.
    named = unfuse_names(ours.named_parameters())
    for name, value in hf.named_parameters():
        assert torch.equal(named[name], value), name


def test_authors_pth_loads_into_the_fused_parameters(tmp_path, hf):
    state = {
        "module." + ("bert." + k[len("lxmert.") :] if k.startswith("lxmert.") else k): v
        for k, v in hf.state_dict().items()
    }
    torch.save(state, tmp_path / "Epoch20_LXRT.pth")
    ours = LxmertForPreTraining.from_pretrained(tmp_path / "Epoch20_LXRT.pth", config=LxmertConfig(**SMALL))
    assert_same_weights(ours, hf)


def test_missing_and_misshaped_parts_are_named_as_transformers_names(hf):
    state = dict(hf.state_dict())
    del state[KEY]
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\):\n  " + KEY.replace(".", r"\.") + "$"):
        load_state_dict_strict(fresh(), state)
    with pytest.raises(RuntimeError, match="Missing key") as info:
        fresh().load_state_dict(state, strict=True)
    assert KEY in str(info.value) and "qkv" not in str(info.value)

    # Non-strict: the missing slice keeps its value, everything else loads; only the part is missing.
    ours = fresh()
    before = ours.lxmert.encoder.x_layers[0].visual_attention.att.qkv_weight.detach().clone()
    result = ours.load_state_dict(state, strict=False)
    assert result.missing_keys == [KEY] and result.unexpected_keys == []
    mine = ours.state_dict()
    assert torch.equal(mine[KEY], before[SMALL["hidden_size"] : 2 * SMALL["hidden_size"]])
    for name, value in state.items():
        assert torch.equal(mine[name], value), name

    state = dict(hf.state_dict())
    bias = KEY.replace("weight", "bias")
    state[bias] = torch.zeros(SMALL["hidden_size"] + 1)
    with pytest.raises(CheckpointError, match=r"mis-shaped key\(s\):\n  " + bias.replace(".", r"\.")):
        load_state_dict_strict(fresh(), state)
    with pytest.raises(RuntimeError, match="size mismatch for " + bias.replace(".", r"\.")):
        fresh().load_state_dict(state)


class CountWeightCats(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.weight_cats = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.cat, torch.concat, torch.concatenate):
            tensors = args[0] if args else kwargs.get("tensors", ())
            self.weight_cats += any(isinstance(t, torch.nn.Parameter) for t in tensors)
        return func(*args, **kwargs)


def test_no_forward_or_backward_concatenates_weights():
    ours = fresh().train()
    inputs = make_batch(ours.config, 2, 7, 5, True, True)
    with CountWeightCats() as mode:
        out = ours(**inputs, output_attentions=True)
        (out.prediction_logits.sum() + out.cross_relationship_score.sum()).backward()
    assert mode.weight_cats == 0
