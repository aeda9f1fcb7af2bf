"""One full pre-training step (forward, six losses, backward, AdamW): ours vs transformers'
``LxmertForPreTraining``, eager and under ``torch.compile``.

Same weights (transformers' random init loaded into ours with ``strict=True``), same batch, all
six losses (ignored labels are -100, transformers' convention; MLM, matching, obj/attr over all
36 objects weighted by confidence, feature regression on masked objects, QA), train mode
(dropout 0.1 on). Ours decodes MLM and feature regression at the masked positions only (its
sparse heads, positions made on the host as train.py does); transformers decodes every position.

Cases: ``tiny`` (1/1/1 x 32, features 64, B=8) on CPU, eager and compiled (inductor), where CI-class
machines can track the compiled ratio; ``paper`` (9/5/5 x 768, features 2048, bf16 autocast) at
B=64 and B=256 on CUDA, eager and captured (``mode="reduce-overhead"``: CUDA graphs). ``extra_info``:
``samples_per_s``; on CUDA also ``device_ms`` (CUDA events over 20 steps after warm-up),
``tflops`` and ``peak_pct`` (FLOPs of the dense step counted once on the meta device with
``torch.utils.flop_counter``, so both implementations are credited the same work) and
``peak_mem_mb``. Batches come from random tensors, not the loader: this measures the model step.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from stepping import training_step

import lxmert_fast
from lxmert_fast import pretraining as pt
from lxmert_fast.metrics import training_flops
from lxmert_fast.pretraining import PRESETS

transformers = pytest.importorskip("transformers")

CONFIGS: dict[str, dict] = {
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
    "tiny": dict(PRESETS["tiny"], batch=8, visual_feat_dim=64, vocab_size=30522, num_qa_labels=9500),
    "paper-b64": dict(PRESETS["paper"], batch=64, visual_feat_dim=2048, vocab_size=30522, num_qa_labels=9500),
    "paper-b256": dict(
        PRESETS["paper"], batch=256, visual_feat_dim=2048, vocab_size=30522, num_qa_labels=9500
    ),
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
    labels = batch["labels"]
    batch["sparse"] = {
        "mlm_positions": pt.flat_positions(labels >= 0, pt.position_budget(labels.numel(), 0.15)),
        "feat_positions": pt.flat_positions(masked > 0, pt.position_budget(masked.numel(), 0.15)),
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


CASES = [("small", "cpu"), ("tiny", "cpu")]
if torch.cuda.is_available():
    CASES = [("small", "cuda"), ("paper-b64", "cuda"), ("paper-b256", "cuda")]
_FLOPS: dict[str, int] = {}


def dense_step_flops(size: str, config: dict, batch: dict) -> int:
    """FLOPs of the dense step (forward, six losses, backward), counted once per config."""
    if size not in _FLOPS:
        model_config = {k: v for k, v in config.items() if k != "batch"}
        dense = {k: v for k, v in batch.items() if k != "sparse"}
        _FLOPS[size] = training_flops(
            lambda: lxmert_fast.LxmertForPreTraining(lxmert_fast.LxmertConfig(**model_config)),
            dense,
            lambda out: out.loss,
        )
    return _FLOPS[size]


def build_step(config: dict, size: str, impl: str, mode: str, device: str) -> tuple[Callable[[], None], dict]:
    """One training step of ``impl`` (forward with its losses, backward, AdamW; bf16 autocast for the
    paper config on CUDA), eager or compiled (CUDA graphs on CUDA), and the batch it runs on."""
    model = make_models(config, device)[impl]
    batch = make_batch(config, device)
    sparse = batch.pop("sparse")
    if impl == "ours":
        batch.update(sparse)
    step = training_step(model, batch, lambda out: out.loss, lr=1e-5, size=size, mode=mode, device=device)
    return step, batch


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("impl", ["ours", "transformers"])
@pytest.mark.parametrize(("size", "device"), CASES)
def test_pretrain_step(step_timer, impl, mode, size, device):
    if mode == "compiled" and size == "small" and device == "cpu":
        pytest.skip("compiled CPU steps are timed on the tiny config (inductor compiles small for minutes)")
    config = CONFIGS[size]
    step, batch = build_step(config, size, impl, mode, device)

    step_timer(step, device, config["batch"], lambda: dense_step_flops(size, config, batch), mode)
