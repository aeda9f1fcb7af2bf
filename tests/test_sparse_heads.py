"""Sparse pre-training heads (issue #11): static batch shapes, and the MLM head and the feature
decoder run on K gathered rows with the losses and gradients of the dense heads.

The positions are made on the host (``pretraining.head_positions``) from the CPU batch: MLM rows
from ``mlm_labels >= 0``, feature rows from the object selection, which the host computes from
(seed, offset) exactly as the RoI-masking op does on the device.
"""

from __future__ import annotations

import pytest
import torch
from lxmert_testing import SMALL, make_batch, synthetic_corpus

import lxmert_fast
from lxmert_fast import ops
from lxmert_fast import pretraining as pt
from lxmert_fast.data import EpochBatchSampler, PretrainDataset
from lxmert_fast.data.synthetic import NUM_BOXES

TOL = 1e-6
B, T, N = 4, 9, 12


def targets(config, seed: int = 0, word_rate: float = 0.5, obj_rate: float = 0.4) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, config.vocab_size, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) >= word_rate] = -1
    selected = (torch.rand(B, N, generator=g) < obj_rate).float()
    obj_labels = {
        key: (torch.randint(0, width, (B, N), generator=g), torch.rand(B, N, generator=g))
        for key, width in (("obj", config.num_object_labels), ("attr", config.num_attr_labels))
    }
    obj_labels["feat"] = (torch.randn(B, N, config.visual_feat_dim, generator=g), selected)
    matched = torch.randint(0, 2, (B,), generator=g)
    return dict(labels=labels, obj_labels=obj_labels, matched_label=matched, ans=torch.tensor([1, -1, 3, 0]))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return lxmert_fast.LxmertForPreTraining(lxmert_fast.LxmertConfig(**SMALL)).eval()


def run(model, inputs: dict, labels: dict, **positions) -> tuple:
    model.zero_grad(set_to_none=True)
    out = model(**inputs, **labels, **positions)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_as_dense(model, inputs, labels, mlm_positions, feat_positions) -> None:
    dense, dense_grads = run(model, inputs, labels)
    sparse, sparse_grads = run(
        model, inputs, labels, mlm_positions=mlm_positions, feat_positions=feat_positions
    )
    pairs = [(sparse.losses[k], dense.losses[k]) for k in dense.losses] + [(sparse.loss, dense.loss)]
    loss_diff = max(abs((a - b).item()) for a, b in pairs)
    grad_diff = max(float((sparse_grads[k] - dense_grads[k]).abs().max()) for k in dense_grads)
    print(
        f"K={mlm_positions.numel()}/{feat_positions.numel()}: max |loss diff| {loss_diff:.2e}, max |grad diff| {grad_diff:.2e}"
    )
    assert sparse.losses.keys() == dense.losses.keys() == {"mlm", "matched", "obj", "attr", "feat", "qa"}
    assert loss_diff <= TOL and grad_diff <= TOL
    assert sparse.prediction_logits.shape == (mlm_positions.numel(), model.config.vocab_size)
    valid = mlm_positions >= 0
    expected = dense.prediction_logits.reshape(-1, model.config.vocab_size)[mlm_positions[valid]]
    torch.testing.assert_close(sparse.prediction_logits[valid], expected, rtol=0, atol=TOL)


