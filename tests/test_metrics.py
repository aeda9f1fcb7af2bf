"""Step metrics summed on the device, read once per window; FLOP accounting for % of peak."""

from __future__ import annotations

import pytest
import torch
from test_no_host_sync import host_reads_forbidden

import lxmert_fast
from lxmert_fast import pretraining as pt
from lxmert_fast.metrics import RunningMetrics, bf16_peak_flops, training_flops


def test_adding_never_reads_device_values():
    metrics = RunningMetrics()
    with host_reads_forbidden():
        for _ in range(3):
            metrics.add_losses({"mlm": torch.ones((), device="meta")}, weight=0.5)
            metrics.add_counts({"mlm": torch.ones(2, device="meta")})


def test_read_gives_window_means_and_accuracies_then_resets():
    metrics = RunningMetrics()
    metrics.add_losses({"mlm": torch.tensor(2.0), "qa": torch.tensor(1.0)}, weight=0.5)
    metrics.add_losses({"mlm": torch.tensor(4.0), "qa": torch.tensor(3.0)}, weight=0.5)
    metrics.add_counts({"mlm": torch.tensor([3.0, 4.0]), "qa": torch.tensor([0.0, 0.0])})
    metrics.add_counts({"mlm": torch.tensor([1.0, 4.0])})
    assert metrics.read() == {"mlm": 3.0, "qa": 2.0, "mlm_acc": 0.5}
    assert metrics.read() == {}


def paper_inputs(batch: int, words: int = 20, boxes: int = 36) -> dict:
    long = dict(dtype=torch.long)
    return dict(
        input_ids=torch.ones(batch, words, **long),
        visual_feats=torch.zeros(batch, boxes, 2048),
        visual_pos=torch.zeros(batch, boxes, 4),
        attention_mask=torch.ones(batch, words),
        token_type_ids=torch.zeros(batch, words, **long),
        labels=torch.zeros(batch, words, **long),
        matched_label=torch.zeros(batch, **long),
        ans=torch.zeros(batch, **long),
        obj_labels={
            "obj": (torch.zeros(batch, boxes, **long), torch.ones(batch, boxes)),
            "attr": (torch.zeros(batch, boxes, **long), torch.ones(batch, boxes)),
            "feat": (torch.zeros(batch, boxes, 2048), torch.ones(batch, boxes)),
        },
    )


def test_paper_training_flops_match_the_performance_model():
    # DESIGN.md §8: 35.4 GFLOP per sample, all six losses, dense MLM decoder, counted the same way.
    config = pt.build_config("paper", 30522, 2048, 9500, dict.fromkeys(("mlm", "matched", "obj", "qa"), True))
    flops = training_flops(
        lambda: lxmert_fast.LxmertForPreTraining(config), paper_inputs(4), lambda o: o.loss
    )
    assert flops / 4 == pytest.approx(35.39e9, rel=1e-3)


def test_peak_is_unknown_off_the_gpu():
    assert bf16_peak_flops(torch.device("cpu")) is None


def test_nonfinite_steps_are_kept_on_the_device_and_read_on_demand():
    metrics = RunningMetrics()
    with host_reads_forbidden():
        for step in range(3):
            metrics.add_losses({"mlm": torch.ones((), device="meta")}, weight=0.5, step=step)
    metrics = RunningMetrics()
    for step, (mlm, qa) in enumerate(
        [(1.0, 1.0), (float("nan"), 1.0), (2.0, float("inf")), (float("nan"), 1.0)]
    ):
        metrics.add_losses({"mlm": torch.tensor(mlm), "qa": torch.tensor(qa)}, step=step)
    assert metrics.first_nonfinite() == {"mlm": 1, "qa": 2}  # the first bad step of each term
    metrics.read()
    assert metrics.first_nonfinite() == {}  # a new window
