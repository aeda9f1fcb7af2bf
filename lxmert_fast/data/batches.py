"""Batch-level loading for pre-training: one item is a whole collated batch, gathered with numpy.

:class:`PretrainBatches` reads a :class:`~lxmert_fast.data.corpus.Corpus` and a
:class:`~lxmert_fast.data.store.FeatureStore` by rows: ``dataset[indices]`` gathers the
sentences' word pieces, draws the mismatches, masks the words and samples the answers for the whole
batch at once with numpy, reads each image's boxes and features as one block per field (straight into
the output, in shared memory when in a worker), and returns the
same dict of fixed-shape tensors :class:`~lxmert_fast.data.pretrain.PretrainDataset` items collate to
(that per-sample path is kept as the oracle; the tests compare the two). The randomness is the
counter-based scheme of :mod:`lxmert_fast.data.randomness`, a pure function of
``(seed, epoch, index)``: resume and worker count do not change what is seen.

Loading: :func:`batch_loader` wraps it in a ``DataLoader`` driven by
:class:`~lxmert_fast.data.pretrain.EpochBatchSampler` (its order, resumption and rank split), its workers
started from a forkserver that imported only this module (:func:`worker_context`);
:class:`DevicePrefetcher` copies the next batch to the GPU on a side stream while the current one
trains (a passthrough on the CPU).

Memory: a worker holds file descriptors and four integers per image (first box, count, size), no
per-sentence or per-image Python object, and reads rows with ``pread``
(:class:`~lxmert_fast.data.corpus.ArrayFiles`), nothing mapped: its resident memory stays flat however
long it runs and however big the stores are (the data lives in the page cache, shared by all).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from lxmert_fast.data import randomness
from lxmert_fast.data.corpus import ArrayFiles, Corpus
from lxmert_fast.data.pretrain import EpochBatchSampler
from lxmert_fast.data.store import FIELD_DTYPES, FeatureStore

_TORCH_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty CPU tensor, in shared memory when built in a loader worker: the batch then travels
    to the main process without the copy into shared memory its pickling would make. In the main
    process numpy allocates it: numpy asks for transparent huge pages, and a fresh 38 MB batch in
    4 KB pages costs three times its copy in page faults."""
    if get_worker_info() is None:
        return torch.from_numpy(np.empty(shape, torch.empty(0, dtype=dtype).numpy().dtype))
    elem = torch.empty(0, dtype=dtype)
    storage = elem._typed_storage()._new_shared(int(np.prod(shape)), device="cpu")
    return elem.new(storage).resize_(shape)


