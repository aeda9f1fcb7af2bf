"""Shared builders for the tests: configs, batches, transformers twins, comparisons."""

from __future__ import annotations

import contextlib
import os
import signal
import traceback

import numpy as np
import torch

import lxmert_fast

# Small enough for fast tests, awkward enough to catch layout mistakes (3 heads of 16).
SMALL = dict(
    vocab_size=97,
    hidden_size=48,
    num_attention_heads=3,
    intermediate_size=80,
    l_layers=2,
    x_layers=2,
    r_layers=2,
    visual_feat_dim=40,
    num_qa_labels=13,
    num_object_labels=11,
    num_attr_labels=7,
    max_position_embeddings=64,
)
FULL: dict = {}


def allow_auto(monkeypatch, op: str, device_type: str) -> None:
    """Let backend ``auto`` pick ``op``'s fast path on ``device_type``, as a recorded measurement
    showing it at least as fast would (tests of the dispatch itself, not of the policy)."""
    from lxmert_fast import backend

    entry = backend.Measurement(op, device_type, "test", "test", (("test", "ref", 1.0),), ())
    monkeypatch.setattr(backend, "MEASUREMENTS", (*backend.MEASUREMENTS, entry))


def hf_config(**kwargs):
    import transformers

    return transformers.LxmertConfig(**kwargs)


def make_batch(
    config, batch: int, lang_len: int, num_boxes: int, lang_mask: bool, visual_mask: bool, seed: int = 0
):
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "input_ids": torch.randint(1, config.vocab_size, (batch, lang_len), generator=g),
        "visual_feats": torch.randn(batch, num_boxes, config.visual_feat_dim, generator=g),
        "visual_pos": torch.rand(batch, num_boxes, config.visual_pos_dim, generator=g),
        "token_type_ids": torch.randint(0, 2, (batch, lang_len), generator=g),
    }
    if lang_mask:
        mask = torch.ones(batch, lang_len)
        for b in range(batch):
            mask[b, max(1, lang_len - 2 * b - 1) :] = 0
        inputs["attention_mask"] = mask
    if visual_mask:
        mask = torch.ones(batch, num_boxes)
        for b in range(batch):
            mask[b, max(1, num_boxes - 3 * b - 2) :] = 0
        inputs["visual_attention_mask"] = mask
    return inputs


def flatten(x):
    if isinstance(x, (tuple, list)):
        for y in x:
            yield from flatten(y)
    elif isinstance(x, dict):
        for key in sorted(x):
            yield from flatten(x[key])
    elif x is not None:
        yield x


def max_abs_diff(a, b) -> float:
    """Max |a - b| over two nested output structures that must have the same layout."""
    fa, fb = list(flatten(a)), list(flatten(b))
    assert len(fa) == len(fb), f"different number of outputs: {len(fa)} vs {len(fb)}"
    worst = 0.0
    for i, (x, y) in enumerate(zip(fa, fb, strict=True)):
        assert x.shape == y.shape, f"output {i}: shape {tuple(x.shape)} vs {tuple(y.shape)}"
        worst = max(worst, (x.double() - y.double()).abs().max().item() if x.numel() else 0.0)
    return worst


