"""One full pre-training step (forward, backward, AdamW step): ours vs transformers' ``LxmertForPreTraining``.

Same weights (transformers' random init loaded into ours with ``strict=True``), same batch, all
six losses (ignored labels are -100, transformers' convention; MLM, matching, obj/attr over all 36 objects weighted by confidence, feature
regression on masked objects, QA), train mode (dropout 0.1 on). Configs: ``small`` (the ``small``
preset of ``train.py``, 2/2/1 x 128, features 256, B=32) on CPU; ``paper`` (9/5/5 x 768,
features 2048, B=64, bf16 autocast) only on CUDA. ``extra_info``: ``samples_per_s`` and, on
CUDA, ``peak_mem_mb``. Batches come from random tensors, not the loader: this measures the
model step, not data loading.
"""

from __future__ import annotations

import pytest
import torch

import lxmert_fast
from lxmert_fast.pretraining import PRESETS

transformers = pytest.importorskip("transformers")

CONFIGS = {
    # Dropout 0.1 as in the paper config (the small preset trains without it), so both cases
    # time the dropout path that real pre-training runs.
    "small": dict(
        PRESETS["small"],
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        batch=32,
        visual_feat_dim=256,
        vocab_size=30522,
        num_qa_labels=9500,
    ),
    "paper": dict(PRESETS["paper"], batch=64, visual_feat_dim=2048, vocab_size=30522, num_qa_labels=9500),
}


def make_batch(config: dict, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    b, t, n, d = config["batch"], 20, 36, config["visual_feat_dim"]
    feats = torch.randn(b, n, d, generator=g)
    masked = (torch.rand(b, n, generator=g) < 0.15).float()
    batch = {
        "input_ids": torch.randint(1, config["vocab_size"], (b, t), generator=g),
        "visual_feats": feats * (1 - masked[..., None]),
        "visual_pos": torch.rand(b, n, 4, generator=g),
        "attention_mask": torch.ones(b, t),
        "labels": torch.where(
            torch.rand(b, t, generator=g) < 0.15, torch.randint(1, 100, (b, t), generator=g), -100
        ),
        "matched_label": torch.randint(0, 2, (b,), generator=g),
        "ans": torch.randint(0, config["num_qa_labels"], (b,), generator=g),
        "obj_labels": {
            "obj": (torch.randint(0, 1600, (b, n), generator=g), torch.rand(b, n, generator=g)),
            "attr": (torch.randint(0, 400, (b, n), generator=g), torch.rand(b, n, generator=g)),
            "feat": (feats, masked),
        },
    }
    move = lambda x: x.to(device) if torch.is_tensor(x) else tuple(move(y) for y in x)  # noqa: E731
    return {
        k: ({kk: move(vv) for kk, vv in v.items()} if isinstance(v, dict) else move(v))
        for k, v in batch.items()
    }


def make_models(config: dict, device: str):
    model_config = {k: v for k, v in config.items() if k != "batch"}
    model_config["visual_loss_normalizer"] = 1 / 0.15
    hf = transformers.LxmertForPreTraining(transformers.LxmertConfig(**model_config)).to(device).train()
    ours = lxmert_fast.LxmertForPreTraining(lxmert_fast.LxmertConfig(**model_config)).to(device).train()
    ours.load_state_dict(hf.state_dict(), strict=True)
    ours.lxmert.check_inputs = False
    return {"transformers": hf, "ours": ours}


CASES = [("small", "cpu")]
if torch.cuda.is_available():
    CASES = [("small", "cuda"), ("paper", "cuda")]


@pytest.mark.parametrize("impl", ["ours", "transformers"])
@pytest.mark.parametrize(("size", "device"), CASES)
def test_pretrain_step(benchmark, cpu_threads, impl, size, device):
    config = CONFIGS[size]
    model = make_models(config, device)[impl]
    batch = make_batch(config, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda" and size == "paper")

    def step() -> None:
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=5 if device == "cpu" else 20, warmup_rounds=1)
    benchmark.extra_info["samples_per_s"] = config["batch"] / benchmark.stats.stats.mean
    benchmark.extra_info["cpu_threads"] = cpu_threads
    if device == "cuda":
        benchmark.extra_info["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
