"""Match the objects of two images and classify them: added, removed, changed (the seed's rules)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

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


def clip_similarity(embeds_a, embeds_b, iou: np.ndarray) -> np.ndarray:
    """(cos + 1) / 2 of L2-normalised CLIP embeddings; where a box has no embedding (a NaN
    row: its crop is empty) the similarity is the pair's IoU, the notebook's fallback."""
    a, b = np.asarray(embeds_a, np.float64), np.asarray(embeds_b, np.float64)
    if a.shape[1:] != b.shape[1:] or a.shape[-1] == 0:  # nothing embedded on one side
        return np.array(iou, np.float64, copy=True)
    sim = (a @ b.T + 1.0) / 2.0
    return np.where(np.isnan(sim), iou, sim)


def match_objects(boxes_a, labels_a, embeds_a, boxes_b, labels_b, embeds_b,
                  alpha: float, iou_thr: float) -> Matching:
    """Hungarian matching on cost = 1 - (alpha*IoU + (1-alpha)*(cos+1)/2) for equal labels
    (1 otherwise). A pair counts as matched when the labels agree and the affinity
    reaches iou_thr; a matched pair whose IoU is below iou_thr changed. Boxes must be
    in one frame (normalised coordinates when the images differ in size)."""
    na, nb = len(labels_a), len(labels_b)
    if na == 0 or nb == 0:
        return Matching(added=list(range(nb)), removed=list(range(na)),
                        iou=np.zeros((na, nb)), similarity=np.zeros((na, nb)))
    iou = iou_matrix(np.asarray(boxes_a, np.float64), np.asarray(boxes_b, np.float64))
    sim = clip_similarity(embeds_a, embeds_b, iou)
    same = np.asarray(labels_a)[:, None] == np.asarray(labels_b)[None, :]
    affinity = alpha * iou + (1.0 - alpha) * sim
    cost = np.where(same, 1.0 - affinity, 1.0)
    rows, cols = linear_sum_assignment(cost)
    m = Matching(iou=iou, similarity=sim)
    for i, j in zip(rows, cols):
        if same[i, j] and affinity[i, j] >= iou_thr:
            m.pairs.append((int(i), int(j)))
            if iou[i, j] < iou_thr:
                m.changed.append((int(i), int(j)))
    matched_a = {i for i, _ in m.pairs}
    matched_b = {j for _, j in m.pairs}
    m.removed = [i for i in range(na) if i not in matched_a]
    m.added = [j for j in range(nb) if j not in matched_b]
    return m
