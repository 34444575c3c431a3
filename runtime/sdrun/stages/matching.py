"""Match the objects of two images and classify them: added, removed, changed (the seed's rules)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike

from .decide import column_members
from .fusion import iou_matrix


def linear_sum_assignment(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scipy's Hungarian solver, imported on first use: `import scipy.optimize` takes
    ~0.7 s, more than the rest of `import sdrun`."""
    from scipy.optimize import linear_sum_assignment as solve

    return solve(cost)


@dataclass
class Matching:
    pairs: list[tuple[int, int]] = field(default_factory=list)  # matched (i in a, j in b)
    added: list[int] = field(default_factory=list)  # indices in b
    removed: list[int] = field(default_factory=list)  # indices in a
    changed: list[tuple[int, int]] = field(default_factory=list)  # matched pairs with IoU < iou_thr
    iou: np.ndarray | None = None
    similarity: np.ndarray | None = None


def clip_similarity(embeds_a: ArrayLike, embeds_b: ArrayLike, iou: np.ndarray) -> np.ndarray:
    """(cos + 1) / 2 of L2-normalised CLIP embeddings; where a box has no embedding (a NaN
    row: its crop is empty) the similarity is the pair's IoU, the notebook's fallback."""
    a, b = np.asarray(embeds_a, np.float64), np.asarray(embeds_b, np.float64)
    if a.shape[1:] != b.shape[1:] or a.shape[-1] == 0:  # nothing embedded on one side
        return np.array(iou, np.float64, copy=True)
    sim = (a @ b.T + 1.0) / 2.0
    return np.where(np.isnan(sim), iou, sim)


def pair_matrices(boxes_a: ArrayLike, labels_a: ArrayLike, embeds_a: ArrayLike, boxes_b: ArrayLike,
                  labels_b: ArrayLike, embeds_b: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(IoU, similarity, same label) matrices of two images' objects [na, nb]. Boxes must be
    in one frame (normalised coordinates when the images differ in size)."""
    iou = iou_matrix(np.asarray(boxes_a, np.float64), np.asarray(boxes_b, np.float64))
    sim = clip_similarity(embeds_a, embeds_b, iou)
    same = np.asarray(labels_a)[:, None] == np.asarray(labels_b)[None, :]
    return iou, sim, same


@dataclass
class Assignment:
    """The Hungarian solution, before the thresholds: the assigned (rows, cols) and, for
    each assigned pair, whether the labels agree, its affinity and its IoU."""

    rows: np.ndarray
    cols: np.ndarray
    same: np.ndarray
    affinity: np.ndarray
    iou: np.ndarray


def assign(iou: np.ndarray, sim: np.ndarray, same: np.ndarray, alpha: float) -> Assignment:
    """Hungarian matching on cost = 1 - (alpha*IoU + (1-alpha)*similarity) for equal labels
    (1 otherwise). The cost does not depend on iou_thr."""
    affinity = alpha * iou + (1.0 - alpha) * sim
    cost = np.where(same, 1.0 - affinity, 1.0)
    rows, cols = linear_sum_assignment(cost)
    return Assignment(rows, cols, same[rows, cols], affinity[rows, cols], iou[rows, cols])


def matched_and_changed(a: Assignment, iou_thr: float) -> tuple[np.ndarray, np.ndarray]:
    """Masks over the assigned pairs: matched (labels agree and the affinity reaches
    iou_thr) and changed (matched, with an IoU below iou_thr)."""
    ok = a.same & (a.affinity >= iou_thr)
    return ok, ok & (a.iou < iou_thr)


def match_objects(boxes_a: ArrayLike, labels_a: np.ndarray, embeds_a: ArrayLike, boxes_b: ArrayLike,
                  labels_b: np.ndarray, embeds_b: ArrayLike, alpha: float, iou_thr: float) -> Matching:
    """`pair_matrices`, `assign`, `matched_and_changed` (the seed's rules), and which objects
    are left unmatched (`sdrun.stages.decide.column_members`)."""
    na, nb = len(labels_a), len(labels_b)
    if na == 0 or nb == 0:
        return Matching(added=list(range(nb)), removed=list(range(na)),
                        iou=np.zeros((na, nb)), similarity=np.zeros((na, nb)))
    iou, sim, same = pair_matrices(boxes_a, labels_a, embeds_a, boxes_b, labels_b, embeds_b)
    a = assign(iou, sim, same, alpha)
    ok, ch = matched_and_changed(a, iou_thr)
    m = Matching(pairs=[(int(i), int(j)) for i, j in zip(a.rows[ok], a.cols[ok])],
                 changed=[(int(i), int(j)) for i, j in zip(a.rows[ch], a.cols[ch])],
                 iou=iou, similarity=sim)
    m.added, m.removed, _ = column_members(na, nb, m.pairs, m.changed)
    return m