def twins(hf_cls_name: str, ours_cls, **config):
    """A random-init transformers model and ours with its weights, both in eval mode."""
    import transformers

    hf = getattr(transformers, hf_cls_name)(hf_config(**config)).eval()
    ours = ours_cls(lxmert_fast.LxmertConfig(**config)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def max_scaled_diff(a, b) -> float:
    """Max over tensors of |a - b| / max(1, max|a|): 1e-5 then means 1e-5 relative for large
    tensors (parameter gradients summed over many rows) and absolute for small ones."""
    worst = 0.0
    for x, y in zip(flatten(a), flatten(b), strict=True):
        assert x.shape == y.shape
        if x.numel():
            scale = max(1.0, x.double().abs().max().item())
            worst = max(worst, (x.double() - y.double()).abs().max().item() / scale)
    return worst


def synthetic_corpus(path, num_train: int, num_valid: int, feat_dim: int, seed: int, splits=("train",)):
    """Generate the synthetic set in ``path`` and open it as the trainer does: the feature TSVs of
    ``splits`` converted to one store, the tokenizer, the vqa answer table and each split's
    examples. Returns (store, tokenizer, table, {split: examples})."""
    from lxmert_fast.data import (
        AnswerTable,
        FeatureStore,
        WordPieceTokenizer,
        build_examples,
        convert_tsv_to_store,
        load_pretrain_json,
    )
    from lxmert_fast.data.synthetic import feature_file, generate

    generate(str(path), num_train=num_train, num_valid=num_valid, feat_dim=feat_dim, seed=seed)
    convert_tsv_to_store([path / feature_file(split) for split in splits], path / "store")
    store = FeatureStore(path / "store")
    tokenizer = WordPieceTokenizer(path / "vocab.txt")
    table = AnswerTable.load(path / "all_ans.json", dsets=["vqa"])
    examples = {
        split: build_examples(load_pretrain_json(path / f"{split}.json"), table, image_ids=store.keys())
        for split in splits
    }
    return store, tokenizer, table, examples


def train_env() -> dict:
    """Environment for a ``train.py`` subprocess on the CPU: DeepSpeed's CPU accelerator, no
    distributed variables inherited from the caller (train.py then sets up one process itself)."""
    import os

    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def top_answer(table, label: dict[str, float]) -> int | None:
    """The id of the highest-scoring answer of a raw ``{answer: score}`` label, None if none is in ``table``."""
    scores = table.convert_label(label)
    return max(scores.items(), key=lambda kv: kv[1])[0] if scores else None


def feature_items(
    count: int, dim: int = 7, seed: int = 0, id_prefix: str = "COCO_val2014", box_scale: float = 500
) -> list[dict]:
    """``count`` random images with every field of a feature TSV row: ids ``<id_prefix>_<i:012d>``,
    3, 4, 5, 3, ... boxes (ragged on purpose: the store must not assume 36), pixel boxes in
    [0, box_scale), features [n, dim]."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(count):
        n = 3 + i % 3
        items.append(
            {
                "img_id": f"{id_prefix}_{i:012d}",
                "img_h": int(rng.integers(100, 900)),
                "img_w": int(rng.integers(100, 900)),
                "objects_id": rng.integers(0, 1600, n).astype(np.int64),
                "objects_conf": rng.random(n).astype(np.float32),
                "attrs_id": rng.integers(0, 400, n).astype(np.int64),
                "attrs_conf": rng.random(n).astype(np.float32),
                "num_boxes": n,
                "boxes": (rng.random((n, 4)) * box_scale).astype(np.float32),
                "features": (rng.random((n, dim)) * 10).astype(np.float32),
            }
        )
    return items


FAULT = "LXMERT_FAST_FAULT_AT"  # lxmert_fast/atomic.py's fault injection


def killed_at(spec: int | str, fn) -> bool:
    """Run ``fn`` in a forked child that is SIGKILLed at fault point ``spec`` (``FAULT``); True if it
    was, False if ``fn`` finished before reaching it (an exception in the child fails the test)."""
    from lxmert_fast import atomic

    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.environ[FAULT] = str(spec)
            atomic.reset_fault_count()
            fn()
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL, status
        return True
    assert os.WEXITSTATUS(status) == 0, f"the child failed before fault point {spec} (see stderr)"
    return False


@contextlib.contextmanager
def torch_sum_forbidden(monkeypatch):
    """Within the block, ``torch.sum`` and ``Tensor.sum`` raise: a kernel's backward must leave its
    reductions (dW, db) to its own kernels, with no torch reduction after them."""

    def forbidden(*_args, **_kwargs):
        raise AssertionError("torch reduction in the backward")

    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "sum", forbidden)
        patch.setattr(torch, "sum", forbidden)
        yield
