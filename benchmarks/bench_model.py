"""Whole-model training step: lxmert_fast.LxmertForPreTraining vs transformers', same weights.

One step = ``zero_grad`` + forward with all pre-training labels (the six losses) + backward
of the summed loss, in train mode (dropout on). Both models hold the same weights (ours
loads transformers' state dict, ``strict=True``) and see the same batch, so the ratio of
their times is the cost of the implementation alone.

Cases (``case`` parameter):

* ``cpu-small-b8``: hidden 256, 4 heads, FFN 1024, 2/2/2 language/cross/vision layers, the
  paper's vocabulary and label heads, batch 8, 20 words, 36 objects, fp32. Runs anywhere;
  on the CPU our model uses the reference ops (backend ``auto``). Before timing, the
  eval-mode losses of both models are checked to agree (same weights, same work).
* ``cuda-paper-b32`` / ``cuda-paper-b256``: transformers' default (paper) config — hidden
  768, 12 heads, 9/5/5 layers — with bf16 weights and inputs, fine-tuning and pre-training
  batch sizes. Our model runs backend ``auto``: the fast paths that lxmert_fast.backend's recorded
  policy enables on CUDA (``LXMERT_FAST_BACKEND=triton`` times every fused path). Skipped without CUDA.

``test_model_step`` times one implementation per test (``impl`` = ours | transformers), so
the pair's means sit side by side in the report. ``test_model_step_interleaved`` times both
in the same test, alternating which goes first each round, so load changes on a shared
machine hit both alike; its ``extra_info["ratio"]`` is the median over rounds of
t(ours) / t(transformers) (below 1: ours is faster), printed as well.

``extra_info``: ``threads`` (CPU cases: torch threads, see conftest.py), ``peak_memory_mib``
(CUDA: allocation peak of one step above the models, batch and gradients), ``device``.

Run: ``pytest benchmarks/bench_model.py --benchmark-only``.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import pytest
import torch

import lxmert_fast

transformers = pytest.importorskip("transformers")

LANG_LEN, NUM_BOXES = 20, 36
SMALL = dict(
    hidden_size=256, num_attention_heads=4, intermediate_size=1024, l_layers=2, x_layers=2, r_layers=2
)
NO_CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the paper-config cases need a CUDA GPU (bf16, fused kernels)"
)
# case -> (config overrides, batch, device, dtype, timed rounds, warm-up rounds)
CASES = {
    "cpu-small-b8": (SMALL, 8, "cpu", torch.float32, 10, 2),
    "cuda-paper-b32": ({}, 32, "cuda", torch.bfloat16, 30, 5),
    "cuda-paper-b256": ({}, 256, "cuda", torch.bfloat16, 15, 3),
}
CASE_PARAMS = [pytest.param(name, marks=[NO_CUDA] if name.startswith("cuda") else []) for name in CASES]


@functools.cache
def _models(case: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(transformers' model, ours) with identical weights, in train mode, on the case's device."""
    overrides, _, device, dtype, _, _ = CASES[case]
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.LxmertForPreTraining(transformers.LxmertConfig(**overrides))
        ours = lxmert_fast.LxmertForPreTraining(lxmert_fast.LxmertConfig(**overrides))
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf.to(dtype).train(), ours.to(dtype).train()