@pytest.mark.parametrize("budget", [64, 8], ids=["within-budget", "overflow"])
def test_sparse_losses_and_gradients_equal_dense(model, budget):
    inputs = make_batch(model.config, B, T, N, True, False, seed=1)
    labels = targets(model.config, seed=2)
    words, objects = labels["labels"] >= 0, labels["obj_labels"]["feat"][1] > 0
    assert int(words.sum()) > 8 and int(objects.sum()) > 8  # so budget 8 overflows
    mlm_positions, feat_positions = pt.flat_positions(words, budget), pt.flat_positions(objects, budget)
    for positions, count in ((mlm_positions, int(words.sum())), (feat_positions, int(objects.sum()))):
        assert positions.numel() == max(budget, -(-count // 8) * 8) and (positions >= 0).sum() == count
    assert_same_as_dense(model, inputs, labels, mlm_positions, feat_positions)


def test_padding_only_positions_give_zero_losses_like_dense(model):
    inputs = make_batch(model.config, B, T, N, True, False, seed=3)
    labels = targets(model.config, seed=4)
    labels["labels"][:] = -1
    labels["obj_labels"]["feat"][1].zero_()
    none = pt.flat_positions(torch.zeros(B, N, dtype=torch.bool), 16)
    assert none.tolist() == [-1] * 16
    assert_same_as_dense(model, inputs, labels, none[:8], none)
    out = model(**inputs, **labels, mlm_positions=none[:8], feat_positions=none)
    assert out.losses["mlm"].item() == 0.0 and out.losses["feat"].item() == 0.0


def test_positions_that_miss_or_repeat_a_row_are_rejected(model):
    inputs = make_batch(model.config, B, T, N, True, False, seed=5)
    labels = targets(model.config, seed=6)
    words, objects = labels["labels"] >= 0, labels["obj_labels"]["feat"][1] > 0
    mlm, feat = pt.flat_positions(words, 32), pt.flat_positions(objects, 32)
    missing, repeated, outside = mlm.clone(), mlm.clone(), mlm.clone()
    missing[0] = -1
    repeated[int(words.sum())] = repeated[0]
    outside[-1] = B * T
    with torch.no_grad():
        for bad, message in (
            (missing, "listed exactly once"),
            (repeated, "listed exactly once"),
            (outside, rf"in \[0, {B * T}\)"),
        ):
            with pytest.raises(ValueError, match=f"mlm_positions: expected .*{message}"):
                model(**inputs, **labels, mlm_positions=bad, feat_positions=feat)
        with pytest.raises(ValueError, match="feat_positions: expected every labelled / weighted row"):
            model(**inputs, **labels, mlm_positions=mlm, feat_positions=feat[1:])


def test_position_budget_and_flat_positions():
    # B=256 at the authors' shapes: 20 words and 36 objects per pair, rate 0.15.
    assert pt.position_budget(256 * 20, 0.15) == 928 and pt.position_budget(256 * 36, 0.15) == 1592
    assert pt.position_budget(10, 0.9) == 16 and pt.position_budget(40, 0.0) == 0
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 4] = mask[2, 0] = mask[2, 3] = True
    assert pt.flat_positions(mask, 8).tolist() == [4, 10, 13, -1, -1, -1, -1, -1]
    assert pt.flat_positions(mask, 0).tolist() == [4, 10, 13, -1, -1, -1, -1, -1]
    assert pt.flat_positions(torch.ones(3, 5, dtype=torch.bool), 8).tolist() == [*range(15), -1]
    with pytest.raises(ValueError, match="mask: expected a CPU bool tensor"):
        pt.flat_positions(mask.long(), 8)


def test_host_selection_equals_the_ops_action():
    for b, n in ((1, 1), (3, 36), (7, 5), (2, 64)):
        for seed, offset in ((0, 0), (7, 999), (2**40 + 3, 2**33 + 1), (-5, 123_456_789)):
            for rate in (0.15, 0.5):
                feats = torch.randn(b, n, 3)
                _, action = ops.roi_feature_mask(feats, seed, offset, p_select=rate)
                host = pt.selected_objects(seed, offset, b, n, rate)
                assert torch.equal(host, action > 0), (b, n, seed, offset, rate)


@pytest.fixture(scope="module")
def loader_data(tmp_path_factory):
    pytest.importorskip("tokenizers")
    path = tmp_path_factory.mktemp("syn")
    store, tok, table, examples = synthetic_corpus(path, num_train=10, num_valid=2, feat_dim=16, seed=4)
    # Two more boxes than the images have: the padded rows are not real objects.
    data = PretrainDataset(examples["train"], store, tok, max_seq_len=20, num_boxes=NUM_BOXES + 2, seed=1)
    return data, len(table)


def test_loader_batches_have_fixed_shapes(loader_data):
    data, _ = loader_data
    micro = 4
    assert len(data) % micro  # the last partial batch is dropped, not padded or shortened
    loader = torch.utils.data.DataLoader(data, batch_sampler=EpochBatchSampler(len(data), micro, seed=0))
    batches = list(loader)
    assert len(batches) == len(data) // micro >= 2
    lengths = {int(b["attention_mask"].sum(1).max()) for b in batches}
    assert len(lengths) > 1 or min(lengths) < 20  # sentences shorter than max_seq_len are padded
    shapes = [{k: tuple(v.shape) for k, v in batch.items()} for batch in batches]
    assert all(s == shapes[0] for s in shapes)
    assert shapes[0]["input_ids"] == (micro, 20) and shapes[0]["visual_feats"] == (micro, NUM_BOXES + 2, 16)


def test_pretraining_path_sparse_equals_dense(loader_data):
    """head_positions -> mask_objects -> model_inputs -> model -> accuracy_counts, as train.py runs them."""
    data, num_answers = loader_data
    tasks = dict(mlm=True, matched=True, obj=True, qa=True)
    config = pt.build_config("tiny", len(data.tokenizer), 16, num_answers, tasks)
    torch.manual_seed(0)
    model = lxmert_fast.LxmertForPreTraining(config).eval()
    visual = pt.VisualLogits(model)
    batch = torch.utils.data.default_collate([data[i] for i in range(8)])
    seed, offset, rate = 3, 8 * (NUM_BOXES + 2), 0.15
    positions = pt.head_positions(batch, config, 0.15, seed, offset, rate)
    feats, obj_labels, selected = pt.mask_objects(batch, seed, offset, rate, "all")
    listed = positions["feat_positions"]
    assert torch.equal(listed[listed >= 0], selected.reshape(-1).nonzero().squeeze(1))
    results = []
    for extra in ({}, positions):
        step = {**batch, **extra}
        with torch.no_grad():
            out = model(**pt.model_inputs(step, feats, obj_labels, use_visual_mask=True))
        results.append((out, pt.accuracy_counts(out, step, selected, visual.pop())))
    (dense, dense_counts), (sparse, sparse_counts) = results
    assert sparse.prediction_logits.shape[0] == positions["mlm_positions"].numel()
    assert all(abs(float(sparse.losses[k] - dense.losses[k])) <= TOL for k in dense.losses)
    assert sparse_counts.keys() == dense_counts.keys() >= {"mlm", "obj", "attr"}
    assert all(torch.equal(sparse_counts[k], dense_counts[k]) for k in dense_counts)
    assert dense_counts["mlm"][1] > 0


def test_sparse_forward_compiles_fullgraph():
    """No data-dependent shape or host read in the sparse forward (it is captured on the GPU)."""
    config = lxmert_fast.LxmertConfig(**{**SMALL, "l_layers": 1, "x_layers": 1, "r_layers": 1})
    model = lxmert_fast.LxmertForPreTraining(config).eval()
    inputs = make_batch(model.config, B, T, N, True, False, seed=7)
    labels = targets(model.config, seed=8)
    positions = dict(
        mlm_positions=pt.flat_positions(labels["labels"] >= 0, 16),
        feat_positions=pt.flat_positions(labels["obj_labels"]["feat"][1] > 0, 16),
    )
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        expected = model(**inputs, **labels, **positions).loss
        got = compiled(**inputs, **labels, **positions).loss
    assert abs(float(got - expected)) <= TOL
