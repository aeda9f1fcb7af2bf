"""Memory-mapped feature store, converted once from feature TSVs.

The authors load every TSV into RAM in every loader worker (hundreds of GB reported). The
store keeps each field in one flat binary file and an index; readers map the files with
``numpy.memmap``, so resident memory is the OS page cache, shared by every worker and not
growing with the dataset.

Layout of a store directory::

    index.json        {"version", "feature_dim", "feature_dtype", "num_boxes_total",
                       "images": {img_id: [first_box, num_boxes, img_h, img_w]},
                       "built_from": {"sources": [{"path", "size", "mtime_ns"}], "fp16"},
                       "files": {file name: bytes}}
    features.bin      [num_boxes_total, feature_dim]  float32 or float16
    boxes.bin         [num_boxes_total, 4]            float32, pixels
    objects_id.bin    [num_boxes_total]               int64   (same for attrs_id)
    objects_conf.bin  [num_boxes_total]               float32 (same for attrs_conf)
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from lxmert_fast import atomic
from lxmert_fast.data.jsonfile import read_json
from lxmert_fast.data.tsv import read_feature_tsv

INDEX_NAME = "index.json"
STORE_VERSION = 1
FIELD_DTYPES = {
    "boxes": np.float32,
    "objects_id": np.int64,
    "objects_conf": np.float32,
    "attrs_id": np.int64,
    "attrs_conf": np.float32,
}


def source_record(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """What a store is built from: each TSV's absolute path, size and modification time."""
    records = []
    for path in paths:
        st = os.stat(path)
        records.append({"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return records


def convert_tsv_to_store(
    tsv_paths: Iterable[str | os.PathLike], out_dir: str | os.PathLike, fp16: bool = False
) -> dict[str, Any]:
    """Convert feature TSVs into a store at ``out_dir`` in one streaming pass; returns the index.

    ``fp16`` halves the feature file (the features are post-ReLU activations of magnitude
    < 100; fp16 keeps ~3 significant digits). Everything else is stored exactly.
    A duplicate ``img_id`` across files is an error (the authors' loaders would silently
    keep one of them).

    The store is written to a temporary sibling directory and published by one rename: a
    reader of ``out_dir`` sees the old store or the new one, whenever the conversion dies.
    An existing ``out_dir`` must be a store holding nothing else (it is replaced as a whole).
    """
    out_dir = os.path.abspath(out_dir)
    tsv_paths = [os.fspath(p) for p in tsv_paths]
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        others = sorted(
            set(os.listdir(out_dir)) - {INDEX_NAME, *(f"{n}.bin" for n in (*FIELD_DTYPES, "features"))}
        )
        if not is_store(out_dir) or others:
            raise FileExistsError(
                f"{out_dir}: exists and is not a feature store only (holds {others or os.listdir(out_dir)}); "
                "converting replaces the whole directory: choose an empty or new one"
            )
    feature_dtype = np.float16 if fp16 else np.float32
    images: dict[str, list[int]] = {}
    feature_dim = None
    total = 0
    sources = source_record(tsv_paths)
    with atomic.publishing_dir(out_dir) as tmp:
        with contextlib.ExitStack() as stack:
            files = {
                name: stack.enter_context(open(os.path.join(tmp, f"{name}.bin"), "wb"))
                for name in (*FIELD_DTYPES, "features")
            }
            for path in tsv_paths:
                for item in read_feature_tsv(path):
                    n = item["num_boxes"]
                    dim = item["features"].shape[1]
                    if feature_dim is None:
                        feature_dim = dim
                    elif dim != feature_dim:
                        raise ValueError(
                            f"{path}: image {item['img_id']} has feature width {dim}, earlier images {feature_dim}"
                        )
                    if item["img_id"] in images:
                        raise ValueError(f"{path}: duplicate img_id {item['img_id']!r}")
                    images[item["img_id"]] = [total, n, item["img_h"], item["img_w"]]
                    for name, dtype in FIELD_DTYPES.items():
                        files[name].write(np.ascontiguousarray(item[name], dtype=dtype).tobytes())
                    files["features"].write(
                        np.ascontiguousarray(item["features"], dtype=feature_dtype).tobytes()
                    )
                    total += n
                atomic.fault_point(f"{out_dir}: converted {path}")
        index = {
            "version": STORE_VERSION,
            "feature_dim": feature_dim or 0,
            "feature_dtype": np.dtype(feature_dtype).name,
            "num_boxes_total": total,
            "images": images,
            "built_from": {"sources": sources, "fp16": fp16},
            "files": {name: os.path.getsize(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))},
        }
        with open(os.path.join(tmp, INDEX_NAME), "w") as f:
            json.dump(index, f)
    return index


def store_mismatch(
    directory: str | os.PathLike, tsv_paths: Iterable[str | os.PathLike], fp16: bool = False
) -> str | None:
    """Why the store at ``directory`` is not a conversion of ``tsv_paths`` with ``fp16`` as they are
    now (None when it is): another file list, a file changed since, another feature dtype."""
    index = read_json(os.path.join(directory, INDEX_NAME))
    built = index.get("built_from") if isinstance(index, dict) else None
    if not isinstance(built, dict):
        return f"{directory}: the store does not record what it was converted from (an older converter)"
    want = source_record(tsv_paths)
    if [s["path"] for s in built.get("sources", [])] != [s["path"] for s in want]:
        return f"{directory}: converted from {[s['path'] for s in built.get('sources', [])]}, not {[s['path'] for s in want]}"
    for old, new in zip(built["sources"], want, strict=True):
        if (old.get("size"), old.get("mtime_ns")) != (new["size"], new["mtime_ns"]):
            return f"{directory}: {new['path']} changed since it was converted (size or modification time)"
    if bool(built.get("fp16")) != fp16:
        return f"{directory}: converted with fp16={built.get('fp16')}, asked for fp16={fp16}"
    return None


def is_store(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, INDEX_NAME))


