"""The pre-tokenised corpus store and batch-level loading (issue #14).

The per-sample :class:`PretrainDataset` is the oracle: for the same indices, seed and epoch the batch
path (:class:`PretrainBatches` over a :class:`Corpus` and the feature store) must give the very tensors
``default_collate`` makes of its items — on the synthetic default set and on a small hand-made set in
the authors' formats (several sources and JSON files, answers that normalise together, answers outside
the table, zero scores, ragged box counts, long sentences, an image without features, an fp16 store).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from lxmert_testing import feature_items, killed_at, synthetic_corpus
from torch.utils.data import default_collate

from lxmert_fast import atomic, philox
from lxmert_fast.data import (
    AnswerTable,
    Corpus,
    CorpusMismatchError,
    DevicePrefetcher,
    EpochBatchSampler,
    FeatureStore,
    PretrainBatches,
    PretrainDataset,
    WordPieceTokenizer,
    batch_loader,
    build_corpus,
    build_examples,
    convert_tsv_to_store,
    ensure_corpus,
    is_corpus,
    load_pretrain_json,
    randomness,
    write_feature_tsv,
)
from lxmert_fast.data.convert_corpus import main as corpus_main
from lxmert_fast.data.corpus import corpus_mismatch
from lxmert_fast.data.synthetic import NUM_BOXES, OBJECTS, write_vocab

QA = ["vqa", "gqa", "visual7w"]


def assert_same_batch(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert torch.equal(got[key], value), key


def per_sample(dataset: PretrainDataset, indices: list[int]) -> dict:
    return default_collate([dataset[i] for i in indices])


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    path = tmp_path_factory.mktemp("syn")
    store, tok, _, examples = synthetic_corpus(path, num_train=30, num_valid=4, feat_dim=16, seed=2)
    inputs = ([path / "train.json"], path / "vocab.txt", path / "all_ans.json", path / "store")
    corpus = build_corpus(path / "corpus", *inputs, max_seq_len=20, answer_dsets=["vqa"], progress=False)
    return path, store, tok, examples["train"], corpus, inputs


@pytest.fixture(scope="module")
def authors(tmp_path_factory):
    """A small set in the authors' formats, written by hand (see the module docstring)."""
    path = tmp_path_factory.mktemp("authors")
    items = feature_items(5, seed=4, id_prefix="COCO_train2014", box_scale=900)
    write_feature_tsv(path / "obj.tsv", items)
    convert_tsv_to_store([path / "obj.tsv"], path / "store", fp16=True)
    write_vocab(str(path / "vocab.txt"))
    table = [{"ans": a, "dsets": ["vqa", "gqa"]} for a in ("red", "blue", "yes", "no", "2", "dog")]
    table += [{"ans": "left", "dsets": ["visual7w"]}, {"ans": "right", "dsets": ["nlvr2"]}]
    (path / "all_ans.json").write_text(json.dumps(table))
    data = []
    for i in range(6):  # image 5 has no features: its sentences are dropped
        data.append(
            {
                "img_id": f"COCO_train2014_{i:012d}",
                "sentf": {
                    "mscoco": ["a red dog .", "the blue car is next to the tree and a cup with a dog ."],
                    "vg": ["an unknown zebra ."],
                    "vqa": ["what color is the dog ?", "how many cups ?", "is there a cat ?"],
                    "gqa": ["what is left ?"],
                    "visual7w": ["where ?"],
                },
                "labelf": {
                    "vqa": [
                        {"Red.": 0.9, "the red": 0.3, "blue": 0.6},
                        {"two": 1.0},
                        {"yes": 0.0, "no": 0.0},
                    ],
                    "gqa": [{"a dog": 1.0, "right": 1.0}],
                    "visual7w": [{"left": 0.5}],
                },
            }
        )
    (path / "a.json").write_text(json.dumps(data[:3]))
    (path / "b.json").write_text(json.dumps(data[3:]))
    jsons = [path / "a.json", path / "b.json"]
    store = FeatureStore(path / "store")
    examples = build_examples(
        load_pretrain_json(jsons), AnswerTable.load(path / "all_ans.json", dsets=QA), image_ids=store.keys()
    )
    inputs = (jsons, path / "vocab.txt", path / "all_ans.json", path / "store")
    corpus = build_corpus(path / "corpus", *inputs, max_seq_len=8, answer_dsets=QA, progress=False)
    return path, store, WordPieceTokenizer(path / "vocab.txt"), examples, corpus, inputs


def test_numpy_philox_is_the_torch_reference():
    counter = np.random.default_rng(0).integers(0, 2**32, (64, 4), dtype=np.uint64)
    key = (0xDEADBEEF, 0x12345678)
    want = philox.philox4x32(torch.from_numpy(counter.astype(np.int64)), key).numpy()
    assert np.array_equal(randomness.philox4x32(counter, key).astype(np.int64), want)
    # An item's words do not depend on the batch it is drawn in.
    batch = randomness.word_draws(3, 1, np.array([7, 2, 9]), 5)
    assert np.array_equal(batch[1], randomness.word_draws(3, 1, np.array([2]), 5)[0])


