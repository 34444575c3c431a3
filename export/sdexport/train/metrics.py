"""Metrics of a change logit against 0/1 labels, in numpy (no scikit-learn)."""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve (ties count half), None when one class is absent."""
    y = np.asarray(labels, bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return None
    ranks = rankdata(np.asarray(scores, np.float64))  # average ranks: ties count half
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def best_f1(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(best F1 over every threshold "score >= t", that threshold); (0, inf) without positives."""
    y = np.asarray(labels, bool)
    s = np.asarray(scores, np.float64)
    if not y.any():
        return 0.0, float("inf")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp, fp = np.cumsum(y), np.cumsum(~y)
    last = np.r_[s[1:] != s[:-1], True]  # a threshold keeps every tie of its score
    f1 = 2 * tp / (tp + fp + y.sum())
    k = int(np.argmax(np.where(last, f1, -1.0)))
    return float(f1[k]), float(s[k])


def macro_f1(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Mean over columns (with a positive in `labels` or `predicted`) of the F1 of 0/1
    columns; 1.0 when no column has any."""
    y, p = np.asarray(labels, bool), np.asarray(predicted, bool)
    y, p = y.reshape(len(y), -1), p.reshape(len(p), -1)
    tp, fp, fn = (y & p).sum(0), (~y & p).sum(0), (y & ~p).sum(0)
    used = (tp + fp + fn) > 0
    if not used.any():
        return 1.0
    return float(np.mean(2 * tp[used] / (2 * tp[used] + fp[used] + fn[used])))
