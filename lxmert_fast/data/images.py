"""One image of the feature store as model-ready tensors, padded to a fixed number of boxes.

The pre-training items (:meth:`lxmert_fast.data.pretrain.PretrainDataset._image`) and the
fine-tuning datasets both use :func:`image_tensors`, so pre-training and fine-tuning normalise boxes
the same way.
"""

from __future__ import annotations

import numpy as np
import torch

from lxmert_fast.data.store import FeatureStore


def normalize_boxes(boxes: np.ndarray, img_h: float, img_w: float) -> np.ndarray:
    """Pixel boxes (x1, y1, x2, y2) [n, 4] -> float32 divided by (w, h, w, h), clipped to [0, 1]: what
    the model was trained on (lxmert_fast.inference uses it too)."""
    size = np.array([img_w, img_h, img_w, img_h], np.float32)
    return np.clip(np.asarray(boxes, np.float32) / size, 0.0, 1.0)


def image_tensors(store: FeatureStore, img_id: str, num_boxes: int) -> dict[str, torch.Tensor]:
    """One image's tensors padded to ``num_boxes``, shared by the pre-training and fine-tuning items:
    ``visual_feats`` [N, D] float32, ``visual_pos`` [N, 4] (pixel boxes divided by (w, h, w, h),
    clipped to [0, 1]), ``visual_mask`` [N], ``obj_ids``/``attr_ids`` [N] (-1 on padding),
    ``obj_conf``/``attr_conf`` [N]."""
    item = store[img_id]
    n = min(item["num_boxes"], num_boxes)
    # The model's own box check is off in training (train.py), and a zero image size or a
    # NaN box would make the normalised boxes NaN/Inf: checked here, per image, on the host.
    if item["img_h"] <= 0 or item["img_w"] <= 0:
        raise ValueError(
            f"image {img_id!r} in {store.directory}: expected a positive image size (boxes are "
            f"divided by it), got img_h={item['img_h']}, img_w={item['img_w']}"
        )
    if not np.isfinite(item["boxes"][:n]).all():
        raise ValueError(
            f"image {img_id!r} in {store.directory}: boxes hold NaN or Inf, expected finite pixel coordinates"
        )
    feats = np.zeros((num_boxes, item["features"].shape[1]), np.float32)
    boxes = np.zeros((num_boxes, 4), np.float32)
    feats[:n] = item["features"][:n]
    boxes[:n] = normalize_boxes(item["boxes"][:n], item["img_h"], item["img_w"])
    out = {"visual_feats": torch.from_numpy(feats), "visual_pos": torch.from_numpy(boxes)}
    out["visual_mask"] = (torch.arange(num_boxes) < n).float()
    for key, field in (("obj", "objects"), ("attr", "attrs")):
        ids = torch.full((num_boxes,), -1, dtype=torch.long)
        conf = torch.zeros(num_boxes)
        ids[:n] = torch.from_numpy(item[f"{field}_id"][:n])
        conf[:n] = torch.from_numpy(item[f"{field}_conf"][:n])
        out[f"{key}_ids"], out[f"{key}_conf"] = ids, conf
    return out