class FeatureStore:
    """Read-only access to a converted store: ``store[img_id]`` → dict of numpy arrays.

    The memory maps are opened lazily in each process, so the object is cheap to pickle
    into ``DataLoader`` workers. Arrays returned are copies (features as float32).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = os.fspath(directory)
        index_path = os.path.join(self.directory, INDEX_NAME)
        if not os.path.isfile(index_path):
            raise FileNotFoundError(
                f"{self.directory}: no {INDEX_NAME}; not a feature store (convert TSVs with "
                f"`python -m lxmert_fast.data.convert`)"
            )
        index = read_json(index_path)
        if not isinstance(index, dict):
            raise ValueError(
                f"{index_path}: expected a JSON object (a store index), got {type(index).__name__}"
            )
        if index.get("version") != STORE_VERSION:
            raise ValueError(f"{index_path}: store version {index.get('version')}, expected {STORE_VERSION}")
        missing = [k for k in ("images", "feature_dim", "feature_dtype", "num_boxes_total") if k not in index]
        if missing:
            raise ValueError(f"{index_path}: store index lacks {missing}; re-convert the store")
        self.images: dict[str, list[int]] = index["images"]
        self.feature_dim: int = index["feature_dim"]
        self.feature_dtype = np.dtype(index["feature_dtype"])
        self.num_boxes_total: int = index["num_boxes_total"]
        self._maps: dict[str, np.ndarray] | None = None
        self._open()  # a truncated or incomplete store is refused here, before anything is read

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = None
        return state

    def _open(self) -> dict[str, np.ndarray]:
        if self._maps is None:
            shapes = {name: (self.num_boxes_total,) for name in FIELD_DTYPES}
            shapes["boxes"] = (self.num_boxes_total, 4)
            dtypes = dict(FIELD_DTYPES, features=self.feature_dtype)
            shapes["features"] = (self.num_boxes_total, self.feature_dim)
            for name, shape in shapes.items():
                # numpy reports a short file as "mmap length is greater than file size", no path.
                path = os.path.join(self.directory, f"{name}.bin")
                want = int(np.prod(shape)) * np.dtype(dtypes[name]).itemsize
                have = os.path.getsize(path) if os.path.isfile(path) else None
                if self.num_boxes_total and have != want:
                    found = "missing" if have is None else f"{have} bytes"
                    raise ValueError(
                        f"{path}: {found}, expected {want} bytes ({' x '.join(map(str, shape))} "
                        f"{np.dtype(dtypes[name]).name}, as {INDEX_NAME} says); the store is truncated "
                        "or corrupted: re-convert it"
                    )
            self._maps = {
                name: (
                    np.memmap(
                        os.path.join(self.directory, f"{name}.bin"), dtype=dtypes[name], mode="r", shape=shape
                    )
                    if self.num_boxes_total
                    else np.zeros(shape, dtypes[name])
                )
                for name, shape in shapes.items()
            }
        return self._maps

    def __len__(self) -> int:
        return len(self.images)

    def __contains__(self, img_id: str) -> bool:
        return img_id in self.images

    def keys(self) -> list[str]:
        return list(self.images)

    def __getitem__(self, img_id: str) -> dict[str, Any]:
        try:
            start, n, img_h, img_w = self.images[img_id]
        except KeyError:
            raise KeyError(f"img_id {img_id!r} is not in the feature store {self.directory}") from None
        maps = self._open()
        item: dict[str, Any] = {"img_id": img_id, "img_h": img_h, "img_w": img_w, "num_boxes": n}
        for name in (*FIELD_DTYPES, "features"):
            item[name] = np.array(maps[name][start : start + n])
        item["features"] = item["features"].astype(np.float32)
        return item
