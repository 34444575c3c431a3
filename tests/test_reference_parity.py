"""The runtime's answers equal the PyTorch reference pipeline's (the seed-style oracle):
identical label sets on every pair, kept boxes within 0.5 px."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

pytest.importorskip("torch")
pytest.importorskip("ensemble_boxes")

from conftest import REAL_PAIRS

from sdexport.reference import ReferencePipeline
from sdrun.apps.synth import make_pair, pair_rng
from sdrun.pipeline import Pipeline
from sdrun.stages.images import load_image

N_SYNTH = 20
BOX_TOL_PX = 0.5
SIZES = ((224, 224), (200, 260), (320, 240), (224, 224))  # (h, w): non-square on 10 of 20


def _pairs():
    pairs = []
    for i in range(N_SYNTH):
        a, b, _, _ = make_pair(pair_rng(7, i), size=SIZES[i % len(SIZES)])
        pairs.append((f"synth-{i}", a, b))
    for pid in ("31795", "35333"):
        pairs.append((f"real-{pid}", load_image(REAL_PAIRS / f"{pid}_1.png"),
                      load_image(REAL_PAIRS / f"{pid}_2.png")))
    return pairs


def _box_errors(run_objs, ref_boxes, ref_labels, labels):
    """Largest coordinate error after pairing runtime and reference boxes of equal labels."""
    if len(run_objs) != len(ref_boxes):
        return np.inf
    if not run_objs:
        return 0.0
    rb = np.array([o["box"] for o in run_objs])
    rl = np.array([labels.index(o["label"]) for o in run_objs])
    cost = np.abs(rb[:, None] - ref_boxes[None]).max(-1) + 1e6 * (rl[:, None] != ref_labels[None])
    i, j = linear_sum_assignment(cost)
    return float(cost[i, j].max())


@pytest.fixture(scope="module")
def reference(tiny_bundle):
    return ReferencePipeline(tiny_bundle)


@pytest.mark.parametrize("provider", ["cpu", "openvino:f32"])
def test_runtime_equals_reference(tiny_bundle, reference, provider):
    if provider.startswith("openvino"):
        pytest.importorskip("openvino")
    pipe = Pipeline.load(tiny_bundle, provider=provider)
    mismatches, worst_box, n_objects = [], 0.0, 0
    for pair_id, a, b in _pairs():
        r = pipe.diff(a, b, pair_id)
        q = reference.diff(a, b)
        got = (r.added, r.removed, r.changed)
        want = (q["added"], q["removed"], q["changed"])
        if got != want:
            mismatches.append((pair_id, got, want))
        for image_no in (1, 2):
            objs = [o for o in r.objects if o["image"] == image_no]
            n_objects += len(objs)
            err = _box_errors(objs, q["boxes"][image_no - 1], q["labels"][image_no - 1], pipe.labels)
            worst_box = max(worst_box, err)
        assert r.change_logit == pytest.approx(q["change_logit"], abs=1e-5)
    print(f"\n{N_SYNTH + 2} pairs, {n_objects} kept objects, worst box error {worst_box:.2e} px")
    assert not mismatches, mismatches
    assert worst_box <= BOX_TOL_PX
    assert n_objects > 50  # the comparison is not vacuous
