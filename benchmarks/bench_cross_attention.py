"""Bidirectional cross-attention: fused Triton kernel vs reference vs two SDPA calls.

Pre-training shapes (20 words, 36 objects, 12 heads x 64, bf16) at batch 32 (fine-tuning,
launch-bound) and 256 (pre-training). ``forward`` is inference (no dropout); ``forward_backward``
is a training step of the op (attention dropout 0.1, d(qkv) only). All three start from the
same fused ``qkv`` [B, 56, 2304] and end with the context [B, 56, 768] in token order, so the
SDPA variant pays for its head split and merge copies, as a model using it would.
``benchmark.extra_info["peak_memory_mib"]`` is the peak allocation of one step above the inputs.
The benchmark's mean is wall time; ``extra_info`` adds ``device_ms`` (one step inside a captured
CUDA graph, benchmarks/conftest.py ``device_time``) and the bandwidth of the bytes a step must
move against a ``clone()`` of as many bytes (``gbps``, ``clone_gbps``, ``pct_of_clone``). With
A = one [B, 56, 768] bf16 tensor: ``forward`` 4A (qkv 3A in, context A out; the [B, 20] bias is
noise); ``forward_backward`` 12A (forward, then qkv 3A, context A and its gradient A in, d(qkv) 3A
out).

Run: ``pytest benchmarks/bench_cross_attention.py --benchmark-only`` (skips without CUDA).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lxmert_fast import reference
from lxmert_fast.kernels import cross_attention as xattn

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="benchmarks need a CUDA GPU (the interpreter would time Python)"
)

LANG_LEN, VIS_LEN, HEADS, HEAD_DIM = 20, 36, 12, 64
DTYPE = torch.bfloat16


def _fused(qkv, lang_bias, visual_bias, p):
    return xattn.cross_attention(qkv, LANG_LEN, HEADS, lang_bias, visual_bias, p)


def _reference(qkv, lang_bias, visual_bias, p):
    return reference.bidirectional_cross_attention(qkv, LANG_LEN, HEADS, lang_bias, visual_bias, p)[0]


def _sdpa(qkv, lang_bias, visual_bias, p):
    q, k, v = (reference.split_heads(x, HEADS) for x in qkv.chunk(3, dim=-1))
    lang, vis = slice(0, LANG_LEN), slice(LANG_LEN, None)

    def mask(bias):
        return None if bias is None else bias[:, None, None, :].to(qkv.dtype)

    lang_ctx = F.scaled_dot_product_attention(
        q[:, :, lang], k[:, :, vis], v[:, :, vis], attn_mask=mask(visual_bias), dropout_p=p
    )
    vis_ctx = F.scaled_dot_product_attention(
        q[:, :, vis], k[:, :, lang], v[:, :, lang], attn_mask=mask(lang_bias), dropout_p=p
    )
    return reference.merge_heads(torch.cat((lang_ctx, vis_ctx), dim=2))


IMPLS = {"fused": _fused, "reference": _reference, "sdpa": _sdpa}


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("batch", [32, 256])
def test_cross_attention(benchmark, device_time, batch, impl, mode):
    torch.manual_seed(0)
    device = torch.device("cuda")
    training = mode == "forward_backward"
    qkv = torch.randn(batch, LANG_LEN + VIS_LEN, 3 * HEADS * HEAD_DIM, device=device, dtype=DTYPE)
    qkv.requires_grad_(training)
    # Pre-training: padded sentences (language mask), always 36 boxes (no vision mask).
    lengths = torch.randint(5, LANG_LEN + 1, (batch, 1), device=device)
    positions = torch.arange(LANG_LEN, device=device)
    lang_bias = torch.where(positions < lengths, 0.0, torch.finfo(DTYPE).min).to(DTYPE)
    dout = torch.randn(batch, LANG_LEN + VIS_LEN, HEADS * HEAD_DIM, device=device, dtype=DTYPE)
    fn, p = IMPLS[impl], (0.1 if training else 0.0)

    def run():
        if training:
            torch.autograd.grad(fn(qkv, lang_bias, None, p), qkv, dout)
        else:
            with torch.no_grad():
                fn(qkv, lang_bias, None, p)

    def step():
        run()
        torch.cuda.synchronize()

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    step()
    benchmark.extra_info["peak_memory_mib"] = (torch.cuda.max_memory_allocated() - baseline) / 2**20
    benchmark.extra_info["device"] = torch.cuda.get_device_name()
    device_time(run, (12 if training else 4) * dout.numel() * dout.element_size())
    benchmark.pedantic(step, rounds=50, iterations=5, warmup_rounds=5)
