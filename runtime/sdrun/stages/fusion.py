"""Weighted boxes fusion (WBF) and pairwise IoU in plain numpy.

`weighted_boxes_fusion` is a drop-in replacement for
``ensemble_boxes.weighted_boxes_fusion`` (ensemble-boxes 1.0.9): same
signature, same boxes, scores, labels and order, bit for bit on valid input,
several times faster, and it raises ``ValueError`` on bad arguments where
ensemble-boxes prints a message and calls ``exit()``.

What the reference does, and what is reproduced here:

* Boxes are normalised ``x1, y1, x2, y2``.  Boxes with a score below
  ``skip_box_thr`` are dropped first.  Then swapped corners are swapped back,
  coordinates are clipped to [0, 1] and boxes of zero area are dropped, each
  with a ``UserWarning`` (one per kind and call here, not one per box).
* Boxes are grouped by ``int(label)`` (labels in order of first appearance) and
  within a label sorted by weighted score (``score * weights[model]``)
  descending with numpy's default ``argsort`` reversed.
* Each box, in that order, is matched against the *fused* box of every cluster
  built so far: the cluster of highest IoU (first one on ties) if that IoU is
  above ``iou_thr``, otherwise it founds a new cluster.  A fused box is the
  score-weighted mean of its members, accumulated and stored in float32 as the
  reference does (its fused boxes, scores and weights are float32 values in a
  float64 array; a cluster of one box keeps its float64 values).
* Scores are rescaled per ``conf_type`` ('avg', 'max', 'box_and_model_avg',
  'absent_model_aware_avg'; 'avg' by ``min(len(weights), len(cluster)) /
  sum(weights)`` unless ``allows_overflow``) and everything is sorted by score
  descending (numpy's default ``argsort`` reversed).

Differences from the reference: a ``weights`` of the wrong length raises
``ValueError`` (the reference prints a warning and uses equal weights), and so
does everything the reference would ``exit()`` on.

The clustering is sequential by nature (each box is matched against fused
boxes that earlier boxes moved).  The fast path takes boxes in batches: one
vectorised pass per batch computes the IoUs that can matter (pairs whose grid
cells meet) against the clusters as they are when the batch starts and against
the batch's own boxes; the sequential pass over the batch then only re-checks,
in Python floats with the reference's formula, the clusters merged into during
that batch.  Inputs the fast path does not cover (a negative or NaN
``iou_thr``, NaN coordinates, weighted scores that are not finite and
positive, labels beyond float32 precision) take an exact, slower path that
mirrors the reference step by step, NaN propagation included.

Results are bit-identical to ensemble-boxes under numpy >= 2 (NEP 50
promotion); the numpy 1.x promotion of ``float32 array /= float64 scalar`` is
mirrored too but not tested here.
"""
from __future__ import annotations

import struct
import warnings
from typing import Sequence

import numpy as np

__all__ = ["weighted_boxes_fusion", "iou_matrix", "CONF_TYPES"]

CONF_TYPES = ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")

# Boxes processed per vectorised step of the fast path.
_BATCH = 48

# Bit masks of the cells of an 8 x 8 grid over [0, 1]^2 that a box touches:
# _XP9[i, j] has bits i..j set (a row of cells), _YS9[i, j] has bit 0 of bytes
# i..j set; their product marks columns i..j in rows i'..j'.  Index 8 (a
# coordinate of exactly 1) counts as 7.
_XP9 = np.zeros((9, 9), np.uint64)
_YS9 = np.zeros((9, 9), np.uint64)
for _i in range(9):
    for _j in range(9):
        _a, _b = min(_i, 7), min(_j, 7)
        if _b >= _a:
            _XP9[_i, _j] = (1 << (_b + 1)) - (1 << _a)
            _YS9[_i, _j] = sum(1 << (8 * _k) for _k in range(_a, _b + 1))
del _i, _j, _a, _b

