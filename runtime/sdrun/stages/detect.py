"""Decode detector outputs into (boxes, scores, labels); undo horizontal flips.

Boxes are x1y1x2y2 normalised to the model input (0..1), which equals the image
since every detector input is the whole image resized without padding.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

Detections3 = tuple[np.ndarray, np.ndarray, np.ndarray]  # (boxes [K,4] float32, scores [K] float32, labels [K] int64)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow warnings for large |x|


def cxcywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    cx, cy, w, h = np.moveaxis(b, -1, 0)
    return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def unflip(boxes_xyxy: np.ndarray) -> np.ndarray:
    """Boxes found in a horizontally flipped image, in the original image's frame."""
    out = boxes_xyxy.copy()
    out[..., 0] = 1.0 - boxes_xyxy[..., 2]
    out[..., 2] = 1.0 - boxes_xyxy[..., 0]
    return out


def normalize_queries(query_embeds: np.ndarray) -> np.ndarray:
    """As OWL-ViT's class head does: q / (|q| + 1e-6)."""
    return query_embeds / (np.linalg.norm(query_embeds, axis=-1, keepdims=True) + 1e-6)


def owlvit_logits(class_embeds: np.ndarray, logit_shift: np.ndarray, logit_scale: np.ndarray,
                  queries_normed: np.ndarray) -> np.ndarray:
    """[N,D], [N,1], [N,1], [P,D] -> [N,P] logits."""
    return (class_embeds @ queries_normed.T + logit_shift) * logit_scale


def owlvit_detections(pred_boxes: np.ndarray, class_embeds: np.ndarray, logit_shift: np.ndarray,
                      logit_scale: np.ndarray, queries_normed: np.ndarray, prompt_labels: ArrayLike,
                      threshold: float) -> Detections3:
    """One image: score = sigmoid of the best prompt's logit, label = that prompt's label;
    kept when score > threshold (as HF's post-processing)."""
    logits = owlvit_logits(class_embeds, logit_shift, logit_scale, queries_normed)
    best = logits.argmax(-1)
    scores = sigmoid(np.take_along_axis(logits, best[:, None], -1)[:, 0])
    keep = scores > threshold
    return (cxcywh_to_xyxy(pred_boxes[keep]).astype(np.float32), scores[keep].astype(np.float32),
            np.asarray(prompt_labels)[best[keep]].astype(np.int64))


def label_token_scores(logits: np.ndarray, token_labels: np.ndarray, n_labels: int) -> np.ndarray:
    """[Q,slots] logits -> [Q,n_labels]: each label's max sigmoid over its own tokens."""
    t = len(token_labels)
    probs = sigmoid(logits[:, :t].astype(np.float64))
    out = np.zeros((logits.shape[0], n_labels))
    for label in range(n_labels):
        cols = np.flatnonzero(token_labels == label)
        if cols.size:
            out[:, label] = probs[:, cols].max(-1)
    return out


def gdino_detections(logits: np.ndarray, pred_boxes: np.ndarray, token_labels: np.ndarray, n_labels: int,
                     threshold: float) -> Detections3:
    """One image: a box's label is the label whose tokens score highest; kept when > threshold."""
    per_label = label_token_scores(logits, token_labels, n_labels)
    labels = per_label.argmax(-1)
    scores = per_label[np.arange(len(labels)), labels]
    keep = scores > threshold
    return (cxcywh_to_xyxy(pred_boxes[keep]).astype(np.float32), scores[keep].astype(np.float32),
            labels[keep].astype(np.int64))
