"""The Siamese change heatmap and the score fusion it drives."""
from __future__ import annotations

import cv2
import numpy as np

from .pixels import pixel_floor

TOP_DIVISOR = 20  # the change score: the mean of the top size // 20 heat values (the notebook's)
HEAT_EPS = 1e-6  # the notebook's min-max normalisation: (m - min) / (max - min + 1e-6)


def upsample_heat(patch_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """Min-max normalise the patch-distance map and upsample it (bicubic) to HxW.

    Deliberate departure: cv2 takes (width, height); the notebook passes (height, width),
    which transposes the map of a non-square image (see docs/departures.md)."""
    m = patch_map.astype(np.float32)
    m = (m - m.min()) / (m.max() - m.min() + np.float32(HEAT_EPS))
    return cv2.resize(m, (width, height), interpolation=cv2.INTER_CUBIC)


def change_score(heat: np.ndarray) -> float:
    """The notebook's global change score of an upsampled heat map: the mean of its top
    max(1, size // 20) values."""
    flat = heat.ravel()
    k = max(1, flat.size // TOP_DIVISOR)
    return float(np.partition(flat, flat.size - k)[flat.size - k:].mean())


def box_pixel_bounds(boxes_px: np.ndarray, height: int, width: int) -> np.ndarray:
    """Integer slice bounds [x1, y1, x2, y2] of pixel boxes as the notebook takes them:
    each edge floored (see `pixels.pixel_floor`) and clipped to [0, W-1] / [0, H-1], so the
    region heat[y1:y2, x1:x2] of a box reaching the right or bottom edge leaves out the
    last column or row."""
    b = np.asarray(boxes_px, np.float64).reshape(-1, 4)
    return np.stack([pixel_floor(b[:, 0], 0, width - 1), pixel_floor(b[:, 1], 0, height - 1),
                     pixel_floor(b[:, 2], 0, width - 1), pixel_floor(b[:, 3], 0, height - 1)], -1)


def hot_share(heat: np.ndarray, boxes_px: np.ndarray, heat_th: float) -> np.ndarray:
    """Share of each box's pixels with heat >= heat_th (0 for empty boxes), via an
    integral image: O(H*W + boxes) instead of a slice per box."""
    h, w = heat.shape
    integral = np.zeros((h + 1, w + 1), np.int64)
    integral[1:, 1:] = (heat >= heat_th).cumsum(0).cumsum(1)
    x1, y1, x2, y2 = box_pixel_bounds(boxes_px, h, w).T
    area = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    hot = integral[y2, x2] - integral[y1, x2] - integral[y2, x1] + integral[y1, x1]
    return np.where(area > 0, hot / np.maximum(area, 1), 0.0)


def fuse_scores(scores: np.ndarray, share: np.ndarray, heat_lambda: float) -> np.ndarray:
    """s' = s * (1 + lambda * share of the box that is hot)."""
    return scores * (1.0 + heat_lambda * share)