# multiplies [x1, y1, x2, y2, area] into [x1, y1, -x2, -y2, area] and back
_NEG_X2Y2 = np.array([1.0, 1.0, -1.0, -1.0, 1.0])

# ensemble-boxes divides a float32 box by a numpy float64 scalar in place.
# Under NEP 50 (numpy >= 2) that runs in float64 and rounds to float32; with the
# legacy value-based casting of numpy 1.x the scalar is cast to float32 first.
_DIV_IN_FLOAT64 = np.result_type(np.zeros(1, np.float32), np.float64(1.0)) == np.float64

_F4 = struct.Struct("4f")
_f4_pack = _F4.pack
_f4_unpack = _F4.unpack


def _f32(x: float) -> float:
    return float(np.float32(x))


# --------------------------------------------------------------------------- #
# Pairwise IoU
# --------------------------------------------------------------------------- #
def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes ``a`` [N, 4] and ``b`` [M, 4] (``x1, y1, x2, y2``).

    Returns a float64 [N, M] array.  A box with ``x2 < x1`` or ``y2 < y1`` has
    area 0; pairs whose union is 0 have IoU 0.
    """
    a = _as_boxes(a, "a")
    b = _as_boxes(b, "b")
    ax1, ay1, ax2, ay2 = (a[:, i, None] for i in range(4))
    bx1, by1, bx2, by2 = (b[None, :, i] for i in range(4))
    w = np.minimum(ax2, bx2) - np.maximum(ax1, bx1)
    np.maximum(w, 0.0, out=w)
    h = np.minimum(ay2, by2) - np.maximum(ay1, by1)
    np.maximum(h, 0.0, out=h)
    inter = np.multiply(w, h, out=w)
    area_a = np.maximum(a[:, 2] - a[:, 0], 0.0) * np.maximum(a[:, 3] - a[:, 1], 0.0)
    area_b = np.maximum(b[:, 2] - b[:, 0], 0.0) * np.maximum(b[:, 3] - b[:, 1], 0.0)
    union = area_a[:, None] + area_b[None, :]
    union -= inter
    out = np.zeros_like(inter)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def _as_boxes(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.size == 0 and arr.ndim <= 2 and (arr.ndim < 2 or arr.shape[-1] in (0, 4)):
        return arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{name} must have shape [N, 4] (x1, y1, x2, y2), got {arr.shape}")
    return arr


# --------------------------------------------------------------------------- #
# Argument checks and prefiltering
# --------------------------------------------------------------------------- #
def _check_args(boxes_list, scores_list, labels_list, weights, conf_type):
    if conf_type not in CONF_TYPES:
        raise ValueError(f"unknown conf_type {conf_type!r}: must be one of {', '.join(map(repr, CONF_TYPES))}")
    for name, obj in (("boxes_list", boxes_list), ("scores_list", scores_list), ("labels_list", labels_list)):
        if isinstance(obj, (str, bytes)) or not hasattr(obj, "__len__"):
            raise ValueError(f"{name} must be a list with one entry per model, got {type(obj).__name__}")
    n_models = len(boxes_list)
    if len(scores_list) != n_models or len(labels_list) != n_models:
        raise ValueError(
            "boxes_list, scores_list and labels_list must have one entry per model: "
            f"got {n_models}, {len(scores_list)} and {len(labels_list)} entries"
        )
    if weights is None:
        weights = np.ones(n_models)
    else:
        weights = np.array(weights)
        if weights.ndim != 1 or len(weights) != n_models:
            raise ValueError(f"weights must have one value per model ({n_models}), got shape {weights.shape}")
        if weights.dtype.kind not in "biuf":
            raise ValueError(f"weights must be numbers, got dtype {weights.dtype}")
    return n_models, weights


def _prefilter(boxes_list, scores_list, labels_list, weights, skip_box_thr):
    """Kept boxes of all models, in input order (model by model).

    Returns None if no box is left, else coords [N, 4] (fixed as the reference
    fixes them), weighted scores, weights (float64), model index and int label
    of each box.
    """
    kept_boxes, kept_scores, kept_labels, kept_models = [], [], [], []
    for t in range(len(boxes_list)):
        b = np.asarray(boxes_list[t])
        s = np.asarray(scores_list[t])
        lab = np.asarray(labels_list[t])
        if b.size == 0 and b.ndim <= 2 and (b.ndim < 2 or b.shape[-1] in (0, 4)):
            b = b.reshape(0, 4)
        if b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"boxes_list[{t}] must have shape [N, 4] (x1, y1, x2, y2), got {b.shape}")
        n = b.shape[0]
        if s.ndim != 1 or s.shape[0] != n:
            raise ValueError(f"scores_list[{t}] must have shape [{n}] to match boxes_list[{t}], got {s.shape}")
        if lab.ndim != 1 or lab.shape[0] != n:
            raise ValueError(f"labels_list[{t}] must have shape [{n}] to match boxes_list[{t}], got {lab.shape}")
        if n == 0:
            continue
        if s.dtype.kind not in "biuf":
            raise ValueError(f"scores_list[{t}] must hold numbers, got dtype {s.dtype}")
        if b.dtype.kind not in "biuf":
            raise ValueError(f"boxes_list[{t}] must hold numbers, got dtype {b.dtype}")
        # the reference's `if score < thr: continue`, with numpy's comparison
        # rules for this dtype (float32 scores compare in float32 under NEP 50)
        keep = ~(s < skip_box_thr)
        if not keep.all():
            b, s, lab = b[keep], s[keep], lab[keep]
            if b.shape[0] == 0:
                continue
        try:
            if lab.dtype.kind == "f" and not (np.abs(lab) < 2.0**63).all():
                raise ValueError
            lab = lab.astype(np.int64)  # int(label): truncates floats, parses strings
        except (ValueError, TypeError, OverflowError):
            raise ValueError(f"labels_list[{t}] must hold integer class ids (int(label) must work)") from None
        kept_boxes.append(b.astype(np.float64))  # float(box_part[k])
        kept_scores.append(s.astype(np.float64))  # float(score)
        kept_labels.append(lab)
        kept_models.append(np.full(b.shape[0], t, dtype=np.intp))
    if not kept_boxes:
        return None
    c = np.concatenate(kept_boxes)
    scores = np.concatenate(kept_scores)
    labels = np.concatenate(kept_labels)
    models = np.concatenate(kept_models)

    x1, y1, x2, y2 = c[:, 0], c[:, 1], c[:, 2], c[:, 3]
    issues = {}
    sw = x2 < x1
    if sw.any():
        issues["swap_x"] = int(sw.sum())
        x1, x2 = np.where(sw, x2, x1), np.where(sw, x1, x2)
    sw = y2 < y1
    if sw.any():
        issues["swap_y"] = int(sw.sum())
        y1, y2 = np.where(sw, y2, y1), np.where(sw, y1, y2)
    if issues:
        c = np.stack([x1, y1, x2, y2], axis=1)
    low, high = c < 0, c > 1
    out = low | high
    if out.any():
        issues["clip"] = int(out.any(axis=1).sum())
        c = np.where(low, 0.0, np.where(high, 1.0, c))
    area = (c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1])
    nz = area != 0.0
    if not nz.all():
        issues["zero"] = int((~nz).sum())
        c, scores, labels, models = c[nz], scores[nz], labels[nz], models[nz]
    msgs = {
        "swap_x": "x2 < x1 in {} box(es): swapped them.",
        "swap_y": "y2 < y1 in {} box(es): swapped them.",
        "clip": "coordinates outside [0, 1] in {} box(es): clipped them (are the boxes normalised?).",
        "zero": "{} box(es) of zero area skipped.",
    }
    for key, count in issues.items():
        warnings.warn("weighted_boxes_fusion: " + msgs[key].format(count), UserWarning, stacklevel=3)
    if c.shape[0] == 0:
        return None
    # float(score) * weights[t] is a Python float times a numpy scalar: its type
    # follows numpy's promotion rules (float32 weights give a float32 product),
    # so run that product once to learn it.
    prod_dtype = np.asarray(1.0 * weights[0]).dtype
    w_box = weights[models]
    ws = (scores.astype(prod_dtype) * w_box.astype(prod_dtype)).astype(np.float64)
    return c, ws, w_box.astype(np.float64), models, labels


# --------------------------------------------------------------------------- #
# Clustering of one label's boxes (already sorted by weighted score)
# --------------------------------------------------------------------------- #
def _cell_masks(boxes):
    """uint64 masks of the 8 x 8 grid cells that boxes [N, 4] (in [0, 1]) touch.

    The cell index ``int(8 * x)`` is monotone in ``x``, so two boxes that
    overlap with positive area share a cell: ``m1 & m2 == 0`` proves their IoU
    is 0.  (Coordinates a float32 rounding outside [0, 1] still map to 0 or 8.)
    """
    g = (boxes * 8.0).astype(np.intp)
    return _XP9[g[:, 0], g[:, 2]] * _YS9[g[:, 1], g[:, 3]]


class _Sorted:
    """All kept boxes, label by label, each label's boxes by score: arrays and lists."""

    def __init__(self, P, S, batch, has_nan=False):
        n = P.shape[0]
        self.S = S
        cols = np.ascontiguousarray(P.T)
        X1, Y1, X2, Y2 = cols
        A = (X2 - X1) * (Y2 - Y1)  # the reference's area of a box
        # boxes as [x1, y1, -x2, -y2, area]: np.maximum of two gives
        # max(x1), max(y1), -min(x2), -min(y2) (negation is exact)
        self.BS = np.stack([X1, Y1, -X2, -Y2, A])
        self.mask = _cell_masks(np.where(np.isnan(P), 0.0, P) if has_nan else P)
        self.x1, self.y1, self.x2, self.y2 = X1.tolist(), Y1.tolist(), X2.tolist(), Y2.tolist()
        self.area, self.score = A.tolist(), S.tolist()
        self.assign = [0] * n
        self.batch = batch
        # cluster buffers, reused label after label: [x1, y1, -x2, -y2, area], masks
        self.C = np.empty((5, n + batch))
        self.CM = np.empty(n + batch, dtype=np.uint64)


