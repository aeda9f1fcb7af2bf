"""torch.compile traces the masked-object input path: the C++ RoI op and the visual embedding."""

import pytest
import torch
from lxmert_testing import SMALL

from lxmert_fast import LxmertConfig, ops
from lxmert_fast.layers import VisualFeatureEncoder


class MaskedVisualInput(torch.nn.Module):
    """Corrupt RoI features (masked-object pre-training), then embed them with their boxes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = VisualFeatureEncoder(LxmertConfig(**SMALL))

    def forward(self, feats: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        masked, action = ops.roi_feature_mask(feats, seed=11, offset=0)
        return self.embed(masked, boxes), action


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_module_using_both_ops_matches_eager(backend):
    torch._dynamo.reset()
    module = MaskedVisualInput().eval()
    feats, boxes = torch.randn(3, 36, SMALL["visual_feat_dim"]), torch.rand(3, 36, 4)
    expected, expected_action = module(feats, boxes)
    got, action = torch.compile(module, backend=backend)(feats, boxes)
    assert torch.equal(action, expected_action)
    assert torch.allclose(got, expected, atol=1e-5)


def test_compiled_training_step_has_gradients():
    torch._dynamo.reset()
    module = MaskedVisualInput().train()
    compiled = torch.compile(module, backend="aot_eager")
    out, _ = compiled(torch.randn(2, 36, SMALL["visual_feat_dim"]), torch.rand(2, 36, 4))
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