class PretrainBatches(Dataset):
    """Pre-training batches: ``dataset[indices]`` → dict of tensors, the collated
    :class:`~lxmert_fast.data.pretrain.PretrainDataset` items of those indices.

    ``input_ids``/``mlm_labels``/``token_type_ids`` int64 [B, T] and ``attention_mask`` float32 [B, T]
    (T = the corpus's ``max_seq_len``); ``visual_feats`` [B, N, D] in ``feature_dtype`` (default: the
    store's, float16 for a store converted with fp16 — half the bytes to pin and copy; cast on the
    device, see :class:`DevicePrefetcher`), ``visual_pos`` float32 [B, N, 4], ``visual_mask`` float32
    [B, N]; ``obj_ids``/``attr_ids`` int64 [B, N] (-1 on padding), ``obj_conf``/``attr_conf`` float32
    [B, N]; ``matched_label``, ``qa_label``, ``index`` int64 [B].

    ``mask_object_words``: word-piece ids; every such piece is replaced by [MASK] and nothing else is
    masked (the held-out probe). ``len(dataset)`` is the number of sentences (the sampler's items).
    """

    def __init__(
        self,
        corpus: Corpus,
        store: FeatureStore,
        num_boxes: int = 36,
        word_mask_rate: float = 0.15,
        mismatch_rate: float = 0.5,
        seed: int = 0,
        mask_object_words: Iterable[int] | None = None,
        feature_dtype: torch.dtype | None = None,
    ) -> None:
        built_on = corpus.index["built_from"]["feature_store"]["path"]
        if os.path.abspath(store.directory) != built_on:
            raise ValueError(
                f"{corpus.directory}: built against the feature store {built_on}, not {store.directory}"
            )
        self.corpus, self._store = corpus, store
        self.store_directory, self.store_feature_dim = store.directory, store.feature_dim
        self.store_feature_dtype = store.feature_dtype
        self.max_seq_len = corpus.max_seq_len
        self.num_boxes = num_boxes
        self.word_mask_rate, self.mismatch_rate, self.seed = word_mask_rate, mismatch_rate, seed
        self.mask_object_words = (
            None if mask_object_words is None else np.array(sorted(mask_object_words), np.int64)
        )
        if feature_dtype is not None and feature_dtype not in _TORCH_DTYPES.values():
            raise ValueError(
                f"feature_dtype: expected torch.float16, torch.float32 or None, got {feature_dtype}"
            )
        self.feature_dtype = feature_dtype or _TORCH_DTYPES[store.feature_dtype]
        # [first box, boxes, img_h, img_w] per image in the store's order (the corpus's image index).
        self.images = np.array(list(store.images.values()), np.int64).reshape(-1, 4)
        total, dim = store.num_boxes_total, store.feature_dim
        specs = {name: (np.dtype(dtype), (total,)) for name, dtype in FIELD_DTYPES.items()}
        specs["boxes"] = (np.dtype(np.float32), (total, 4))
        specs["features"] = (store.feature_dtype, (total, dim))
        self.features = ArrayFiles(store.directory, specs, "feature store")
        self.epoch = 0

    def __getstate__(self) -> dict:
        # A worker gets no FeatureStore: its index is a dict of every image id (tens of MB of Python
        # objects at 180k images) and the worker reads rows through ``features``/``images``. It is
        # reopened from the directory only to name an image in an error (:attr:`store`).
        return {**self.__dict__, "_store": None}

    @property
    def store(self) -> FeatureStore:
        if self._store is None:
            self._store = FeatureStore(self.store_directory)
        return self._store

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.corpus)

    def image_ids(self, indices: Sequence[int]) -> list[str]:
        """The image ids of sentences ``indices`` (for error messages)."""
        keys = self.store.keys()
        return [keys[i] for i in self.corpus.files.take("image", np.asarray(indices, np.int64))]

    def __getitem__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, np.int64)
        corpus, key = self.corpus, (self.seed, self.epoch, idx)
        image = corpus.files.take("image", idx).astype(np.int64)
        own = randomness.sample_draws(*key)
        sentence, matched = idx.copy(), np.ones(len(idx), np.int64)
        if self.mismatch_rate > 0 and len(corpus) > 1:
            rows = np.flatnonzero(randomness.uniform(own[:, 0]) < self.mismatch_rate)
            if rows.size:
                # The first of 16 candidates that shows another image; none: the sentence stays. The
                # candidates' images are read round by round, only for the rows still looking.
                cand = randomness.below(randomness.other_draws(self.seed, self.epoch, idx[rows]), len(corpus))
                pick = np.full(len(rows), -1, np.int64)
                for t in range(cand.shape[1]):
                    looking = np.flatnonzero(pick < 0)
                    if not looking.size:
                        break
                    other = corpus.files.take("image", cand[looking, t]) != image[rows[looking]]
                    pick[looking[other]] = cand[looking[other], t]
                found = pick >= 0
                sentence[rows[found]] = pick[found]
                matched[rows[found]] = 0
        out = self._words(idx, sentence)
        out["qa_label"] = torch.from_numpy(self._answers(idx, matched, own[:, 1]))
        out["matched_label"] = torch.from_numpy(matched)
        out["index"] = torch.from_numpy(idx.copy())
        out.update(self._images(image))
        return out

    def _words(self, idx: np.ndarray, sentence: np.ndarray) -> dict[str, torch.Tensor]:
        corpus, special = self.corpus, self.corpus.special
        tokens = corpus.files.take("tokens", sentence).astype(np.int64)
        lengths = corpus.files.take("lengths", sentence).astype(np.int64)[:, None]
        pos = np.arange(self.max_seq_len)
        inside = pos < lengths
        if self.mask_object_words is not None:
            labels = np.where(np.isin(tokens, self.mask_object_words) & inside, tokens, -1)
            ids = np.where(labels >= 0, special["mask"], tokens)
        else:
            words = randomness.word_draws(self.seed, self.epoch, idx, self.max_seq_len)
            chosen = (
                (randomness.uniform(words[..., 0]) < self.word_mask_rate) & (pos >= 1) & (pos < lengths - 1)
            )
            labels = np.where(chosen, tokens, -1)
            action = randomness.uniform(words[..., 1])
            ids = tokens
            ids[chosen & (action < 0.8)] = special["mask"]
            replace = chosen & (action >= 0.8) & (action < 0.9)
            ids[replace] = randomness.below(words[..., 2][replace], corpus.vocab_size)
        return {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(inside.astype(np.float32)),
            "token_type_ids": torch.zeros(ids.shape, dtype=torch.int64),
            "mlm_labels": torch.from_numpy(labels),
        }

    def _answers(self, idx: np.ndarray, matched: np.ndarray, word: np.ndarray) -> np.ndarray:
        corpus = self.corpus
        qa = np.full(len(idx), -1, np.int64)
        bounds = corpus.files.take_blocks("label_offsets", idx, np.full(len(idx), 2))
        start, end = bounds[:, 0], bounds[:, 1]
        rows = np.flatnonzero((matched == 1) & (end > start))
        if rows.size:
            count = end[rows] - start[rows]
            scores = np.zeros((rows.size, int(count.max())), np.float32)
            corpus.files.take_blocks("label_scores", start[rows], count, out=scores)
            answers = corpus.files.take_blocks("label_ids", start[rows], count)
            pick = randomness.pick_answer(scores, word[rows])
            qa[rows] = np.where(pick >= 0, answers[np.arange(rows.size), np.maximum(pick, 0)], -1)
        return qa

    def _images(self, image: np.ndarray) -> dict[str, torch.Tensor]:
        f = self.features
        first, count, img_h, img_w = self.images[image].T
        bad = (img_h <= 0) | (img_w <= 0)
        if bad.any():
            b = int(np.argmax(bad))
            raise ValueError(
                f"image {self.store.keys()[image[b]]!r} in {self.store_directory}: expected a positive image "
                f"size (boxes are divided by it), got img_h={img_h[b]}, img_w={img_w[b]}"
            )
        batch, n = len(image), self.num_boxes
        count = np.minimum(count, n)
        real = np.arange(n) < count[:, None]
        fields = {
            name: f.take_blocks(name, first, count, out=_zeros(name, f, batch, n)) for name in FIELD_DTYPES
        }
        boxes = fields["boxes"]
        finite = np.isfinite(boxes).all(axis=2) | ~real
        if not finite.all():
            b = int(np.argmax(~finite.all(axis=1)))
            raise ValueError(
                f"image {self.store.keys()[image[b]]!r} in {self.store_directory}: boxes hold NaN or Inf, "
                "expected finite pixel coordinates"
            )
        size = np.stack([img_w, img_h, img_w, img_h], axis=1).astype(np.float32)[:, None, :]
        pos = np.where(real[..., None], np.clip(boxes / size, 0.0, 1.0), np.float32(0))
        feats = _empty((batch, n, self.store_feature_dim), self.feature_dtype)
        if feats.dtype == _TORCH_DTYPES[self.store_feature_dtype]:
            f.take_blocks("features", first, count, out=feats.numpy())
        else:
            feats.numpy()[:] = f.take_blocks("features", first, count, out=_zeros("features", f, batch, n))
        if not real.all():
            feats.numpy()[~real] = 0
        out = {
            "visual_feats": feats,
            "visual_pos": torch.from_numpy(pos.astype(np.float32, copy=False)),
            "visual_mask": torch.from_numpy(real.astype(np.float32)),
        }
        for key, field in (("obj", "objects"), ("attr", "attrs")):
            out[f"{key}_ids"] = torch.from_numpy(np.where(real, fields[f"{field}_id"], -1).astype(np.int64))
            out[f"{key}_conf"] = torch.from_numpy(fields[f"{field}_conf"])
        return out