def _cluster_fast(D, s0, s1, thr):
    """Cluster boxes s0..s1-1 of D (one label, by score) exactly like the reference.

    Needs ``thr >= 0``, finite coordinates in [0, 1] and finite positive
    weighted scores: then only clusters with IoU above ``thr`` matter, no IoU is
    NaN, and a box that shares no grid cell with a cluster cannot match it.

    Boxes go in batches.  For a batch, one vectorised pass computes the IoU of
    its boxes against the fused boxes of all clusters at the start of the batch
    and against the batch's own boxes (the clusters they may found), for the
    pairs whose cell masks meet, and keeps those above ``thr``.  The sequential
    pass then only has to re-check, in Python floats with the reference's
    formula, the clusters that were merged into during the batch.

    Sets D.assign[p] to the (label-local) cluster of each box and returns
    (first, count, conf, fused): each cluster's first box, member count and
    summed weighted score (a float64 sum in member order), and the [K, 4] fused
    boxes (the box itself for clusters of one).  The exact path returns the same.
    """
    BS, C, CM, box_mask = D.BS, D.C, D.CM, D.mask
    x1l, y1l, x2l, y2l, al, sl = D.x1, D.y1, D.x2, D.y2, D.area, D.score
    assign = D.assign
    B = D.batch

    first: list = []  # first box of each cluster
    merged: dict = {}  # cluster -> (float32 sums of score * box, float64 sum of scores)
    div64 = _DIV_IN_FLOAT64
    pack, unpack = _f4_pack, _f4_unpack
    maximum, minimum, multiply = np.maximum, np.minimum, np.multiply
    add, subtract, divide = np.add, np.subtract, np.divide
    flatnonzero, bitwise_and, take = np.flatnonzero, np.bitwise_and, np.take

    K = 0
    for p0 in range(s0, s1, B):
        p1 = min(s1, p0 + B)
        nb = p1 - p0
        K0 = K
        # columns: the K0 clusters, then this batch's boxes (the clusters they
        # may found; slots K0.. are free until the write-back below)
        Kc = K0 + nb
        C[:, K0:Kc] = BS[:, p0:p1]
        CM[K0:Kc] = box_mask[p0:p1]
        # (box, column) pairs whose cells meet, row-major, and their IoU by the
        # reference's formula
        hit = (bitwise_and(CM[:Kc], box_mask[p0:p1, None]) != 0).ravel().nonzero()[0]
        r = hit // Kc
        c = hit - r * Kc
        r += p0
        Cg = take(C, c, axis=1)
        Bg = take(BS, r, axis=1)
        M = maximum(Cg[:4], Bg[:4])  # max x1, max y1, -min x2, -min y2
        wh = add(M[:2], M[2:])  # -(intersection width, height)
        minimum(wh, 0.0, out=wh)
        w = multiply(wh[0], wh[1])  # interArea
        union = add(Cg[4], Bg[4])  # boxAArea + boxBArea
        subtract(union, w, out=union)
        divide(w, union, out=w)
        # candidates above thr: clusters, and boxes of the batch before the box
        sel = flatnonzero(w > thr)
        cand: list[list[tuple[int, float]] | None] = [None] * nb
        if sel.size:
            rs = r[sel] - p0
            cs = c[sel]
            ok = cs - rs < K0
            if not ok.all():
                sel, rs, cs = sel[ok], rs[ok], cs[ok]
            for rr, cc, vv in zip(rs.tolist(), cs.tolist(), w[sel].tolist()):
                lst = cand[rr]
                if lst is None:
                    cand[rr] = [(cc, vv)]
                else:
                    lst.append((cc, vv))

        made = [-1] * nb  # batch position -> the cluster it founded
        new_pos: list = []
        mod: list = []  # (cluster, x1, y1, x2, y2, area) of the clusters merged into
        mod_pos: dict = {}
        for i in range(nb):
            p = p0 + i
            best_v = -1.0
            best_c = -1
            lst = cand[i]
            if lst is not None:
                for cc, vv in lst:
                    if cc >= K0:
                        cc = made[cc - K0]  # -1 unless that box founded a cluster
                        if cc < 0:
                            continue
                    if cc in mod_pos:  # moved in this batch: checked below
                        continue
                    if vv > best_v or (vv == best_v and cc < best_c):
                        best_v, best_c = vv, cc
            if mod:
                bx1, by1, bx2, by2 = x1l[p], y1l[p], x2l[p], y2l[p]
                ap = al[p]
                for c, fx1, fy1, fx2, fy2, fa in mod:
                    if fx1 < bx2 and bx1 < fx2 and fy1 < by2 and by1 < fy2:
                        inter = ((fx2 if fx2 < bx2 else bx2) - (fx1 if fx1 > bx1 else bx1)) * (
                            (fy2 if fy2 < by2 else by2) - (fy1 if fy1 > by1 else by1)
                        )
                        v = inter / ((fa + ap) - inter)
                        if v > thr and (v > best_v or (v == best_v and c < best_c)):
                            best_v, best_c = v, c
            if best_c < 0:  # a new cluster
                c = K
                K += 1
                first.append(p)
                made[i] = c
                new_pos.append(p)
            else:  # get_weighted_box: float32 sums of score * box, / float64 sum of scores
                c = best_c
                st = merged.get(c)
                if st is None:  # box += b[1] * b[4:] for the first member
                    f = first[c]
                    cf = sl[f]
                    s32 = unpack(pack(0.0 + cf * x1l[f], 0.0 + cf * y1l[f], 0.0 + cf * x2l[f], 0.0 + cf * y2l[f]))
                else:
                    s32, cf = st
                sp = sl[p]
                s32 = unpack(
                    pack(s32[0] + sp * x1l[p], s32[1] + sp * y1l[p], s32[2] + sp * x2l[p], s32[3] + sp * y2l[p])
                )
                cf = cf + sp
                merged[c] = (s32, cf)
                if not div64:
                    cf = _f32(cf)
                fx1, fy1, fx2, fy2 = unpack(pack(s32[0] / cf, s32[1] / cf, s32[2] / cf, s32[3] / cf))
                entry = (c, fx1, fy1, fx2, fy2, (fx2 - fx1) * (fy2 - fy1))
                pos = mod_pos.get(c)
                if pos is None:
                    mod_pos[c] = len(mod)
                    mod.append(entry)
                else:
                    mod[pos] = entry
            assign[p] = c
        # write back the clusters founded in this batch (ids K0..K-1), then the moved ones
        if new_pos:
            src = np.array(new_pos, dtype=np.intp)
            C[:, K0:K] = BS[:, src]
            CM[K0:K] = box_mask[src]
        if mod:
            upd = np.array(mod)
            ids = upd[:, 0].astype(np.intp)
            C[:, ids] = (upd[:, 1:] * _NEG_X2Y2).T
            CM[ids] = _cell_masks(upd[:, 1:5])
    fused = (C[:4, :K] * _NEG_X2Y2[:4, None]).T
    count = np.bincount(np.array(assign[s0:s1], dtype=np.intp), minlength=K)
    conf = [sl[f] for f in first]
    for c, (_, cf) in merged.items():
        conf[c] = cf
    return first, count, conf, fused