@functools.cache
def _batch(case: str) -> dict:
    """Inputs and all pre-training labels: padded sentences, 36 boxes, ~15% masked tokens/objects."""
    _, batch, device, dtype, _, _ = CASES[case]
    config = _models(case)[0].config
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, LANG_LEN + 1, (batch, 1), generator=g)
    mlm = torch.randint(0, config.vocab_size, (batch, LANG_LEN), generator=g)
    mlm[torch.rand(batch, LANG_LEN, generator=g) > 0.15] = -100
    mlm[:, 0] = 3
    feats = torch.randn(batch, NUM_BOXES, config.visual_feat_dim, generator=g)
    inputs = {
        "input_ids": torch.randint(1, config.vocab_size, (batch, LANG_LEN), generator=g),
        "attention_mask": (torch.arange(LANG_LEN) < lengths).float(),
        "token_type_ids": torch.zeros(batch, LANG_LEN, dtype=torch.long),
        "visual_feats": feats.to(dtype),
        "visual_pos": torch.rand(batch, NUM_BOXES, config.visual_pos_dim, generator=g).to(dtype),
        "labels": mlm,
        "matched_label": torch.randint(0, 2, (batch,), generator=g),
        "ans": torch.randint(0, config.num_qa_labels, (batch,), generator=g),
        "obj_labels": {
            "obj": (
                torch.randint(0, config.num_object_labels, (batch, NUM_BOXES), generator=g),
                torch.rand(batch, NUM_BOXES, generator=g).to(dtype),
            ),
            "attr": (
                torch.randint(0, config.num_attr_labels, (batch, NUM_BOXES), generator=g),
                torch.rand(batch, NUM_BOXES, generator=g).to(dtype),
            ),
            "feat": (feats.to(dtype), (torch.rand(batch, NUM_BOXES, generator=g) < 0.15).to(dtype)),
        },
    }

    def to_device(x):
        if isinstance(x, dict):
            return {k: to_device(v) for k, v in x.items()}
        if isinstance(x, tuple):
            return tuple(to_device(v) for v in x)
        return x.to(device)

    return to_device(inputs)


def _step(model: torch.nn.Module, inputs: dict, device: torch.device) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def _check_same_loss(case: str) -> None:
    """Eval-mode losses agree: both models do the same work on the same batch."""
    hf, ours = _models(case)
    inputs = _batch(case)
    with torch.no_grad():
        a = hf.eval()(**inputs).loss.item()
        b = ours.eval()(**inputs).loss.item()
    hf.train(), ours.train()
    assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), f"{case}: loss {b} (ours) vs {a} (transformers)"


def _setup(case: str, request: pytest.FixtureRequest) -> torch.device:
    device = torch.device(CASES[case][2])
    if device.type == "cpu":
        request.getfixturevalue("cpu_threads")
        _check_same_loss(case)
    return device


def _record_common(benchmark, case: str, device: torch.device) -> None:
    overrides, batch, _, dtype, _, _ = CASES[case]
    benchmark.extra_info.update(
        {
            "batch": batch,
            "dtype": str(dtype).removeprefix("torch."),
            "config": overrides or "paper",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        }
    )
    if device.type == "cpu":
        benchmark.extra_info["threads"] = torch.get_num_threads()


@pytest.mark.parametrize("impl", ["ours", "transformers"])
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_model_step(benchmark, request, peak_memory_mib, case, impl):
    device = _setup(case, request)
    hf, ours = _models(case)
    step = _step(ours if impl == "ours" else hf, _batch(case), device)
    *_, rounds, warmup = CASES[case]
    step()
    benchmark.group = f"model fwd+bwd {case}"
    _record_common(benchmark, case, device)
    peak = peak_memory_mib(step, device)
    if peak is not None:
        benchmark.extra_info["peak_memory_mib"] = peak
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_model_step_interleaved(benchmark, request, capsys, case):
    device = _setup(case, request)
    hf, ours = _models(case)
    inputs = _batch(case)
    steps = {"ours": _step(ours, inputs, device), "transformers": _step(hf, inputs, device)}
    times: dict[str, list[float]] = {name: [] for name in steps}
    *_, rounds, warmup = CASES[case]

    def both() -> None:
        order = list(steps) if len(times["ours"]) % 2 == 0 else list(reversed(steps))
        for name in order:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)

    for _ in range(warmup):
        both()
    for series in times.values():
        series.clear()
    benchmark.group = f"model fwd+bwd {case}"
    benchmark.pedantic(both, rounds=rounds, warmup_rounds=0)

    ratio = statistics.median(o / t for o, t in zip(times["ours"], times["transformers"], strict=True))
    ours_ms, hf_ms = (statistics.median(times[name]) * 1e3 for name in ("ours", "transformers"))
    _record_common(benchmark, case, device)
    benchmark.extra_info.update(
        {"ours_ms": round(ours_ms, 3), "transformers_ms": round(hf_ms, 3), "ratio": round(ratio, 4)}
    )
    with capsys.disabled():
        print(
            f"\n[bench_model] {case}: ours {ours_ms:.1f} ms, transformers {hf_ms:.1f} ms (medians of "
            f"{rounds} interleaved rounds), ratio ours/transformers = {ratio:.3f}"
        )
