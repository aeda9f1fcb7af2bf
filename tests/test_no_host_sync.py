"""No host read of a device tensor inside the training step (issue #11).

Every ``.item()``, ``float()``, ``int()``, ``bool()`` or ``.tolist()`` of a GPU tensor stalls the
host until the GPU catches up and makes CUDA-graph capture impossible. These tests run the model
on the ``meta`` device, which stands in for an accelerator here: the values do not exist, and a
guard makes every host read of a non-CPU tensor raise, naming the call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from lxmert_testing import SMALL, make_batch

import lxmert_fast
from lxmert_fast.checks import check_values_in_range

HOST_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def host_reads_forbidden() -> Iterator[None]:
    """Make every host read of a non-CPU tensor's values raise AssertionError."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def guarded(name: str):
        original = originals[name]

        def read(self, *args, **kwargs):
            if self.device.type != "cpu":
                raise AssertionError(
                    f"Tensor.{name}() on a {self.device.type} tensor: a host sync in the step"
                )
            return original(self, *args, **kwargs)

        return read

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, guarded(name))
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def meta_batch(config, batch: int = 2, words: int = 6, boxes: int = 5) -> dict:
    inputs = {k: v.to("meta") for k, v in make_batch(config, batch, words, boxes, True, False).items()}
    long = dict(dtype=torch.long, device="meta")
    ones = torch.ones(batch, boxes, device="meta")
    inputs.update(
        labels=torch.zeros(batch, words, **long),
        matched_label=torch.zeros(batch, **long),
        ans=torch.zeros(batch, **long),
        obj_labels={
            "obj": (torch.zeros(batch, boxes, **long), ones),
            "attr": (torch.zeros(batch, boxes, **long), ones),
            "feat": (torch.zeros(batch, boxes, config.visual_feat_dim, device="meta"), ones),
        },
        # The sparse heads' positions, as train.py passes them (their checks must not read either).
        mlm_positions=torch.arange(batch * words, device="meta"),
        feat_positions=torch.arange(batch * boxes, device="meta"),
    )
    return inputs


def test_the_guard_catches_host_reads():
    t = torch.zeros(3, device="meta")
    with host_reads_forbidden():
        for read in (lambda: t.sum().item(), lambda: float(t[0]), lambda: bool(t.any()), lambda: t.tolist()):
            with pytest.raises(AssertionError, match="host sync"):
                read()
        assert torch.zeros(2).sum().item() == 0.0  # CPU tensors are host memory: allowed


@pytest.mark.parametrize("check_inputs", [True, False], ids=["checked", "unchecked"])
def test_forward_six_losses_and_backward_never_read_device_values(check_inputs):
    config = lxmert_fast.LxmertConfig(**SMALL)
    model = lxmert_fast.LxmertForPreTraining(config).train().to("meta")
    model.lxmert.check_inputs = check_inputs
    inputs = meta_batch(config)
    with host_reads_forbidden():
        out = model(**inputs)
        assert set(out.losses) == {"mlm", "matched", "obj", "attr", "feat", "qa"}
        out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_device_value_checks_are_device_assertions():
    boxes = torch.rand(2, 3, 4, device="meta")
    with host_reads_forbidden():
        check_values_in_range("visual_pos", boxes, 0.0, 1.0, expected="expected boxes in [0, 1]")


@pytest.mark.parametrize(
    ("values", "found"),
    [([0.5, 2.0], r"values in \[0.5, 2\]"), ([0.5, float("nan")], "1 NaN values")],
    ids=["out-of-range", "nan"],
)
def test_cpu_value_checks_name_what_they_found(values, found):
    with pytest.raises(ValueError, match=rf"visual_pos: expected boxes in \[0, 1\], got {found}"):
        check_values_in_range(
            "visual_pos", torch.tensor(values), 0.0, 1.0, expected="expected boxes in [0, 1]"
        )


def test_nan_boxes_are_rejected_by_the_model():
    config = lxmert_fast.LxmertConfig(**SMALL)
    model = lxmert_fast.LxmertModel(config).eval()
    inputs = make_batch(config, 2, 6, 5, True, False)
    inputs["visual_pos"][1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"visual_pos: expected boxes normalised to .* got 1 NaN values"):
        model(**inputs)


def test_value_checks_stay_in_the_compiled_graph():
    config = lxmert_fast.LxmertConfig(**SMALL)
    model = lxmert_fast.LxmertModel(config).eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    inputs = make_batch(config, 2, 6, 5, True, False)
    with torch.no_grad():
        compiled(**inputs)
        inputs["visual_pos"] = inputs["visual_pos"] * 640
        with pytest.raises(RuntimeError, match="visual_pos: expected boxes normalised"):
            compiled(**inputs)
