"""Fused visual embedding vs eager PyTorch (lxmert_fast.reference), forward + backward.

bf16, LXMERT pre-training shapes: B in {32, 256} images x 36 objects, 2048 -> 768, dropout
0.1 (training). The RoI features are data (no gradient), as in pre-training; every weight,
bias and the boxes get gradients. Peak memory above the inputs goes to
``benchmark.extra_info["peak_mib"]``. Needs CUDA: the fused kernels are Triton.

The benchmark's mean is wall time; ``extra_info`` adds ``device_ms`` (one step inside a captured
CUDA graph, benchmarks/conftest.py ``device_time``) and the bandwidth of the bytes a step must move
against a ``clone()`` of as many bytes (``gbps``, ``clone_gbps``, ``pct_of_clone``): the features
twice (forward GEMM and the weight gradient's), the output and its gradient, the 2048x768 weight
and its gradient. The step is GEMM-bound, so this says how far it is from memory-bound, not a
target.

The bound that matters is the GEMMs': ``test_visual_embedding_gemm_bound`` (B=256) times only the
cuBLAS work the fused step must do — the forward ``addmm`` 2048 -> 768 and, in the backward,
``dW_v = dprojᵀ·features`` (plus ``d features = dproj·W_v`` when the features need a gradient,
which here, as in pre-training, they do not) — and the fused step in the same run, and records
``fused_device_ms`` and ``fused_over_gemms`` (fused fwd+bwd device time / GEMM-only device time;
1.0 would be every non-GEMM kernel hidden) in ``extra_info``, which benchmarks/summarize.py
prints.
"""

from __future__ import annotations

import pytest
import torch

from lxmert_fast import reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: the fused kernel is Triton and timing needs a device",
)

OBJECTS, FEAT_DIM, HIDDEN, POS_DIM = 36, 2048, 768, 4
DROPOUT_P = 0.1
EPS = 1e-12
DTYPE = torch.bfloat16


def _inputs(batch: int) -> list[torch.Tensor]:
    def param(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        t = torch.randn(*shape, device="cuda") * scale + shift
        return t.to(DTYPE).requires_grad_()

    return [
        torch.randn(batch, OBJECTS, FEAT_DIM, device="cuda", dtype=DTYPE),
        torch.rand(batch, OBJECTS, POS_DIM, device="cuda").to(DTYPE).requires_grad_(),
        param(HIDDEN, FEAT_DIM, scale=FEAT_DIM**-0.5),
        param(HIDDEN, scale=0.1),
        param(HIDDEN, scale=0.1, shift=1.0),
        param(HIDDEN, scale=0.1),
        param(HIDDEN, POS_DIM, scale=0.5),
        param(HIDDEN, scale=0.1),
        param(HIDDEN, scale=0.1, shift=1.0),
        param(HIDDEN, scale=0.1),
    ]


def _gemms(inputs: list[torch.Tensor], grad_out: torch.Tensor):
    """The cuBLAS calls of the fused step (kernels/visual_embedding.py's forward and ``_backward``)
    on the same tensors, the upstream gradient standing in for the row kernel's ``dproj``."""
    features, weight, bias = inputs[0], inputs[2].detach(), inputs[3].detach()
    rows = features.reshape(-1, FEAT_DIM)
    dproj = grad_out.reshape(-1, HIDDEN)

    def run() -> None:
        torch.nn.functional.linear(rows, weight, bias)
        dproj.t() @ rows
        if features.requires_grad:
            dproj @ weight

    return run


def _implementation(name: str):
    if name == "eager":
        return reference.visual_embedding
    from lxmert_fast.kernels.visual_embedding import visual_embedding

    return visual_embedding


@pytest.mark.parametrize("batch", [32, 256])
@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_visual_embedding_fwd_bwd(benchmark, device_time, impl, batch):
    fn = _implementation(impl)
    inputs = _inputs(batch)
    grad_out = torch.randn(batch, OBJECTS, HIDDEN, device="cuda", dtype=DTYPE)

    def run() -> None:
        fn(*inputs, EPS, DROPOUT_P).backward(grad_out)

    def step() -> None:
        run()
        torch.cuda.synchronize()

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    benchmark.extra_info["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    benchmark.extra_info["rows"] = batch * OBJECTS
    features, weight = inputs[0], inputs[2]
    size = features.element_size()
    device_time(run, (2 * features.numel() + 2 * grad_out.numel() + 2 * weight.numel()) * size)
    benchmark.pedantic(step, rounds=50, iterations=1, warmup_rounds=5)


def test_visual_embedding_gemm_bound(benchmark, device_time):
    """The GEMMs alone at B=256, and the fused step's device time over theirs."""
    fused = _implementation("fused")
    batch = 256
    inputs = _inputs(batch)
    grad_out = torch.randn(batch, OBJECTS, HIDDEN, device="cuda", dtype=DTYPE)
    gemms = _gemms(inputs, grad_out)

    def step() -> None:
        gemms()
        torch.cuda.synchronize()

    # device_time records its last call as this case's device_ms: the fused step first.
    fused_ms = device_time(lambda: fused(*inputs, EPS, DROPOUT_P).backward(grad_out))
    fused_method = benchmark.extra_info["device_time_method"]
    gemm_ms = device_time(gemms)
    benchmark.extra_info.update(
        {
            "rows": batch * OBJECTS,
            "fused_device_ms": round(fused_ms, 5),
            "fused_device_time_method": fused_method,
            "fused_over_gemms": round(fused_ms / gemm_ms, 3),
        }
    )
    benchmark.pedantic(step, rounds=50, iterations=1, warmup_rounds=5)
