"""What the answer is, once the models have spoken: each rule after the models in one place.

- which boxes are kept (`KeepRule`, `kept_boxes`): a box's score is raised by the share of
  its pixels that are hot in the change heatmap, and it is kept when that fused score
  reaches `det_thr`;
- which kept objects of the two images are the same object (`sdrun.stages.matching`: the
  affinity, the Hungarian assignment and its thresholds);
- which labels each column names (`column_members`): added = the unmatched objects of image
  2, removed = the unmatched objects of image 1, changed = the matched objects that moved;
  then the optional per-class heads (`class_head_sets`) and "none" gates (`gated`).

`Pipeline.finish` applies them to one pair, `Pipeline.model_outputs` uses `kept_boxes` to
choose the crops CLIP embeds, and `sdrun tune` sweeps them over its cache (vectorised, but
through these functions).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence, overload

import numpy as np

from ..csvfile import COLUMNS
from . import heatmap


@dataclass(frozen=True)
class KeepRule:
    """The parameters that decide which boxes are kept."""

    det_thr: float
    heat_th: float
    heat_lambda: float

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> "KeepRule":
        return cls(**{name: float(params[name]) for name in KEEP_PARAMS})


# The parameters that change which boxes are kept, hence which crops CLIP must embed.
KEEP_PARAMS = tuple(f.name for f in fields(KeepRule))


def pixel_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Normalised x1y1x2y2 boxes in pixels of an image of this size (float64)."""
    return np.asarray(boxes, np.float64) * np.array([width, height, width, height], np.float64)


def fused_scores(scores: np.ndarray, boxes_px: np.ndarray, heat: np.ndarray,
                 heat_th: float, heat_lambda: float) -> tuple[np.ndarray, np.ndarray]:
    """(hot share, fused score) of every box: the share of its pixels with heat >= heat_th,
    and its score times (1 + heat_lambda * that share)."""
    share = heatmap.hot_share(heat, boxes_px, heat_th)
    return share, heatmap.fuse_scores(scores, share, heat_lambda)


def kept(fused: np.ndarray, det_thr: float) -> np.ndarray:
    """Indices of the boxes whose fused score reaches det_thr."""
    return np.flatnonzero(fused >= det_thr)


def kept_boxes(scores: np.ndarray, boxes_px: np.ndarray, heat: np.ndarray,
               rule: KeepRule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices kept, hot share, fused score) of one image's candidate boxes."""
    share, fused = fused_scores(scores, boxes_px, heat, rule.heat_th, rule.heat_lambda)
    return kept(fused, rule.det_thr), share, fused


def column_members(n_a: int, n_b: int, matched: Sequence[tuple[int, int]],
                   changed: Sequence[tuple[int, int]]) -> tuple[list[int], list[int], list[int]]:
    """Which objects name each column, by index: (added: of image 2, removed: of image 1,
    changed: of image 1). A changed pair is named by image 1's object (its label equals
    image 2's: only objects of one label are matched)."""
    in_a = {i for i, _ in matched}
    in_b = {j for _, j in matched}
    return ([j for j in range(n_b) if j not in in_b], [i for i in range(n_a) if i not in in_a],
            [i for i, _ in changed])


def label_sets(labels_a: np.ndarray, labels_b: np.ndarray,
               members: tuple[Sequence[int], Sequence[int], Sequence[int]], vocabulary: Sequence[str]) -> dict:
    """The three columns' sorted label words from `column_members`."""
    added, removed, changed = members
    return {"added": sorted({vocabulary[int(labels_b[j])] for j in added}),
            "removed": sorted({vocabulary[int(labels_a[i])] for i in removed}),
            "changed": sorted({vocabulary[int(labels_a[i])] for i in changed})}


def class_head_sets(sets: dict, probs: dict, params: Mapping[str, Any]) -> dict:
    """The label sets with the per-class change heads' say: with `class_mode` "detectors"
    a column keeps only the labels whose probability reaches `class_thr_<column>` (None:
    all); with "heads" the column is every label whose probability reaches it (None: 0.5),
    whatever the detectors found."""
    out = {}
    for col in COLUMNS:
        thr = params.get(f"class_thr_{col}")
        if params.get("class_mode", "detectors") == "heads":
            cut = 0.5 if thr is None else thr
            out[col] = sorted(w for w, v in probs[col].items() if v >= cut)
        else:
            out[col] = sets[col] if thr is None else [w for w in sets[col] if probs[col][w] >= thr]
    return out


def gate_signal(params: Mapping[str, Any], change_score: float | np.ndarray,
                change_logit: float | np.ndarray) -> float | np.ndarray:
    """The number the "none" gates compare with: the change score or the change logit
    (numbers or arrays of them; `none_gate_signal` was checked with the parameters)."""
    return change_logit if params.get("none_gate_signal") == "change_logit" else change_score


@overload
def gated(gate: float | None, signal: float) -> bool: ...
@overload
def gated(gate: np.ndarray, signal: float | np.ndarray) -> np.ndarray: ...
@overload
def gated(gate: float | np.ndarray | None, signal: np.ndarray) -> np.ndarray: ...


def gated(gate: float | np.ndarray | None, signal: float | np.ndarray) -> bool | np.ndarray:
    """True where a column's gate says "none" for this signal (gate None: never); works
    on a number or an array of signals (and of gates)."""
    if gate is None:
        return np.zeros(np.shape(signal), bool) if np.ndim(signal) else False
    out = np.less(signal, gate)
    return bool(out) if np.ndim(out) == 0 else out