def test_batches_equal_per_sample_items_synthetic(syn):
    _, store, tok, examples, corpus, _ = syn
    assert len(corpus) == len(examples)
    old = PretrainDataset(examples, store, tok, max_seq_len=20, num_boxes=NUM_BOXES + 1, seed=5)
    new = PretrainBatches(corpus, store, num_boxes=NUM_BOXES + 1, seed=5)
    indices = list(range(len(examples)))
    for epoch in (0, 1):
        old.set_epoch(epoch)
        new.set_epoch(epoch)
        want = per_sample(old, indices)
        assert_same_batch(new[indices], want)
        assert 0 < int(want["matched_label"].sum()) < len(indices) and (want["qa_label"] >= 0).any()
    nouns = {tok.vocab[w] for w in OBJECTS}
    clean = dict(word_mask_rate=0.0, mismatch_rate=0.0, mask_object_words=nouns, seed=1)
    old = PretrainDataset(examples, store, tok, max_seq_len=20, num_boxes=NUM_BOXES, **clean)
    new = PretrainBatches(corpus, store, num_boxes=NUM_BOXES, **clean)
    assert_same_batch(new[indices[::3]], per_sample(old, indices[::3]))


def test_batches_equal_per_sample_items_authors_format(authors):
    _, store, tok, examples, corpus, _ = authors
    assert len(corpus) == len(examples) == 5 * 8 and corpus.sources == ["mscoco", "vg", *QA]
    assert int(corpus.lengths.max()) == 8  # the long caption is cut to max_seq_len
    old = PretrainDataset(examples, store, tok, max_seq_len=8, num_boxes=4, seed=3)
    new = PretrainBatches(corpus, store, num_boxes=4, seed=3, feature_dtype=torch.float32)
    half = PretrainBatches(corpus, store, num_boxes=4, seed=3)
    indices = list(range(len(examples)))[::-1]
    for epoch in (0, 2):
        for data in (old, new, half):
            data.set_epoch(epoch)
        want = per_sample(old, indices)
        assert_same_batch(new[indices], want)
        got = half[indices]
        assert got["visual_feats"].dtype == torch.float16  # the store's dtype unless asked otherwise
        assert torch.equal(got["visual_feats"].float(), want["visual_feats"])
    assert new.image_ids([0, 39]) == [examples[0].img_id, examples[39].img_id]


def batches_through(loader_workers: int, dataset, sampler, epoch: int, skip: int = 0) -> list[dict]:
    dataset.set_epoch(epoch)
    sampler.set_epoch(epoch, skip)
    return list(batch_loader(dataset, sampler, num_workers=loader_workers))


def test_worker_count_and_resume_see_the_same_batches(syn):
    _, store, _, _, corpus, _ = syn
    dataset = PretrainBatches(corpus, store, num_boxes=NUM_BOXES, seed=7)
    sampler = EpochBatchSampler(len(dataset), 16, rank=1, world=2, seed=7)
    full = batches_through(0, dataset, sampler, epoch=1)
    assert len(full) == len(sampler) == 6
    resumed = batches_through(2, dataset, sampler, epoch=1, skip=2)
    assert len(resumed) == len(full) - 2
    for got, want in zip(resumed, full[2:], strict=True):
        assert_same_batch(got, want)
    # Each batch is the rank's slice of the epoch's permutation, drawn for (seed, epoch, index).
    dataset.set_epoch(1)
    assert_same_batch(dataset[full[3]["index"].tolist()], full[3])


def test_device_prefetcher_passes_through_on_the_cpu(syn):
    _, store, _, _, corpus, _ = syn
    dataset = PretrainBatches(corpus, store, num_boxes=NUM_BOXES, feature_dtype=torch.float16)
    loader = batch_loader(dataset, EpochBatchSampler(len(dataset), 8, seed=0))
    pairs = list(DevicePrefetcher(loader, "cpu", feature_dtype=torch.float32))
    assert len(pairs) == len(loader)
    for host, device in pairs:
        assert host["visual_feats"].dtype == torch.float16 and device["visual_feats"].dtype == torch.float32
        assert torch.equal(device["visual_feats"], host["visual_feats"].float())
        assert all(device[k] is host[k] for k in host if k != "visual_feats")


