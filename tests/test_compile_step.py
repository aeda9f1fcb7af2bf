"""The whole pre-training step traces as ONE graph: ``torch.compile(fullgraph=True)`` of the forward
with all six losses and sparse heads, its backward through AOTAutograd (issue #11).

``fullgraph=True`` turns any graph break (a host read, an untraceable call, a Python op the compiler
cannot see) into an error, which is what CUDA-graph capture of the step needs. ``aot_eager`` runs
the traced graphs with eager kernels, so the random streams are eager's: with the same
``torch.manual_seed`` the compiled step must equal the eager one exactly, and two steps without a
reseed must draw different dropout masks.
"""

from __future__ import annotations

import pytest
import torch
from lxmert_testing import SMALL, make_batch

import lxmert_fast
from lxmert_fast import pretraining as pt

CONFIG = dict(SMALL, l_layers=1, x_layers=1, r_layers=1)
BATCH, WORDS, BOXES = 3, 7, 5


def step_inputs(config: lxmert_fast.LxmertConfig, device: torch.device) -> dict:
    """A pre-training batch with every label and the sparse heads' positions, as train.py builds it."""
    g = torch.Generator().manual_seed(3)
    inputs = make_batch(config, BATCH, WORDS, BOXES, True, False, seed=3)
    labels = torch.where(torch.rand(BATCH, WORDS, generator=g) < 0.3, inputs["input_ids"], -1)
    selected = torch.rand(BATCH, BOXES, generator=g) < 0.4
    inputs.update(
        labels=labels,
        matched_label=torch.tensor([1, 0, 1]),
        ans=torch.tensor([2, -1, 5]),
        obj_labels={
            "obj": (
                torch.randint(0, config.num_object_labels, (BATCH, BOXES), generator=g),
                torch.rand(BATCH, BOXES),
            ),
            "attr": (
                torch.randint(0, config.num_attr_labels, (BATCH, BOXES), generator=g),
                torch.rand(BATCH, BOXES),
            ),
            "feat": (torch.randn(BATCH, BOXES, config.visual_feat_dim, generator=g), selected.float()),
        },
        mlm_positions=pt.flat_positions(labels >= 0, pt.position_budget(labels.numel(), 0.3)),
        feat_positions=pt.flat_positions(selected, pt.position_budget(selected.numel(), 0.4)),
    )

    def to(x):
        if isinstance(x, torch.Tensor):
            return x.to(device)
        return {k: to(v) for k, v in x.items()} if isinstance(x, dict) else tuple(to(v) for v in x)

    return {k: to(v) for k, v in inputs.items()}


def run_step(step, model, inputs, seed: int | None) -> tuple[dict, list]:
    """Losses and parameter gradients of one step (reseeded first unless ``seed`` is None)."""
    if seed is not None:
        torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    loss, losses = step(model, inputs)
    loss.backward()
    return {k: v.detach() for k, v in losses.items()}, [p.grad.clone() for p in model.parameters()]


def training_step(model, inputs):
    out = model(**inputs)
    return pt.weighted_loss(out.losses, pt.AUTHORS_LOSS_WEIGHTS), out.losses


@pytest.fixture(scope="module")
def compiled_step():
    torch._dynamo.reset()
    return torch.compile(training_step, backend="aot_eager", fullgraph=True)


def check_compiled_equals_eager(
    compiled_step, backend: str, device: torch.device, config: lxmert_fast.LxmertConfig | None = None
) -> None:
    config = config or lxmert_fast.LxmertConfig(**CONFIG)
    model = lxmert_fast.LxmertForPreTraining(config).to(device).train()
    model.lxmert.check_inputs = False  # train.py checks batches on the host
    inputs = step_inputs(config, device)
    with lxmert_fast.use_backend(backend):
        eager_losses, eager_grads = run_step(training_step, model, inputs, seed=7)
        losses, grads = run_step(compiled_step, model, inputs, seed=7)
        again, _ = run_step(compiled_step, model, inputs, seed=None)
    assert set(losses) == {"mlm", "matched", "obj", "attr", "feat", "qa"}
    for key, value in eager_losses.items():
        assert torch.equal(losses[key], value), key
    for (name, _), a, b in zip(model.named_parameters(), eager_grads, grads, strict=True):
        assert torch.equal(a, b), name
    # No reseed: the next step's dropout draws differ, so its losses do too.
    assert not torch.equal(again["mlm"], losses["mlm"])


def test_full_step_compiles_fullgraph_on_the_reference_ops(compiled_step):
    check_compiled_equals_eager(compiled_step, "reference", torch.device("cpu"))


# Heads of 32 features: the smallest head size the fused cross-attention serves.
FUSED = dict(CONFIG, hidden_size=64, num_attention_heads=2, intermediate_size=96)


def test_full_step_compiles_fullgraph_on_the_fused_kernels(kernel_device):
    # Every Triton kernel is a custom op whose seed is drawn on the device: the step with the
    # fused kernels traces as one graph too, and equals its eager run under the same seed.
    torch._dynamo.reset()
    compiled = torch.compile(training_step, backend="aot_eager", fullgraph=True)
    config = lxmert_fast.LxmertConfig(**FUSED)
    check_compiled_equals_eager(compiled, "triton", kernel_device, config)
