"""The pre-training input pipeline at the paper's size (issue #14): batch path vs the per-sample path.

Shapes: B=256, 20 word pieces, 36 boxes x 2048 fp16 features. Data, generated with numpy once into
a cache directory reused between runs (``LXMERT_BENCH_CACHE``, default ``$TMPDIR/lxmert_fast_bench_loader``,
about 1 GB; nothing in the repository):

* a corpus store of ``LXMERT_BENCH_SENTENCES`` sentences (default the paper's 9,180,000) over 180,000
  images, random word pieces (lengths 5-20), 40 % QA sentences with 1-4 answers of 9,500;
* a feature store whose index lists the 180,000 image ids, each pointing at the boxes of one of
  4,096 distinct images (images reused, round robin): 4,096 x 36 x 2048 fp16 = 604 MB on disk instead
  of 26.5 GB. Reads still go through the page cache at random rows; the machine's RAM holds all of it,
  as a GPU node's page cache would hold the real 26.5 GB.

Cases (numbers in ``extra_info``; the summary lines print with ``-s``):

* ``batch_in_process``: ``dataset[indices]`` for one batch in this process: the work of one worker
  process per batch, on one core; ``samples_per_s``.
* ``first_batch``: from opening the stores to the first batch out of a 1-worker loader. It runs
  before any other loader of the module, so it includes starting the forkserver the workers fork
  from (a fresh interpreter importing numpy, torch and ``lxmert_fast.data.batches``).
* ``workers[N]``: ``LXMERT_BENCH_BATCHES`` (default 1,000) batches through a loader of N = 1, 2, 4
  workers: samples/s, and the resident memory of the parent and of each worker after 10 batches
  and at the end (RSS, and PSS/USS: RSS counts the pages a worker shares with the process it was
  forked from, here the forkserver), and of the forkserver and resource tracker at the end.
* ``per_sample_in_process`` (last, so that its Python examples do not sit in the heap the workers
  of the cases above inherit): ``batch_in_process`` for the per-sample path (``PretrainDataset``
  items, Python examples, ``default_collate``) on ``LXMERT_BENCH_OLD_SENTENCES`` (default 200,000)
  sentences of the same shapes, and the Python memory of its examples per sentence, scaled to the
  paper's count.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time

import numpy as np
import psutil
import pytest
import torch
from torch.utils.data import default_collate

from lxmert_fast import atomic
from lxmert_fast.data import (
    Corpus,
    EpochBatchSampler,
    Example,
    FeatureStore,
    PretrainBatches,
    PretrainDataset,
    WordPieceTokenizer,
    batch_loader,
    is_corpus,
    is_store,
)
from lxmert_fast.data.corpus import write_corpus
from lxmert_fast.data.store import STORE_VERSION

BATCH, SEQ, BOXES, DIM = 256, 20, 36, 2048
IMAGES, DISTINCT_IMAGES, ANSWERS, VOCAB = 180_000, 4096, 9500, 30522
SENTENCES = int(os.environ.get("LXMERT_BENCH_SENTENCES", 9_180_000))
OLD_SENTENCES = int(os.environ.get("LXMERT_BENCH_OLD_SENTENCES", 200_000))
BATCHES = int(os.environ.get("LXMERT_BENCH_BATCHES", 1000))
CACHE = os.environ.get("LXMERT_BENCH_CACHE", os.path.join(tempfile.gettempdir(), "lxmert_fast_bench_loader"))
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _store_dir() -> str:
    path = os.path.join(CACHE, f"features_{IMAGES}_over_{DISTINCT_IMAGES}")
    if is_store(path):
        return path
    rng = np.random.default_rng(0)
    total = DISTINCT_IMAGES * BOXES
    with atomic.publishing_dir(path) as tmp:
        with open(os.path.join(tmp, "features.bin"), "wb") as f:
            for start in range(0, total, 8192):
                rows = min(8192, total - start)
                (rng.random((rows, DIM), np.float32) * 10).astype(np.float16).tofile(f)
        h, w = rng.integers(300, 640, DISTINCT_IMAGES), rng.integers(400, 640, DISTINCT_IMAGES)
        xy = rng.random((total, 2), np.float32) * 300
        boxes = np.concatenate([xy, xy + rng.random((total, 2), np.float32) * 100], 1)
        boxes.astype(np.float32).tofile(os.path.join(tmp, "boxes.bin"))
        for name, high in (("objects", 1600), ("attrs", 400)):
            rng.integers(0, high, total).astype(np.int64).tofile(os.path.join(tmp, f"{name}_id.bin"))
            rng.random(total, np.float32).tofile(os.path.join(tmp, f"{name}_conf.bin"))
        d = np.arange(IMAGES) % DISTINCT_IMAGES
        images = {
            f"img{i:06d}": [int(d[i]) * BOXES, BOXES, int(h[d[i]]), int(w[d[i]])] for i in range(IMAGES)
        }
        index = {
            "version": STORE_VERSION,
            "feature_dim": DIM,
            "feature_dtype": "float16",
            "num_boxes_total": total,
            "images": images,
            "built_from": {"sources": [], "fp16": True, "synthetic": "benchmarks/bench_loader.py"},
        }
        with open(os.path.join(tmp, "index.json"), "w") as f:
            json.dump(index, f)
    return path


def _corpus_dir(store_dir: str) -> str:
    path = os.path.join(CACHE, f"corpus_{SENTENCES}")
    store_index = os.path.join(store_dir, "index.json")
    if is_corpus(path):
        built = Corpus(path).index["built_from"]["feature_store"]
        if built["index"]["mtime_ns"] == os.stat(store_index).st_mtime_ns:
            return path
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, SEQ + 1, SENTENCES).astype(np.int16)
    tokens = rng.integers(len(SPECIAL) + 1000, VOCAB, (SENTENCES, SEQ), dtype=np.uint16)
    pos = np.arange(SEQ)
    tokens[:, 0] = 2
    tokens[pos[None, :] == lengths[:, None] - 1] = 3
    tokens[pos[None, :] >= lengths[:, None]] = 0
    counts = np.where(rng.random(SENTENCES) < 0.4, rng.integers(1, 5, SENTENCES), 0)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    arrays = {
        "tokens": tokens,
        "lengths": lengths,
        "image": (np.arange(SENTENCES, dtype=np.int64) * IMAGES // SENTENCES).astype(np.int32),
        "source": rng.integers(0, 5, SENTENCES).astype(np.uint8),
        "label_offsets": offsets,
        "label_ids": rng.integers(0, ANSWERS, int(offsets[-1])).astype(np.int32),
        "label_scores": rng.random(int(offsets[-1]), np.float32),
    }
    st = os.stat(store_index)
    info = {
        "vocab_size": VOCAB,
        "num_answers": ANSWERS,
        "special": {"pad": 0, "cls": 2, "sep": 3, "mask": 4},
        "sources": ["mscoco", "vg", "vqa", "gqa", "visual7w"],
        "built_from": {
            "synthetic": "benchmarks/bench_loader.py",
            "feature_store": {
                "path": os.path.abspath(store_dir),
                "index": {"path": store_index, "size": st.st_size, "mtime_ns": st.st_mtime_ns},
            },
        },
    }
    write_corpus(path, arrays, info)
    return path


@pytest.fixture(scope="module")
def stores() -> tuple[str, str, float]:
    start = time.perf_counter()
    store_dir = _store_dir()
    corpus_dir = _corpus_dir(store_dir)
    return store_dir, corpus_dir, time.perf_counter() - start


def _dataset(stores) -> PretrainBatches:
    return PretrainBatches(Corpus(stores[1]), FeatureStore(stores[0]), num_boxes=BOXES, seed=0)


def _memory(pid: int) -> dict[str, float]:
    """Resident memory of ``pid`` in MB: ``rss``; ``shm``, the part in shared memory (a worker's batches
    in flight to the parent); ``pss`` (shared pages split among their users) and ``uss`` (pages no other
    process maps): RSS also counts what a forked worker shares with its parent."""
    fields = {}
    for name in (f"/proc/{pid}/status", f"/proc/{pid}/smaps_rollup"):
        with open(name) as f:
            for line in f:
                key, _, rest = line.partition(":")
                if rest.strip().endswith("kB"):
                    fields[key] = int(rest.split()[0]) / 1024
    uss = fields["Private_Clean"] + fields["Private_Dirty"]
    return {
        "rss": round(fields["VmRSS"]),
        "shm": round(fields["RssShmem"]),
        "pss": round(fields["Pss"]),
        "uss": round(uss),
    }


def test_batch_in_process(benchmark, stores):
    dataset = _dataset(stores)
    sampler = EpochBatchSampler(len(dataset), BATCH, seed=0)
    batches = iter(sampler)
    dataset[next(batches)]
    benchmark.pedantic(lambda: dataset[next(batches)], rounds=40, iterations=1)
    rate = BATCH / benchmark.stats.stats.mean
    batch = dataset[next(batches)]
    assert batch["visual_feats"].shape == (BATCH, BOXES, DIM) and batch["visual_feats"].dtype == torch.float16
    benchmark.extra_info.update(
        {"samples_per_s": round(rate), "sentences": SENTENCES, "stores_ready_s": round(stores[2], 1)}
    )
    print(f"\nbatch path, one process: {rate:,.0f} samples/s ({SENTENCES:,} sentences)")


def test_first_batch(benchmark, stores):
    def first() -> float:
        start = time.perf_counter()
        dataset = _dataset(stores)
        sampler = EpochBatchSampler(len(dataset), BATCH, seed=0)
        sampler.set_epoch(3, skip=min(1000, len(sampler) - 1))
        loader = iter(batch_loader(dataset, sampler, num_workers=1))
        next(loader)
        seconds = time.perf_counter() - start
        del loader
        return seconds

    seconds = benchmark.pedantic(first, rounds=1, iterations=1)
    benchmark.extra_info.update({"first_batch_s": round(seconds, 2), "sentences": SENTENCES})
    print(f"\nfirst batch: {seconds:.2f} s from opening the stores ({SENTENCES:,} sentences, 1 worker)")


def _worker_memory(loader) -> list[dict[str, float]]:
    # The loader's own worker processes: with the forkserver start method they are children of the
    # forkserver, not of this process (DataLoader's iterator keeps them in ``_workers``).
    return [_memory(w.pid) for w in loader._workers]


def _helpers() -> dict[str, dict[str, float]]:
    """This process's other children (the forkserver, multiprocessing's resource tracker): one each
    per process, however many loaders and workers."""
    out = {}
    for child in psutil.Process().children():
        cmd = " ".join(child.cmdline())
        name = (
            "forkserver" if "forkserver" in cmd else "resource_tracker" if "resource_tracker" in cmd else cmd
        )
        out[name] = _memory(child.pid)
    return out


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_workers(benchmark, stores, workers):
    def run() -> dict:
        dataset = _dataset(stores)
        sampler = EpochBatchSampler(len(dataset), BATCH, seed=0)
        loader = iter(batch_loader(dataset, sampler, num_workers=workers))
        early, start = None, None
        for i in range(BATCHES):
            batch = next(loader)
            if i == 9:
                early = {"parent": _memory(os.getpid()), "workers": _worker_memory(loader)}
                start = time.perf_counter()
        rate = (BATCHES - 10) * BATCH / (time.perf_counter() - start)
        assert batch["input_ids"].shape == (BATCH, SEQ)
        late = {"parent": _memory(os.getpid()), "workers": _worker_memory(loader), "helpers": _helpers()}
        del loader
        return {"samples_per_s": round(rate), "after_10": early, f"after_{BATCHES}": late}

    result = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update({**result, "workers": workers, "batches": BATCHES})
    late = result[f"after_{BATCHES}"]
    print(
        f"\n{workers} worker(s): {result['samples_per_s']:,} samples/s over {BATCHES} batches; parent "
        f"{late['parent']}; workers after 10 batches {result['after_10']['workers']}, after {BATCHES} "
        f"{late['workers']}; helper processes {late['helpers']} (MB)"
    )


def test_per_sample_in_process(benchmark, stores):
    """The per-sample path at the same shapes on a smaller corpus (its Python examples would not fit
    at the paper's count on a small machine): samples/s and bytes of Python objects per sentence."""
    store = FeatureStore(stores[0])
    vocab_path = os.path.join(CACHE, "vocab.txt")
    if not os.path.isfile(vocab_path):
        with open(vocab_path, "w") as f:
            f.write("\n".join([*SPECIAL, *(f"w{i:05d}" for i in range(VOCAB - len(SPECIAL)))]) + "\n")
    tokenizer = WordPieceTokenizer(vocab_path)
    rng = np.random.default_rng(2)
    words = rng.integers(0, VOCAB - len(SPECIAL), (OLD_SENTENCES, 18))
    lengths = rng.integers(3, 19, OLD_SENTENCES)
    keys = store.keys()
    gc.collect()
    before = psutil.Process().memory_info().rss
    examples = [
        Example(
            f"{keys[i % IMAGES]}_vqa_{i}",
            keys[i * IMAGES // SENTENCES],
            " ".join(f"w{w:05d}" for w in words[i, : lengths[i]]),
            "vqa",
            {int(a): 1.0 for a in rng.integers(0, ANSWERS, 2)} if i % 5 < 2 else None,
        )
        for i in range(OLD_SENTENCES)
    ]
    per_sentence = (psutil.Process().memory_info().rss - before) / OLD_SENTENCES
    dataset = PretrainDataset(examples, store, tokenizer, max_seq_len=SEQ, num_boxes=BOXES, seed=0)
    batches = iter(EpochBatchSampler(len(dataset), BATCH, seed=0))

    def one_batch():
        return default_collate([dataset[i] for i in next(batches)])

    one_batch()
    benchmark.pedantic(one_batch, rounds=5, iterations=1)
    rate = BATCH / benchmark.stats.stats.mean
    paper_gb = per_sentence * 9_180_000 / 1e9
    benchmark.extra_info.update(
        {
            "samples_per_s": round(rate),
            "sentences": OLD_SENTENCES,
            "python_bytes_per_sentence": round(per_sentence),
            "python_gb_at_9.18M": round(paper_gb, 2),
        }
    )
    print(
        f"\nper-sample path, one process: {rate:,.0f} samples/s; its examples hold {per_sentence:.0f} B per "
        f"sentence, {paper_gb:.1f} GB at 9.18M"
    )