def test_corpus_records_its_inputs_and_detects_stale_ones(syn, tmp_path, capsys):
    path, _, _, _, corpus, inputs = syn
    assert corpus_mismatch(corpus.directory, *inputs, max_seq_len=20, answer_dsets=["vqa"]) is None
    index = json.loads((path / "corpus" / "index.json").read_text())
    assert (
        index["version"] == 1 and index["num_sentences"] == len(corpus) and index["token_dtype"] == "uint16"
    )
    assert "max_seq_len=20, asked for max_seq_len=12" in corpus_mismatch(
        corpus.directory, *inputs, max_seq_len=12, answer_dsets=["vqa"]
    )
    assert "answer_dsets" in corpus_mismatch(corpus.directory, *inputs, max_seq_len=20, answer_dsets=QA)
    # A copy of the inputs, so touching them leaves the shared fixture alone.
    jsons, vocab, answers, store_dir = inputs
    copy = tmp_path / "train.json"
    copy.write_bytes(jsons[0].read_bytes())
    mine = ([copy], vocab, answers, store_dir)
    flags = {"--json": copy, "--vocab": vocab, "--answer_table": answers, "--store": store_dir}
    corpus_main(
        [str(tmp_path / "corpus"), *(str(x) for kv in flags.items() for x in kv), "--answer_dsets", "vqa"]
    )
    assert f"{len(corpus)} sentences (mscoco, vg, vqa)" in capsys.readouterr().out
    assert "built from" in corpus_mismatch(tmp_path / "corpus", *inputs, max_seq_len=20, answer_dsets=["vqa"])
    convert_tsv_to_store([path / "train_obj6.tsv"], tmp_path / "store")
    other_store = (*mine[:3], tmp_path / "store")
    why = corpus_mismatch(tmp_path / "corpus", *other_store, max_seq_len=20, answer_dsets=["vqa"])
    assert "is another store or was re-converted since" in why
    os.utime(copy, ns=(0, 0))
    why = corpus_mismatch(tmp_path / "corpus", *mine, max_seq_len=20, answer_dsets=["vqa"])
    assert "train.json changed since the corpus was built" in why
    # Default location: rebuilt; named by the user: refused; fresh: opened as is.
    with pytest.raises(CorpusMismatchError, match=r"changed since the corpus was built .* remove it"):
        ensure_corpus(tmp_path / "corpus", *mine, max_seq_len=20, answer_dsets=["vqa"], explicit=True)
    ensure_corpus(tmp_path / "corpus", *mine, max_seq_len=20, answer_dsets=["vqa"], progress=False)
    before = os.stat(tmp_path / "corpus" / "index.json").st_mtime_ns
    again = ensure_corpus(tmp_path / "corpus", *mine, max_seq_len=20, answer_dsets=["vqa"], explicit=True)
    assert os.stat(tmp_path / "corpus" / "index.json").st_mtime_ns == before and len(again) == len(corpus)
    index = json.loads((tmp_path / "corpus" / "index.json").read_text())
    (tmp_path / "corpus" / "index.json").write_text(json.dumps({**index, "version": 0}))
    with pytest.raises(ValueError, match="corpus version 0, expected 1; rebuild it"):
        Corpus(tmp_path / "corpus")


def test_damaged_corpus_is_refused_and_rebuilt(syn, tmp_path):
    _, _, _, _, _, inputs = syn
    out = tmp_path / "corpus"
    kwargs = dict(max_seq_len=20, answer_dsets=["vqa"], progress=False)
    build_corpus(out, *inputs, **kwargs)
    tokens = out / "tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-2])
    with pytest.raises(
        ValueError, match=r"tokens\.bin: \d+ bytes, expected \d+ bytes .* truncated or corrupted"
    ):
        Corpus(out)
    with pytest.raises(CorpusMismatchError, match="truncated"):
        ensure_corpus(out, *inputs, explicit=True, **kwargs)
    assert len(ensure_corpus(out, *inputs, **kwargs)) > 0  # the default location is rebuilt
    (out / "index.json").unlink()
    assert not is_corpus(out)
    with pytest.raises(FileNotFoundError, match="not a complete corpus store"):
        Corpus(out)
    with pytest.raises(CorpusMismatchError, match="not a complete corpus store"):
        ensure_corpus(out, *inputs, explicit=True, **kwargs)
    assert len(ensure_corpus(out, *inputs, **kwargs)) > 0
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds more than a corpus store"):
        build_corpus(out, *inputs, **kwargs)


def test_killed_build_leaves_the_old_corpus_or_the_new_one(syn, authors, tmp_path):
    out = tmp_path / "corpus"
    kwargs = dict(answer_dsets=QA, progress=False)
    build_corpus(out, *syn[5], max_seq_len=20, **kwargs)
    old, new = len(syn[4]), len(authors[4])
    point = 0
    while killed_at(point + 1, lambda: build_corpus(out, *authors[5], max_seq_len=8, **kwargs)):
        point += 1
        assert len(Corpus(out)) in (old, new), point
    assert point >= len(Corpus(out).files.specs) and len(Corpus(out)) == new
    atomic.remove_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]
