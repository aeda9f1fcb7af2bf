"""One cross-modality layer: lxmert_fast.CrossLayer vs transformers' LxmertXLayer, same weights.

Paper shapes: hidden 768, 12 heads, FFN 3072, 20 words, 36 objects, bf16 weights and
activations, batch 32 (fine-tuning, launch-bound) and 256 (pre-training). ``CrossLayer``
runs with backend ``triton``, i.e. the fused Triton cross-attention and residual+dropout+
LayerNorm kernels and SDPA self-attention, whatever ``auto``'s recorded policy picks today
(lxmert_fast.backend.MEASUREMENTS): this benchmark measures the fused layer. The language stream is padded (a language mask in
transformers' extended form [B, 1, 1, 20]); the 36 boxes are all present (no vision mask),
as in pre-training.

Modes: ``forward`` = inference (eval mode, no autograd); ``forward_backward`` = a training
step of the layer (train mode, dropout 0.1): forward, then backward from fixed output
gradients into both inputs and every parameter (``zero_grad(set_to_none=True)`` first).
Target (issue 3): ``forward_backward`` at B=256 at least 2x faster than transformers'.

``extra_info``: ``peak_memory_mib`` (allocation peak of one step above the layer, inputs
and output gradients), ``device``, ``device_ms`` (one step inside a captured CUDA graph,
benchmarks/conftest.py ``device_time``; the benchmark's mean is wall time). No bandwidth figure:
a layer of GEMMs is bound by its FLOPs, and its per-kernel bytes are in the kernels' benchmarks.

Run: ``pytest benchmarks/bench_cross_layer.py --benchmark-only`` (skips without CUDA).
"""

from __future__ import annotations

import pytest
import torch

from lxmert_fast import CrossLayer, use_backend

transformers = pytest.importorskip("transformers")
from transformers.models.lxmert.modeling_lxmert import LxmertXLayer  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: CrossLayer's fused kernels are Triton (the interpreter would time Python)",
)

LANG_LEN, NUM_BOXES = 20, 36
DTYPE = torch.bfloat16
IMPLS = {"ours": CrossLayer, "transformers": LxmertXLayer}


def _make_step(impl: str, batch: int, mode: str):
    device = torch.device("cuda")
    config = transformers.LxmertConfig()
    torch.manual_seed(0)
    with device:
        reference = LxmertXLayer(config)
        layer = IMPLS[impl](config)
    layer.load_state_dict(reference.state_dict(), strict=True)
    del reference
    training = mode == "forward_backward"
    layer = layer.to(DTYPE).train(training)

    hidden = config.hidden_size
    lang = torch.randn(batch, LANG_LEN, hidden, device=device, dtype=DTYPE, requires_grad=training)
    visual = torch.randn(batch, NUM_BOXES, hidden, device=device, dtype=DTYPE, requires_grad=training)
    lengths = torch.randint(5, LANG_LEN + 1, (batch, 1), device=device)
    keep = (torch.arange(LANG_LEN, device=device) < lengths).to(DTYPE)
    lang_mask = ((1.0 - keep) * torch.finfo(DTYPE).min)[:, None, None, :]
    grads = (torch.randn_like(lang), torch.randn_like(visual))

    def run() -> None:
        with use_backend("triton"):
            if training:
                layer.zero_grad(set_to_none=True)
                lang.grad = visual.grad = None
                torch.autograd.backward(layer(lang, lang_mask, visual, None)[:2], grads)
            else:
                with torch.no_grad():
                    layer(lang, lang_mask, visual, None)

    def step() -> None:
        run()
        torch.cuda.synchronize(device)

    return step, run, device


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("batch", [32, 256])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_cross_layer(benchmark, peak_memory_mib, device_time, impl, batch, mode):
    step, run, device = _make_step(impl, batch, mode)
    step()
    benchmark.group = f"cross layer {mode} B={batch} bf16"
    benchmark.extra_info.update(
        {
            "batch": batch,
            "dtype": "bf16",
            "peak_memory_mib": peak_memory_mib(step, device),
            "device": torch.cuda.get_device_name(device),
        }
    )
    device_time(run)
    benchmark.pedantic(step, rounds=40, warmup_rounds=5)
