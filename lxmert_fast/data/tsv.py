"""Reader and writer of the bottom-up-attention feature TSV (the authors' ``*_obj36.tsv``).

One image per line, no header, tab-separated fields (:data:`FIELDNAMES`)::

    img_id img_h img_w objects_id objects_conf attrs_id attrs_conf num_boxes boxes features

Array fields are base64 of raw little-endian bytes: ids int64 ``[n]``, confidences float32
``[n]``, boxes float32 ``[n, 4]`` in pixels (x1, y1, x2, y2), features float32 ``[n, D]``
(D = 2048 for the authors' Faster R-CNN; any D is read, inferred from the byte count).
A row is ~400 KB of text, so the csv field size limit is raised. A truncated or corrupted
row, a non-positive image size or a NaN/Inf box, feature or confidence raises
:class:`FeatureFileError` naming the file and the line.
"""

from __future__ import annotations

import base64
import binascii
import csv
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

FIELDNAMES = (
    "img_id",
    "img_h",
    "img_w",
    "objects_id",
    "objects_conf",
    "attrs_id",
    "attrs_conf",
    "num_boxes",
    "boxes",
    "features",
)
# (field, dtype, values per box; None = inferred feature width).
ARRAY_FIELDS = (
    ("objects_id", np.int64, 1),
    ("objects_conf", np.float32, 1),
    ("attrs_id", np.int64, 1),
    ("attrs_conf", np.float32, 1),
    ("boxes", np.float32, 4),
    ("features", np.float32, None),
)


class FeatureFileError(ValueError):
    """A feature TSV row that cannot be decoded or holds unusable values; the message names the
    file and the line."""


def _raise_field_size_limit() -> None:
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 10


def _decode_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    missing = [name for name in FIELDNAMES if row.get(name) is None]
    if missing or None in row:
        got = len([v for v in row.values() if v is not None])
        raise FeatureFileError(
            f"{where}: expected {len(FIELDNAMES)} tab-separated fields, got {got} "
            f"(missing {missing}); the row is truncated or corrupted"
        )
    try:
        item: dict[str, Any] = {
            "img_id": row["img_id"],
            "img_h": int(row["img_h"]),
            "img_w": int(row["img_w"]),
            "num_boxes": int(row["num_boxes"]),
        }
    except ValueError as exc:
        raise FeatureFileError(f"{where}: bad integer field ({exc})") from exc
    n = item["num_boxes"]
    if n < 0:
        raise FeatureFileError(f"{where}: num_boxes must be >= 0, got {n}")
    for name, dtype, width in ARRAY_FIELDS:
        try:
            raw = base64.b64decode(row[name], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise FeatureFileError(f"{where}: field {name!r} is not valid base64 ({exc})") from exc
        itemsize = np.dtype(dtype).itemsize
        if width is None:
            if n == 0 or len(raw) % (n * itemsize):
                raise FeatureFileError(
                    f"{where}: field {name!r} has {len(raw)} bytes, not a multiple of "
                    f"num_boxes={n} x {itemsize}-byte values"
                )
            width = len(raw) // (n * itemsize)
        if len(raw) != n * width * itemsize:
            raise FeatureFileError(
                f"{where}: field {name!r} has {len(raw)} bytes, expected {n * width * itemsize} "
                f"(num_boxes={n} x {width} x {np.dtype(dtype).name})"
            )
        array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)
        item[name] = array.reshape(n, width) if name in ("boxes", "features") else array
    _check_values(item, where)
    return item


def _check_values(item: dict[str, Any], where: str) -> None:
    """Values the loaders divide by or feed to the model: a zero image size or a NaN box turns
    every box of the image into NaN/Inf, and the training loss with it."""
    if item["img_h"] <= 0 or item["img_w"] <= 0:
        raise FeatureFileError(
            f"{where}: image {item['img_id']!r}: expected a positive image size (boxes are divided by "
            f"it), got img_h={item['img_h']}, img_w={item['img_w']}"
        )
    for name in ("boxes", "features", "objects_conf", "attrs_conf"):
        bad = ~np.isfinite(item[name])
        if bad.any():
            raise FeatureFileError(
                f"{where}: image {item['img_id']!r}: field {name!r} has {int(bad.sum())} non-finite "
                f"values (NaN or Inf), expected finite numbers"
            )


def read_feature_tsv(path: str | os.PathLike, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Yield one dict per image: the ten fields, arrays decoded (boxes ``[n, 4]``, features ``[n, D]``)."""
    _raise_field_size_limit()
    path = os.fspath(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f, FIELDNAMES, delimiter="\t")
        for index, row in enumerate(reader):
            if limit is not None and index >= limit:
                return
            yield _decode_row(row, f"{path}:{reader.line_num}")


def _b64(array: np.ndarray, dtype: Any) -> str:
    return base64.b64encode(
        np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
    ).decode()


def write_feature_tsv(path: str | os.PathLike, items: Iterable[dict[str, Any]]) -> int:
    """Write ``items`` (dicts with the fields of :func:`read_feature_tsv`) in the authors' format; returns rows."""
    count = 0
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        for item in items:
            writer.writerow(
                [item["img_id"], int(item["img_h"]), int(item["img_w"])]
                + [_b64(item[name], dtype) for name, dtype, _ in ARRAY_FIELDS[:4]]
                + [int(item["num_boxes"])]
                + [_b64(item[name], dtype) for name, dtype, _ in ARRAY_FIELDS[4:]]
            )
            count += 1
    return count