def _cluster_exact(D, s0, s1, thr, label_f64):
    """Step-by-step mirror of the reference (any thr, NaN, zero sums, huge labels)."""
    n = s1 - s0
    coords = np.stack([D.BS[0, s0:s1], D.BS[1, s0:s1], -D.BS[2, s0:s1], -D.BS[3, s0:s1]], axis=1)
    S = D.S[s0:s1]
    F = np.empty((n, 4))  # fused boxes of the clusters, as the reference stores them
    dead = np.zeros(n, dtype=bool)  # label no longer equals the box label (float32 rounding)
    label_dead = float(np.float32(label_f64)) != label_f64
    sums: list
    first, count, conf, sums = [], [], [], []
    K = 0
    with np.errstate(all="ignore"):
        for j in range(n):
            b = coords[j]
            idx = -1
            if K:
                Fk = F[:K]
                xA = np.maximum(Fk[:, 0], b[0])
                yA = np.maximum(Fk[:, 1], b[1])
                xB = np.minimum(Fk[:, 2], b[2])
                yB = np.minimum(Fk[:, 3], b[3])
                inter = np.maximum(xB - xA, 0) * np.maximum(yB - yA, 0)
                areaA = (Fk[:, 2] - Fk[:, 0]) * (Fk[:, 3] - Fk[:, 1])
                areaB = (b[2] - b[0]) * (b[3] - b[1])
                ious = inter / (areaA + areaB - inter)
                if label_dead:
                    ious[dead[:K]] = -1
                idx = int(np.argmax(ious))
                if ious[idx] <= thr:
                    idx = -1
            s = S[j]  # numpy float64, like b[1] in the reference
            if idx < 0:
                F[K] = b
                first.append(s0 + j)
                count.append(1)
                conf.append(0 + s)
                sums.append(None)
                D.assign[s0 + j] = K
                K += 1
            else:
                c = idx
                if sums[c] is None:
                    f = first[c] - s0
                    acc = np.zeros(4, dtype=np.float32)
                    acc += S[f] * coords[f]
                    sums[c] = acc
                sums[c] += s * b
                conf[c] = conf[c] + s
                count[c] += 1
                fused = sums[c].copy()
                fused /= conf[c]
                F[c] = fused
                if label_dead:
                    dead[c] = True
                D.assign[s0 + j] = c
    return first, count, conf, F[:K].copy()


