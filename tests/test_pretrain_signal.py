"""The pre-training input path carries the image to the pooled head.

A probe, not a benchmark: the synthetic set goes through the real path (TSV -> feature store ->
``PretrainDataset`` -> ``mask_objects`` on the device -> ``model_inputs`` -> the model), and the
matching head is trained on a label that depends on the image alone (does the image hold one of
two of the four object classes). A break anywhere in that path (features of the wrong image, boxes or
masks misaligned, masking that wipes the features) leaves the held-out accuracy at the majority
rate; intact, the tiny preset reaches 0.9-0.95 held-out accuracy within 250 steps (seeds 0-2).
"""

from __future__ import annotations

import pytest
import torch
from lxmert_testing import synthetic_corpus

import lxmert_fast
from lxmert_fast import pretraining as pt
from lxmert_fast.data import EpochBatchSampler, PretrainDataset
from lxmert_fast.data.synthetic import NUM_BOXES

pytest.importorskip("tokenizers")

PROBE_CLASSES = (0, 1)
STEPS = 250


def image_label(batch: dict) -> torch.Tensor:
    present = torch.zeros_like(batch["obj_ids"], dtype=torch.bool)
    for c in PROBE_CLASSES:
        present |= batch["obj_ids"] == c
    return present.any(1).long()


def test_image_only_label_is_learned_through_the_data_path(tmp_path):
    store, tok, table, examples = synthetic_corpus(
        tmp_path, num_train=160, num_valid=60, feat_dim=32, seed=3, splits=("train", "valid")
    )
    splits = {
        name: PretrainDataset(part, store, tok, max_seq_len=16, num_boxes=NUM_BOXES, seed=0)
        for name, part in examples.items()
    }
    tasks = dict(mlm=False, matched=True, obj=False, qa=False)
    config = pt.build_config("tiny", len(tok), store.feature_dim, len(table), tasks, visual_losses=())
    torch.manual_seed(0)
    model = lxmert_fast.LxmertForPreTraining(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def forward(batch: dict, offset: int):
        feats, _, _ = pt.mask_objects(batch, seed=0, offset=offset, rate=0.15, obj_loss_on="all")
        inputs = pt.model_inputs(batch, feats, None, use_visual_mask=True)
        inputs["matched_label"] = image_label(batch)
        return model(**inputs)

    sampler = EpochBatchSampler(len(splits["train"]), 32, seed=0)
    steps = 0
    for epoch in range(10):
        sampler.set_epoch(epoch)
        for indices in sampler:
            batch = torch.utils.data.default_collate([splits["train"][i] for i in indices])
            loss = forward(batch, steps * 32 * NUM_BOXES).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            if steps == STEPS:
                break
        if steps == STEPS:
            break

    model.eval()
    valid = splits["valid"]
    batch = torch.utils.data.default_collate([valid[i] for i in range(len(valid))])
    with torch.no_grad():
        predicted = forward(batch, 0).cross_relationship_score.argmax(-1)
    target = image_label(batch)
    accuracy = float((predicted == target).float().mean())
    majority = max(float(target.float().mean()), 1 - float(target.float().mean()))
    print(f"held-out accuracy {accuracy:.3f}, majority rate {majority:.3f}")
    assert accuracy > max(0.85, majority + 0.15), (accuracy, majority)