def _zeros(name: str, files: ArrayFiles, batch: int, n: int) -> np.ndarray:
    dtype, shape = files.specs[name]
    return np.zeros((batch, n, *shape[1:]), dtype)


def worker_context() -> multiprocessing.context.BaseContext | None:
    """The start method :func:`batch_loader` gives its workers: ``forkserver`` where the platform has
    it (``None``, DataLoader's default, elsewhere).

    A forked worker inherits the whole parent: its resident memory counts every page the parent holds
    (torch, the model and its kernels, DeepSpeed, the trainer's heap: 300 MB and more before the
    worker reads a byte), and it grows as the parent's objects are touched. A forkserver worker is
    forked from a small server process that imported only this module (numpy, torch's shared-memory
    tensors, the store readers: ``set_forkserver_preload``), so it starts in milliseconds without
    re-importing torch and holds what the loader needs. The main module is still imported in the
    worker as multiprocessing always does outside ``fork``: a script must start the loader under
    ``if __name__ == "__main__":`` and should keep its top level light (``lxmert_fast`` imports its
    model lazily). The preload list is the process's (``"__main__"``, Python's default, and this
    module); it applies when the forkserver starts, the first time any code in the process uses it.
    """
    global _preload_set
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    context = multiprocessing.get_context("forkserver")
    if not _preload_set:
        context.set_forkserver_preload(["__main__", __name__])
        _preload_set = True
    return context