# --------------------------------------------------------------------------- #
# Public entry point
# --------------------------------------------------------------------------- #
def weighted_boxes_fusion(
    boxes_list: Sequence,
    scores_list: Sequence,
    labels_list: Sequence,
    weights: Sequence[float] | None = None,
    iou_thr: float = 0.55,
    skip_box_thr: float = 0.0,
    conf_type: str = "avg",
    allows_overflow: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fuse the boxes of several models; same results as ensemble-boxes 1.0.9.

    :param boxes_list: one [N_i, 4] array (or list) per model, ``x1, y1, x2, y2``
        normalised to [0, 1].
    :param scores_list: one [N_i] array of scores per model.
    :param labels_list: one [N_i] array of labels per model (``int(label)`` is used).
    :param weights: one weight per model; ``None`` means 1 for each.
    :param iou_thr: a box joins the best-matching cluster if their IoU is above this.
    :param skip_box_thr: boxes with a score below this are dropped.
    :param conf_type: 'avg', 'max', 'box_and_model_avg' or 'absent_model_aware_avg'.
    :param allows_overflow: for 'avg', let fused scores exceed 1 (no rescaling cap).
    :returns: ``(boxes [K, 4], scores [K], labels [K])``, float64, by score descending.
    :raises ValueError: on arguments the reference would ``exit()`` on or
        silently mishandle (see the module docstring).
    """
    n_models, weights = _check_args(boxes_list, scores_list, labels_list, weights, conf_type)
    pre = _prefilter(boxes_list, scores_list, labels_list, weights, skip_box_thr)
    if pre is None:
        return np.zeros((0, 4)), np.zeros((0,)), np.zeros((0,))
    coords, ws, wts, models, labels = pre
    thr = float(iou_thr)

    # labels in order of first appearance, each label's boxes in input order,
    # then sorted as the reference sorts them
    uniq, first_pos, inverse = np.unique(labels, return_index=True, return_inverse=True)
    if len(uniq) == 1:
        label_values = [int(uniq[0])]
        sizes = [len(labels)]
        perm = ws.argsort()[::-1]
    else:
        rank = np.argsort(first_pos, kind="stable")
        slot = np.empty_like(rank)
        slot[rank] = np.arange(len(rank))
        box_slot = slot[inverse.reshape(-1)]
        by_label = np.argsort(box_slot, kind="stable")
        sizes = np.bincount(box_slot, minlength=len(uniq)).tolist()
        label_values = uniq[rank].tolist()
        chunks = []
        s0 = 0
        for n in sizes:
            g = by_label[s0 : s0 + n]
            chunks.append(g[ws[g].argsort()[::-1]])
            s0 += n
        perm = np.concatenate(chunks)

    P = coords[perm]
    S = ws[perm]
    has_nan = bool(np.isnan(P).any())
    D = _Sorted(P, S, _BATCH, has_nan)
    fast_ok = (
        thr >= 0.0
        and not has_nan
        and float(S.min()) > 1e-30
        and float(S.sum()) < 1e37
    )
    parts = []
    s0 = 0
    for lab, n in zip(label_values, sizes):
        s1 = s0 + n
        lab_f = float(lab)
        if n == 1:
            D.assign[s0] = 0
            res = ([s0], [1], [float(S[s0])], P[s0:s1].copy())
        elif fast_ok and float(np.float32(lab_f)) == lab_f:
            res = _cluster_fast(D, s0, s1, thr)
        elif (
            float(np.float32(lab_f)) == lab_f
            and thr >= 0.0
            and not np.isnan(P[s0:s1]).any()
            and float(S[s0:s1].min()) > 1e-30
            and float(S[s0:s1].sum()) < 1e37
        ):
            res = _cluster_fast(D, s0, s1, thr)
        else:
            res = _cluster_exact(D, s0, s1, thr, lab_f)
        parts.append((lab_f, res))
        s0 = s1

    with np.errstate(all="ignore"):
        return _finish(
            parts, sizes, P, S, wts[perm], models[perm], D.assign, weights, n_models, conf_type, allows_overflow
        )


def _finish(parts, sizes, P, S, W, M, assign, weights, n_models, conf_type, allows_overflow):
    """Per-cluster boxes and scores as the reference makes them, then its final sort."""
    if len(parts) == 1:
        lab_f, (first, count, conf, fused) = parts[0]
        first = np.array(first, dtype=np.intp)
        count = np.array(count, dtype=np.int64)
        conf = np.array(conf, dtype=np.float64)
        ks = [len(first)]
        lab = np.full(len(first), lab_f)
    else:
        first = np.concatenate([np.array(res[0], dtype=np.intp) for _, res in parts])
        count = np.concatenate([np.array(res[1], dtype=np.int64) for _, res in parts])
        conf = np.concatenate([np.array(res[2], dtype=np.float64) for _, res in parts])
        fused = np.concatenate([res[3] for _, res in parts])
        ks = [len(res[0]) for _, res in parts]
        lab = np.repeat(np.array([lab_f for lab_f, _ in parts], dtype=np.float64), ks)
    K = len(first)
    # global cluster of each box: the label's first cluster + the label-local id
    box_cluster = np.array(assign, dtype=np.intp)
    if len(parts) > 1:
        box_cluster += np.repeat(np.cumsum([0] + ks[:-1]), sizes)

    # clusters of one box keep the box's float64 row; the others are the float32
    # rows of get_weighted_box
    single = count == 1
    box = np.where(single[:, None], P[first], fused.astype(np.float32).astype(np.float64))
    if conf_type == "max":
        merged = np.full(K, -np.inf)
        np.maximum.at(merged, box_cluster, S)
    else:
        merged = conf / count
    score = np.where(single, S[first], merged.astype(np.float32).astype(np.float64))
    wsum = np.bincount(box_cluster, weights=W, minlength=K)  # 0 + w1 + w2 + ... in member order
    w = np.where(single, W[first], wsum.astype(np.float32).astype(np.float64))
    labels = np.where(single, lab, lab.astype(np.float32).astype(np.float64))

    if conf_type == "box_and_model_avg":
        score = score * count / w
        present_sum, _ = _model_set_sums(box_cluster, M, K, weights, n_models)
        score = score * present_sum / weights.sum()
    elif conf_type == "absent_model_aware_avg":
        _, absent_sum = _model_set_sums(box_cluster, M, K, weights, n_models)
        score = score * count / (w + absent_sum)
    elif conf_type == "max":
        score = score / weights.max()
    elif not allows_overflow:
        score = score * np.minimum(n_models, count) / weights.sum()
    else:
        score = score * count / weights.sum()

    order = score.argsort()[::-1]
    return box[order], score[order], labels[order]


def _model_set_sums(box_cluster, models, n_clusters, weights, n_models):
    """Per cluster: summed weights of the models present, and of those absent.

    Sums are taken exactly as the reference takes them (numpy sums over the
    weights in model order), once per distinct set of models.
    """
    present = np.zeros((n_clusters, n_models), dtype=bool)
    present[box_cluster, models] = True
    sets, inverse = np.unique(present, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    w64 = weights.astype(np.float64)  # the weight column of the reference's box rows
    present_sum = np.empty(len(sets))
    absent_sum = np.empty(len(sets))
    for i, row in enumerate(sets):
        present_sum[i] = w64[row].sum()
        absent_sum[i] = weights[~row].sum()
    return present_sum[inverse], absent_sum[inverse]
