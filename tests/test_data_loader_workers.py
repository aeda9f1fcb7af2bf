"""Loader workers stay small (issue #14): they start from a forkserver that imported only the data
code, ``import lxmert_fast.data`` does not pull in the model, and the dataset travels to a worker
without the feature store's per-image index."""

from __future__ import annotations

import multiprocessing
import pickle
import subprocess
import sys

import pytest
import torch
from lxmert_testing import synthetic_corpus

from lxmert_fast.data import EpochBatchSampler, PretrainBatches, batch_loader, build_corpus
from lxmert_fast.data.synthetic import NUM_BOXES


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("syn")
    store, _, _, _ = synthetic_corpus(path, num_train=12, num_valid=2, feat_dim=8, seed=3)
    inputs = ([path / "train.json"], path / "vocab.txt", path / "all_ans.json", path / "store")
    corpus = build_corpus(path / "corpus", *inputs, max_seq_len=20, answer_dsets=["vqa"], progress=False)
    return PretrainBatches(corpus, store, num_boxes=NUM_BOXES)


def test_data_import_leaves_the_model_out():
    script = (
        "import sys, lxmert_fast.data\n"
        "heavy = ['lxmert_fast.modeling', 'lxmert_fast.backend', 'triton', 'deepspeed', 'transformers']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_package_names_still_resolve():
    import lxmert_fast

    assert lxmert_fast.LxmertModel.__name__ == "LxmertModel"
    assert lxmert_fast.ops.__name__ == "lxmert_fast.ops"
    assert set(lxmert_fast.__all__) <= set(dir(lxmert_fast))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lxmert_fast.nope  # noqa: B018


@pytest.mark.skipif("forkserver" not in multiprocessing.get_all_start_methods(), reason="no forkserver")
def test_workers_start_from_the_forkserver_and_give_the_same_batches(dataset):
    sampler = EpochBatchSampler(len(dataset), 4, seed=0)
    loader = batch_loader(dataset, sampler, num_workers=2)
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    assert batch_loader(dataset, sampler).multiprocessing_context is None
    forked = list(batch_loader(dataset, sampler, num_workers=2, multiprocessing_context="fork"))
    for got, want in zip(list(loader), forked, strict=True):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in got)


def test_a_pickled_dataset_leaves_the_store_index_behind(dataset):
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy._store is None and dataset._store is not None
    indices = list(range(4))
    batch, want = copy[indices], dataset[indices]
    assert all(torch.equal(batch[k], want[k]) for k in want)
    assert copy.image_ids(indices) == dataset.image_ids(indices)  # reopens the store by its directory
