"""Pre-tokenised corpus store: the pre-training sentences as flat arrays on disk, read by rows.

``python -m lxmert_fast.data.convert_corpus OUT_DIR --json train.json [...] --vocab vocab.txt
--answer_table all_ans.json --store FEATURE_STORE``: built once, next to the feature store.

At the paper's 9.18M sentences, one Python ``Example`` per sentence costs gigabytes in every loader
worker (copy-on-write touches them all). Here each sentence is a row of fixed-width arrays, tokenised
and labelled at build time, so a worker holds no per-sentence object and reads just the rows a batch
needs (:mod:`lxmert_fast.data.batches`). The sentences are :func:`build_examples`'s, in
its order (index ``i`` here is example ``i`` there), with the answer table (and its dataset filter)
applied and the images without features dropped.

Layout of a corpus directory (N sentences, T = max_seq_len, L answer entries)::

    index.json          {"version", "kind": "corpus", "num_sentences", "max_seq_len", "token_dtype",
                         "num_labels", "vocab_size", "num_answers", "special": {pad, cls, sep, mask},
                         "sources": [name, ...],
                         "built_from": {json, vocab, answer_table (path, size, mtime_ns each),
                                        answer_dsets, sources, max_seq_len,
                                        feature_store: {path, index: its index.json's record}},
                         "files": {file name: bytes}}
    tokens.bin          [N, T] uint16 (int32 for a vocabulary over 65,536): [CLS] pieces [SEP], then [PAD]
    lengths.bin         [N]    int16   tokens before the padding
    image.bin           [N]    int32   the image's position in the feature store's order
    source.bin          [N]    uint8   index into "sources"
    label_offsets.bin   [N+1]  int64   sentence i's answers are entries offsets[i] .. offsets[i+1]-1
    label_ids.bin       [L]    int32   answer ids, ascending within a sentence
    label_scores.bin    [L]    float32 their scores (summed over raw answers that normalise alike)

Like the feature store it is built in a temporary sibling and published whole by one rename
(:func:`lxmert_fast.atomic.publishing_dir`; ``index.json``, written last, marks it complete), records
what it was built from, and is checked when opened: another version, a missing ``index.json``, a file of
the wrong size or inputs changed since (:func:`corpus_mismatch`) are reported, never read.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from lxmert_fast import atomic
from lxmert_fast.data.answers import AnswerTable
from lxmert_fast.data.jsonfile import read_json
from lxmert_fast.data.pretrain import iter_examples, load_pretrain_json
from lxmert_fast.data.store import INDEX_NAME, FeatureStore, source_record
from lxmert_fast.data.tokenization import WordPieceTokenizer

CORPUS_VERSION = 1
ARRAY_NAMES = ("tokens", "lengths", "image", "source", "label_offsets", "label_ids", "label_scores")
_FIXED_DTYPES = {
    "lengths": np.int16,
    "image": np.int32,
    "source": np.uint8,
    "label_offsets": np.int64,
    "label_ids": np.int32,
    "label_scores": np.float32,
}
_CHUNK = 65536


class CorpusMismatchError(ValueError):
    """A corpus store named explicitly is not a build of the inputs given (or is damaged)."""


class ArrayFiles:
    """Flat binary files of one directory: ``take``/``take_blocks`` read rows with ``pread``, and
    ``files[name]`` maps a whole file read-only as a numpy array.

    The loader reads by rows: a mapped file's pages count in the resident memory of every process that
    touched them (the kernel maps whole large folios, ~100 KB and more, around each random access:
    one batch mapped 225 MB of a 9.18M-sentence corpus here), while ``pread`` copies just the bytes
    asked for out of the page cache, which every worker shares. Files open lazily in each process (the
    object pickles without its descriptors and maps), after a size check naming the file.
    """

    def __init__(self, directory: str, specs: dict[str, tuple[np.dtype, tuple[int, ...]]], what: str) -> None:
        self.directory, self.what = directory, what
        self.specs = {name: (np.dtype(dtype), tuple(shape)) for name, (dtype, shape) in specs.items()}
        # Inherited by forked workers as they are: pread takes its offset, so no file position is shared.
        self._fds: dict[str, int] = {}
        self._arrays: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": {}, "_arrays": {}}

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def check(self) -> None:
        for name, (dtype, shape) in self.specs.items():
            path = os.path.join(self.directory, f"{name}.bin")
            want = int(np.prod(shape)) * dtype.itemsize
            have = os.path.getsize(path) if os.path.isfile(path) else None
            if have != want:
                found = "missing" if have is None else f"{have} bytes"
                raise ValueError(
                    f"{path}: {found}, expected {want} bytes ({' x '.join(map(str, shape))} "
                    f"{dtype.name}, as {INDEX_NAME} says); the {self.what} is truncated or "
                    "corrupted: rebuild it"
                )

    def _fd(self, name: str) -> int:
        if name not in self._fds:
            if not self._fds:
                self.check()
            self._fds[name] = os.open(os.path.join(self.directory, f"{name}.bin"), os.O_RDONLY)
        return self._fds[name]

    def __getitem__(self, name: str) -> np.ndarray:
        """The whole file ``name`` as a read-only array (mapped; for inspection, not the loader)."""
        if name not in self._arrays:
            dtype, shape = self.specs[name]
            if int(np.prod(shape)) == 0:
                self._arrays[name] = np.zeros(shape, dtype)
            else:
                self.check()
                self._arrays[name] = np.memmap(
                    os.path.join(self.directory, f"{name}.bin"), dtype=dtype, mode="r", shape=shape
                )
        return self._arrays[name]

    def take(self, name: str, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` of ``name``: [len(index), *row shape], one ``pread`` per row."""
        index = np.asarray(index, np.int64).ravel()
        return self.take_blocks(name, index, np.ones(len(index), np.int64))[:, 0]

    def take_blocks(
        self, name: str, starts: np.ndarray, counts: np.ndarray, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Rows ``starts[b] .. starts[b] + counts[b] - 1`` of ``name`` into ``out[b, :counts[b]]`` (one
        ``pread`` per block; ``out`` [len(starts), width, *row shape], C-contiguous, allocated when
        None, rows past a block's count left as they are); returns ``out``."""
        dtype, shape = self.specs[name]
        starts, counts = np.asarray(starts, np.int64), np.asarray(counts, np.int64)
        if out is None:
            out = np.empty((len(starts), max(int(counts.max(initial=0)), 1), *shape[1:]), dtype)
        if out.dtype != dtype or not out.flags.c_contiguous or (counts > out.shape[1]).any():
            raise ValueError(
                f"take_blocks({name!r}): out must be C-contiguous {dtype} with room for the blocks"
            )
        if len(starts) and ((starts < 0).any() or (starts + counts > shape[0]).any()):
            raise IndexError(f"{self.directory}/{name}.bin: rows out of range 0 .. {shape[0] - 1}")
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        stride = out.shape[1] * row
        fd, buf = self._fd(name), memoryview(out.reshape(-1).view(np.uint8))
        for b, (start, count) in enumerate(zip(starts.tolist(), counts.tolist(), strict=True)):
            if count:
                view = buf[b * stride : b * stride + count * row]
                if os.preadv(fd, [view], start * row) != count * row:
                    raise ValueError(f"{self.directory}/{name}.bin: short read; the file changed while open")
        return out


def is_corpus(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, INDEX_NAME))


class Corpus:
    """An open corpus store: ``len(corpus)`` sentences, the index's fields, row reads through
    ``corpus.files`` (:class:`ArrayFiles`: what the loader uses) and the whole arrays as attributes
    (memory-mapped, read-only: for inspection). Cheap to pickle into loader workers."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = os.path.abspath(directory)
        index_path = os.path.join(self.directory, INDEX_NAME)
        if not os.path.isfile(index_path):
            raise FileNotFoundError(
                f"{self.directory}: no {INDEX_NAME}; not a complete corpus store (build it with "
                "`python -m lxmert_fast.data.convert_corpus`)"
            )
        index = read_json(index_path)
        if not isinstance(index, dict) or index.get("kind") != "corpus":
            raise ValueError(f"{index_path}: not a corpus store index")
        if index.get("version") != CORPUS_VERSION:
            raise ValueError(
                f"{index_path}: corpus version {index.get('version')}, expected {CORPUS_VERSION}; rebuild it"
            )
        self.index = index
        self.num_sentences: int = index["num_sentences"]
        self.max_seq_len: int = index["max_seq_len"]
        self.vocab_size: int = index["vocab_size"]
        self.num_answers: int = index["num_answers"]
        self.special: dict[str, int] = index["special"]
        self.sources: list[str] = index["sources"]
        n, t = self.num_sentences, self.max_seq_len
        shapes = {
            "tokens": (n, t),
            "lengths": (n,),
            "image": (n,),
            "source": (n,),
            "label_offsets": (n + 1,),
            "label_ids": (index["num_labels"],),
            "label_scores": (index["num_labels"],),
        }
        dtypes = dict(_FIXED_DTYPES, tokens=np.dtype(index["token_dtype"]))
        self.files = ArrayFiles(
            self.directory, {k: (dtypes[k], shapes[k]) for k in ARRAY_NAMES}, "corpus store"
        )
        self.files.check()

    def __len__(self) -> int:
        return self.num_sentences

    @property
    def tokens(self) -> np.ndarray:
        return self.files["tokens"]

    @property
    def lengths(self) -> np.ndarray:
        return self.files["lengths"]

    @property
    def image(self) -> np.ndarray:
        return self.files["image"]

    @property
    def source(self) -> np.ndarray:
        return self.files["source"]

    @property
    def label_offsets(self) -> np.ndarray:
        return self.files["label_offsets"]

    @property
    def label_ids(self) -> np.ndarray:
        return self.files["label_ids"]

    @property
    def label_scores(self) -> np.ndarray:
        return self.files["label_scores"]


def _built_from(
    json_paths: Sequence[str],
    vocab: str,
    answer_table: str,
    answer_dsets: Iterable[str] | None,
    store_dir: str,
    max_seq_len: int,
    sources: Iterable[str] | None,
) -> dict[str, Any]:
    return {
        "json": source_record(json_paths),
        "vocab": source_record([vocab])[0],
        "answer_table": source_record([answer_table])[0],
        "answer_dsets": None if answer_dsets is None else sorted(answer_dsets),
        "sources": None if sources is None else sorted(sources),
        "max_seq_len": max_seq_len,
        "feature_store": {
            "path": os.path.abspath(store_dir),
            "index": source_record([os.path.join(store_dir, INDEX_NAME)])[0],
        },
    }


def write_corpus(
    out_dir: str | os.PathLike, arrays: dict[str, np.ndarray], info: dict[str, Any]
) -> dict[str, Any]:
    """Publish ``arrays`` (every name of :data:`ARRAY_NAMES`, dtypes as the layout says) as a corpus
    store at ``out_dir`` with the index fields ``info`` (``vocab_size``, ``num_answers``, ``special``,
    ``sources``, ``built_from``); returns the index. Atomic: a reader sees the old store or this one."""
    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        others = sorted(set(os.listdir(out_dir)) - {INDEX_NAME, *(f"{n}.bin" for n in ARRAY_NAMES)})
        if others:
            raise FileExistsError(
                f"{out_dir}: exists and holds more than a corpus store ({others}); building replaces the "
                "whole directory: choose an empty or new one"
            )
    n, t = arrays["tokens"].shape
    with atomic.publishing_dir(out_dir) as tmp:
        for name in ARRAY_NAMES:
            dtype = arrays["tokens"].dtype if name == "tokens" else _FIXED_DTYPES[name]
            with open(os.path.join(tmp, f"{name}.bin"), "wb") as f:
                np.ascontiguousarray(arrays[name], dtype=dtype).tofile(f)
            atomic.fault_point(f"{out_dir}: wrote {name}.bin")
        index = {
            "version": CORPUS_VERSION,
            "kind": "corpus",
            "num_sentences": n,
            "max_seq_len": t,
            "token_dtype": arrays["tokens"].dtype.name,
            "num_labels": len(arrays["label_ids"]),
            **info,
            "files": {name: os.path.getsize(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))},
        }
        with open(os.path.join(tmp, INDEX_NAME), "w") as f:
            json.dump(index, f)
    return index


def build_corpus(
    out_dir: str | os.PathLike,
    json_paths: Sequence[str | os.PathLike],
    vocab: str | os.PathLike,
    answer_table: str | os.PathLike,
    store_dir: str | os.PathLike,
    max_seq_len: int = 20,
    answer_dsets: Iterable[str] | None = None,
    sources: Iterable[str] | None = None,
    progress: bool = True,
) -> Corpus:
    """Tokenise and label the sentences of the pre-training JSON ``json_paths`` whose images are in the
    feature store ``store_dir`` (the examples :func:`build_examples` makes with the answer table
    filtered to ``answer_dsets`` and the ``sources`` kept) and publish them at ``out_dir``."""
    json_paths = [os.fspath(p) for p in json_paths]
    vocab, answer_table, store_dir = os.fspath(vocab), os.fspath(answer_table), os.fspath(store_dir)
    if not 3 <= max_seq_len <= np.iinfo(np.int16).max:
        raise ValueError(f"max_seq_len: expected 3 .. 32767 ([CLS], a piece, [SEP]), got {max_seq_len}")
    answer_dsets = None if answer_dsets is None else list(answer_dsets)
    sources = None if sources is None else list(sources)
    built_from = _built_from(json_paths, vocab, answer_table, answer_dsets, store_dir, max_seq_len, sources)
    tokenizer = WordPieceTokenizer(vocab)
    table = AnswerTable.load(answer_table, dsets=answer_dsets)
    store = FeatureStore(store_dir)
    image_pos = {img_id: i for i, img_id in enumerate(store.keys())}
    data = load_pretrain_json(json_paths)
    token_dtype = np.uint16 if len(tokenizer) <= 2**16 else np.int32
    source_ids: dict[str, int] = {}
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ARRAY_NAMES}
    counts: list[np.ndarray] = []
    total = 0

    def flush(batch: list) -> None:
        nonlocal total
        encoded = tokenizer.encode_batch([ex.sent for ex in batch], max_seq_len)
        tokens = np.full((len(batch), max_seq_len), tokenizer.pad_id, token_dtype)
        for row, ids in zip(tokens, encoded, strict=True):
            row[: len(ids)] = ids
        parts["tokens"].append(tokens)
        parts["lengths"].append(np.array([len(ids) for ids in encoded], np.int16))
        parts["image"].append(np.array([image_pos[ex.img_id] for ex in batch], np.int32))
        parts["source"].append(np.array([source_ids.setdefault(ex.source, len(source_ids)) for ex in batch]))
        labels = [sorted(ex.label.items()) if ex.label else [] for ex in batch]
        counts.append(np.array([len(lab) for lab in labels], np.int64))
        parts["label_ids"].append(np.array([a for lab in labels for a, _ in lab], np.int32))
        parts["label_scores"].append(np.array([s for lab in labels for _, s in lab], np.float32))
        total += len(batch)
        batch.clear()

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(data), desc=f"corpus {os.path.basename(os.fspath(out_dir))}", unit="image")
    pending: list = []
    with contextlib.ExitStack() as stack:
        if bar is not None:
            stack.callback(bar.close)
        data_iter = data if bar is None else _counting(data, bar)
        for example in iter_examples(data_iter, table, sources, image_ids=image_pos):
            pending.append(example)
            if len(pending) == _CHUNK:
                flush(pending)
        if pending:
            flush(pending)
    if len(source_ids) > 255:
        raise ValueError(f"{json_paths}: {len(source_ids)} sentence sources, at most 255 are stored")
    if total == 0:
        raise ValueError(
            f"{json_paths}: no sentence has image features in {store_dir} (the corpus would be empty)"
        )
    arrays = {name: np.concatenate(chunks) for name, chunks in parts.items() if name != "label_offsets"}
    arrays["label_offsets"] = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)
    info = {
        "vocab_size": len(tokenizer),
        "num_answers": len(table),
        "special": {
            "pad": tokenizer.pad_id,
            "cls": tokenizer.cls_id,
            "sep": tokenizer.sep_id,
            "mask": tokenizer.mask_id,
        },
        "sources": sorted(source_ids, key=source_ids.get),
        "built_from": built_from,
    }
    write_corpus(out_dir, arrays, info)
    return Corpus(out_dir)


def _counting(data: list, bar) -> Iterable[dict]:
    for datum in data:
        yield datum
        bar.update(1)


def corpus_mismatch(
    directory: str | os.PathLike,
    json_paths: Sequence[str | os.PathLike],
    vocab: str | os.PathLike,
    answer_table: str | os.PathLike,
    store_dir: str | os.PathLike,
    max_seq_len: int = 20,
    answer_dsets: Iterable[str] | None = None,
    sources: Iterable[str] | None = None,
) -> str | None:
    """Why the corpus store at ``directory`` is not a build of these inputs as they are now (None when
    it is): incomplete, damaged, another version, other files, a file changed since, another answer
    filter, sentence length or feature store."""
    directory = os.fspath(directory)
    try:
        corpus = Corpus(directory)
    except (OSError, ValueError) as exc:
        return str(exc)
    built = corpus.index.get("built_from")
    if not isinstance(built, dict) or "json" not in built:
        return f"{directory}: the corpus does not record what it was built from"
    want = _built_from(
        [os.fspath(p) for p in json_paths],
        os.fspath(vocab),
        os.fspath(answer_table),
        None if answer_dsets is None else list(answer_dsets),
        os.fspath(store_dir),
        max_seq_len,
        None if sources is None else list(sources),
    )
    old_json, new_json = built.get("json", []), want["json"]
    if [s["path"] for s in old_json] != [s["path"] for s in new_json]:
        return f"{directory}: built from {[s['path'] for s in old_json]}, not {[s['path'] for s in new_json]}"
    for key in ("json", "vocab", "answer_table"):
        olds = built.get(key) if key == "json" else [built.get(key)]
        news = want[key] if key == "json" else [want[key]]
        for old, new in zip(olds, news, strict=True):
            if not isinstance(old, dict) or old.get("path") != new["path"]:
                return f"{directory}: built with {key} {old and old.get('path')}, not {new['path']}"
            if (old.get("size"), old.get("mtime_ns")) != (new["size"], new["mtime_ns"]):
                return f"{directory}: {new['path']} changed since the corpus was built (size or modification time)"
    for key in ("answer_dsets", "sources", "max_seq_len"):
        if built.get(key) != want[key]:
            return f"{directory}: built with {key}={built.get(key)}, asked for {key}={want[key]}"
    if built.get("feature_store") != want["feature_store"]:
        return (
            f"{directory}: built against the feature store {built.get('feature_store', {}).get('path')} as it "
            f"was then; {want['feature_store']['path']} is another store or was re-converted since"
        )
    return None


def ensure_corpus(
    corpus_dir: str | os.PathLike,
    json_paths: Sequence[str | os.PathLike],
    vocab: str | os.PathLike,
    answer_table: str | os.PathLike,
    store_dir: str | os.PathLike,
    max_seq_len: int = 20,
    answer_dsets: Iterable[str] | None = None,
    sources: Iterable[str] | None = None,
    explicit: bool = False,
    progress: bool = True,
) -> Corpus:
    """The corpus store at ``corpus_dir`` for these inputs, opened; built first when absent.

    A store that is not a build of these inputs as they are now (:func:`corpus_mismatch`: incomplete,
    damaged, stale) is rebuilt when it is a default location (``explicit`` False) and refused with
    :class:`CorpusMismatchError` when the user named it (``explicit``): never used in their place.
    Run it on one rank, then open :class:`Corpus` on the others after a barrier.
    """
    corpus_dir = os.fspath(corpus_dir)
    args = (json_paths, vocab, answer_table, store_dir, max_seq_len, answer_dsets, sources)
    if os.path.isdir(corpus_dir) and os.listdir(corpus_dir):
        why = corpus_mismatch(corpus_dir, *args)
        if why is None:
            return Corpus(corpus_dir)
        if explicit:
            raise CorpusMismatchError(
                f"{why} — not a corpus store of the data as given: remove it or name another directory"
            )
        print(f"rebuilding the corpus store: {why}", flush=True)
    else:
        print(f"building the corpus store {corpus_dir} (once)", flush=True)
    return build_corpus(
        corpus_dir,
        json_paths,
        vocab,
        answer_table,
        store_dir,
        max_seq_len=max_seq_len,
        answer_dsets=answer_dsets,
        sources=sources,
        progress=progress,
    )
