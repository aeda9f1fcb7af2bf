"""One VQA fine-tuning step (forward, the authors' soft-score BCE x answers, backward, AdamW): ours
vs transformers' ``LxmertForQuestionAnswering``, eager and under ``torch.compile``.

Same weights (transformers' random init loaded into ours with ``strict=True``), same batch, the
VQA answer table's 3129 labels, train mode (dropout 0.1). transformers' model computes a
cross-entropy of its own when given labels; both are called without labels and given the same
loss (:func:`lxmert_fast.finetune.models.soft_score_loss`), which is what finetune.py trains.

Cases: ``tiny`` (B=32) and ``small`` (B=32) on CPU (tiny also compiled); the ``paper`` model
(9/5/5 x 768, features 2048, bf16 autocast) at B=32 (the authors' batch) and B=256 on CUDA, eager
and captured (``mode="reduce-overhead"``). ``extra_info`` as bench_pretrain_step's
(``samples_per_s``; on CUDA ``device_ms``, ``tflops``, ``peak_pct``, ``peak_mem_mb``).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from stepping import training_step

import lxmert_fast
from lxmert_fast.finetune.models import soft_score_loss
from lxmert_fast.metrics import training_flops
from lxmert_fast.pretraining import PRESETS

transformers = pytest.importorskip("transformers")

VQA_LABELS = 3129
DROPOUT = dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
CONFIGS: dict[str, dict] = {
    "tiny": dict(PRESETS["tiny"], **DROPOUT, batch=32, visual_feat_dim=64),
    "small": dict(PRESETS["small"], **DROPOUT, batch=32, visual_feat_dim=256),
    "paper-b32": dict(PRESETS["paper"], batch=32, visual_feat_dim=2048),
    "paper-b256": dict(PRESETS["paper"], batch=256, visual_feat_dim=2048),
}
CASES = [("tiny", "cpu"), ("small", "cpu")]
if torch.cuda.is_available():
    CASES = [("paper-b32", "cuda"), ("paper-b256", "cuda")]


def model_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "batch"} | {
        "vocab_size": 30522,
        "num_qa_labels": VQA_LABELS,
    }


def make_batch(config: dict, device: str) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b, t, n, d = config["batch"], 20, 36, config["visual_feat_dim"]
    inputs = {
        "input_ids": torch.randint(1, 30522, (b, t), generator=g),
        "visual_feats": torch.randn(b, n, d, generator=g),
        "visual_pos": torch.rand(b, n, 4, generator=g),
        "attention_mask": torch.ones(b, t),
    }
    # Soft scores of up to 4 answers per question (VQA's 10 annotators, 0.3 / 0.6 / 0.9 / 1).
    target = torch.zeros(b, VQA_LABELS)
    answers = torch.randint(0, VQA_LABELS, (b, 4), generator=g)
    target.scatter_(1, answers, torch.tensor([1.0, 0.9, 0.6, 0.3]).expand(b, 4))
    return {k: v.to(device) for k, v in inputs.items()}, target.to(device)


def build_step(config: dict, size: str, impl: str, mode: str, device: str) -> tuple[Callable[[], None], dict]:
    kwargs = model_config(config)
    hf = transformers.LxmertForQuestionAnswering(transformers.LxmertConfig(**kwargs))
    if impl == "ours":
        model = lxmert_fast.LxmertForQuestionAnswering(lxmert_fast.LxmertConfig(**kwargs))
        model.load_state_dict(hf.state_dict(), strict=True)
        model.lxmert.check_inputs = False  # finetune.py checks batches on the host
    else:
        model = hf
    model = model.to(device).train()
    inputs, target = make_batch(config, device)
    step = training_step(
        model,
        inputs,
        lambda out: soft_score_loss(out.question_answering_score.float(), target),
        lr=5e-5,
        size=size,
        mode=mode,
        device=device,
    )
    return step, inputs


def step_flops(config: dict, inputs: dict) -> int:
    return training_flops(
        lambda: lxmert_fast.LxmertForQuestionAnswering(lxmert_fast.LxmertConfig(**model_config(config))),
        inputs,
        lambda out: out.question_answering_score.float().sum(),
    )


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("impl", ["ours", "transformers"])
@pytest.mark.parametrize(("size", "device"), CASES)
def test_vqa_finetune_step(step_timer, impl, mode, size, device):
    if mode == "compiled" and size == "small" and device == "cpu":
        pytest.skip("compiled CPU steps are timed on the tiny config (inductor compiles small for minutes)")
    config = CONFIGS[size]
    step, inputs = build_step(config, size, impl, mode, device)
    step_timer(step, device, config["batch"], lambda: step_flops(config, inputs), mode)