_preload_set = False


def batch_loader(
    dataset: PretrainBatches,
    sampler: EpochBatchSampler,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    multiprocessing_context: str | multiprocessing.context.BaseContext | None = None,
) -> DataLoader:
    """A ``DataLoader`` over whole batches: ``sampler`` yields each batch's indices, a worker builds the
    batch (``dataset[indices]``), nothing is collated again. Call ``dataset.set_epoch`` and
    ``sampler.set_epoch(epoch, skip)`` before iterating, as with the per-sample path.

    Workers start through :func:`worker_context` (a forkserver) unless ``multiprocessing_context``
    names another method (``"fork"``, ``"spawn"``); the batches are the same either way."""
    if num_workers and multiprocessing_context is None:
        multiprocessing_context = worker_context()
        if multiprocessing_context is not None:
            # Start the server now: it imports torch while the caller sets up, not at the first batch.
            multiprocessing.forkserver.ensure_running()
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers else None,
        multiprocessing_context=multiprocessing_context if num_workers else None,
    )


class DevicePrefetcher:
    """Iterate over ``loader``'s batches as ``(host_batch, device_batch)`` pairs, the next batch already
    on its way to the device while the current one is used.

    On CUDA the copy of batch ``i + 1`` is issued (``non_blocking``, from pinned memory when the loader
    pins) on a side stream before batch ``i`` is handed out; the compute stream waits for that copy
    only when it takes the batch. ``feature_dtype`` casts ``visual_feats`` after the copy (a float16
    store moves half the bytes and the model still gets float32). On the CPU it is a passthrough (the
    cast aside): ``device_batch`` holds the host tensors. The host batch stays available for checks
    and host-side work (e.g. ``pretraining.head_positions``) that must not read device memory.
    """

    def __init__(
        self, loader: Iterable[dict], device: torch.device | str, feature_dtype: torch.dtype | None = None
    ) -> None:
        self.loader, self.device, self.feature_dtype = loader, torch.device(device), feature_dtype

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def _cast(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.feature_dtype is not None and batch["visual_feats"].dtype != self.feature_dtype:
            batch = {**batch, "visual_feats": batch["visual_feats"].to(self.feature_dtype)}
        return batch

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        if self.device.type != "cuda":
            for host in self.loader:
                yield host, self._cast(host)
            return
        stream = torch.cuda.Stream(self.device)
        batches = iter(self.loader)

        def issue() -> tuple[dict, dict] | None:
            host = next(batches, None)
            if host is None:
                return None
            with torch.cuda.stream(stream):
                device = {k: v.to(self.device, non_blocking=True) for k, v in host.items()}
                return host, self._cast(device)

        ahead = issue()
        while ahead is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(stream)
            for tensor in ahead[1].values():
                # Allocated on the side stream, used on this one: not reused before this use is done.
                tensor.record_stream(current)
            batch, ahead = ahead, issue()
            yield batch
