"""sdrun.stages.fusion: weighted boxes fusion against ensemble-boxes 1.0.9, and iou_matrix."""
import subprocess
import sys
import warnings

import numpy as np
import pytest

import sdrun.stages.fusion as fusion
from sdrun.stages.fusion import CONF_TYPES, iou_matrix, weighted_boxes_fusion

ensemble_boxes = pytest.importorskip("ensemble_boxes")

CASES_PER_CONF_TYPE = 250


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def reference(*args, **kwargs):
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return ensemble_boxes.weighted_boxes_fusion(*args, **kwargs)


def ours(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return weighted_boxes_fusion(*args, **kwargs)


def assert_same(ref, got, exact=False):
    rb, rs, rl = ref
    gb, gs, gl = got
    assert gb.shape == rb.shape and gs.shape == rs.shape and gl.shape == rl.shape
    assert gb.dtype == np.float64 and gs.dtype == np.float64 and gl.dtype == np.float64
    np.testing.assert_array_equal(gl, rl)
    np.testing.assert_allclose(gs, rs, rtol=0, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(gb, rb, rtol=0, atol=1e-6, equal_nan=True)
    if exact:
        np.testing.assert_array_equal(gs, rs)
        np.testing.assert_array_equal(gb, rb)


def random_case(rng, max_objects=25):
    """Detections of a few objects by 1-4 models, with the usual mess."""
    n_models = int(rng.integers(1, 5))
    n_labels = int(rng.integers(1, 4))
    n_obj = int(rng.integers(0, max_objects + 1))
    centre = rng.uniform(0.0, 1.0, (n_obj, 2))
    size = rng.uniform(0.02, 0.4, (n_obj, 2)) * rng.choice([0.3, 1.0], (n_obj, 1))
    objects = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    obj_label = rng.integers(0, n_labels, n_obj)
    jitter = float(rng.choice([0.0, 0.002, 0.01, 0.03, 0.08]))
    tie_scores = rng.random() < 0.3
    as_float32 = rng.random() < 0.25

    boxes_list, scores_list, labels_list = [], [], []
    for _ in range(n_models):
        if rng.random() < 0.1:
            boxes_list.append(np.zeros((0, 4)) if rng.random() < 0.5 else [])
            scores_list.append([] if rng.random() < 0.5 else np.zeros(0))
            labels_list.append([] if rng.random() < 0.5 else np.zeros(0, dtype=int))
            continue
        seen = rng.random(n_obj) < 0.8
        b = objects[seen] + rng.normal(0.0, jitter, (int(seen.sum()), 4))
        lab = obj_label[seen].copy()
        flip = rng.random(len(lab)) < 0.05
        lab[flip] = rng.integers(0, n_labels, int(flip.sum()))
        n_fp = int(rng.integers(0, 5))
        c = rng.uniform(0, 1, (n_fp, 2))
        s = rng.uniform(0.01, 0.3, (n_fp, 2))
        b = np.concatenate([b, np.concatenate([c - s, c + s], axis=1)])
        lab = np.concatenate([lab, rng.integers(0, n_labels, n_fp)])
        n = len(b)
        if n and rng.random() < 0.3:  # duplicates of other boxes
            k = int(rng.integers(1, n + 1))
            pick = rng.integers(0, n, k)
            b = np.concatenate([b, b[pick]])
            lab = np.concatenate([lab, lab[pick]])
            n = len(b)
        if n and rng.random() < 0.4:  # degenerate boxes
            for _ in range(int(rng.integers(1, 4))):
                i = int(rng.integers(0, n))
                kind = int(rng.integers(0, 5))
                if kind == 0:
                    b[i, 2] = b[i, 0]  # zero width
                elif kind == 1:
                    b[i, [0, 2]] = b[i, [2, 0]]  # x1 > x2
                elif kind == 2:
                    b[i, [1, 3]] = b[i, [3, 1]]  # y1 > y2
                elif kind == 3:
                    b[i] += rng.choice([-0.3, 0.3])  # partly outside [0, 1]
                else:
                    b[i] = [1.2, 0.1, 1.5, 0.4]  # entirely outside: clipped to zero area
        if tie_scores:
            sc = rng.choice([0.1, 0.3, 0.5, 0.7, 0.9], n)
        else:
            sc = rng.uniform(0.0, 1.0, n)
        if as_float32:
            b, sc = b.astype(np.float32), sc.astype(np.float32)
        boxes_list.append(b)
        scores_list.append(sc)
        labels_list.append(lab)

    wkind = int(rng.integers(0, 5))
    if wkind == 0:
        weights = None
    elif wkind == 1:
        weights = rng.uniform(0.2, 3.0, n_models).tolist()
    elif wkind == 2:
        weights = rng.integers(1, 4, n_models).tolist()
    elif wkind == 3:
        weights = rng.uniform(0.2, 3.0, n_models).astype(np.float32)
    else:
        weights = [1] * n_models
    kwargs = dict(
        weights=weights,
        iou_thr=float(rng.choice([0.1, 0.3, 0.5, 0.55, 0.7, 0.9, rng.uniform(0.0, 1.0)])),
        skip_box_thr=float(rng.choice([0.0, 0.0, 0.05, 0.2, 0.5])),
        allows_overflow=bool(rng.random() < 0.3),
    )
    return boxes_list, scores_list, labels_list, kwargs


def n_boxes(boxes_list):
    return sum(len(b) for b in boxes_list)


# --------------------------------------------------------------------------- #
# equality with ensemble-boxes
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("conf_type", CONF_TYPES)
def test_random_cases_match_ensemble_boxes(conf_type):
    rng = np.random.default_rng(1000 + CONF_TYPES.index(conf_type))
    fused_somewhere = 0
    for case in range(CASES_PER_CONF_TYPE):
        boxes, scores, labels, kwargs = random_case(rng)
        ref = reference(boxes, scores, labels, conf_type=conf_type, **kwargs)
        got = ours(boxes, scores, labels, conf_type=conf_type, **kwargs)
        try:
            assert_same(ref, got, exact=True)
        except AssertionError as exc:
            raise AssertionError(f"case {case} ({kwargs}) differs: {exc}") from None
        if 0 < len(ref[0]) < n_boxes(boxes):
            fused_somewhere += 1
    assert fused_somewhere > CASES_PER_CONF_TYPE // 2  # the cases do exercise fusion


@pytest.mark.parametrize("batch", [1, 2, 5, 48])
@pytest.mark.parametrize("conf_type", ["avg", "box_and_model_avg"])
def test_many_boxes_across_batches(monkeypatch, batch, conf_type):
    """Hundreds of boxes per label: many batches, merges into clusters of earlier batches."""
    monkeypatch.setattr(fusion, "_BATCH", batch)
    rng = np.random.default_rng(7 + batch)
    for _ in range(4):
        boxes, scores, labels, kwargs = random_case(rng, max_objects=120)
        ref = reference(boxes, scores, labels, conf_type=conf_type, **kwargs)
        got = ours(boxes, scores, labels, conf_type=conf_type, **kwargs)
        assert_same(ref, got, exact=True)


def test_dense_scene_two_models():
    """The benchmark's scene: 2 models x 300 boxes of one label."""
    rng = np.random.default_rng(3)
    c = rng.uniform(0.05, 0.95, (300, 2))
    wh = rng.uniform(0.02, 0.15, (300, 2))
    base = np.concatenate([c - wh / 2, c + wh / 2], 1).clip(0, 1)
    boxes = [(base + rng.normal(0, 0.01, base.shape)).clip(0, 1) for _ in range(2)]
    scores = [rng.uniform(0.05, 1, 300) for _ in range(2)]
    labels = [np.zeros(300, dtype=int)] * 2
    for thr in (0.3, 0.55, 0.8):
        for conf_type in CONF_TYPES:
            ref = reference(boxes, scores, labels, iou_thr=thr, conf_type=conf_type)
            got = ours(boxes, scores, labels, iou_thr=thr, conf_type=conf_type)
            assert_same(ref, got, exact=True)


def test_exact_iou_threshold_boundary():
    """IoUs landing exactly on iou_thr: 'above' means strictly above."""
    boxes = [
        [[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]],
        [[0.0, 0.0, 0.5, 0.25], [0.5, 0.5, 1.0, 0.75]],  # IoU exactly 0.5 with the first list
        [[0.0, 0.0, 0.25, 0.5]],
    ]
    scores = [[0.9, 0.8], [0.7, 0.6], [0.5]]
    labels = [[0, 0], [0, 0], [0]]
    for thr in (0.25, 0.5, 0.4999999, 0.5000001):
        for conf_type in CONF_TYPES:
            ref = reference(boxes, scores, labels, iou_thr=thr, conf_type=conf_type)
            got = ours(boxes, scores, labels, iou_thr=thr, conf_type=conf_type)
            assert_same(ref, got, exact=True)


def test_score_ties_keep_reference_order():
    box = [0.1, 0.1, 0.3, 0.3]
    far = [0.6, 0.6, 0.9, 0.9]
    boxes = [[box, far, box, far] * 5, [far, box] * 10]
    scores = [[0.5] * 20, [0.5] * 20]
    labels = [[0, 1, 2, 1] * 5, [1, 0] * 10]
    for conf_type in CONF_TYPES:
        for thr in (0.5, 0.99):
            ref = reference(boxes, scores, labels, iou_thr=thr, conf_type=conf_type)
            got = ours(boxes, scores, labels, iou_thr=thr, conf_type=conf_type)
            assert_same(ref, got, exact=True)


def test_float32_weights_and_scores_promote_like_reference():
    """float(score) * np.float32 weight is float32 under NEP 50: matched."""
    rng = np.random.default_rng(11)
    b = rng.uniform(0, 0.5, (40, 2))
    boxes = [np.concatenate([b, b + 0.3], 1).astype(np.float32) for _ in range(3)]
    scores = [rng.uniform(0, 1, 40).astype(np.float32) for _ in range(3)]
    labels = [rng.integers(0, 2, 40) for _ in range(3)]
    weights = np.array([0.3, 1.7, 2.9], dtype=np.float32)
    for conf_type in CONF_TYPES:
        ref = reference(boxes, scores, labels, weights=weights, conf_type=conf_type, skip_box_thr=0.01)
        got = ours(boxes, scores, labels, weights=weights, conf_type=conf_type, skip_box_thr=0.01)
        assert_same(ref, got, exact=True)


def test_float_labels_are_truncated_like_int():
    boxes = [[[0.1, 0.1, 0.4, 0.4], [0.1, 0.1, 0.4, 0.4]], [[0.1, 0.1, 0.4, 0.41]]]
    scores = [[0.9, 0.8], [0.7]]
    labels = [[1.7, 1.2], [1.0]]
    assert_same(reference(boxes, scores, labels), ours(boxes, scores, labels), exact=True)


@pytest.mark.parametrize("conf_type", CONF_TYPES)
def test_odd_inputs_take_the_exact_path(conf_type):
    """Zero or infinite scores, NaN boxes, negative or NaN iou_thr, huge labels."""
    rng = np.random.default_rng(21)
    for case in range(40):
        boxes, scores, labels, kwargs = random_case(rng, max_objects=10)
        kind = case % 6
        if kind == 0:
            kwargs["iou_thr"] = float(rng.choice([-0.5, -1.5, float("nan")]))
        elif kind == 1:
            scores = [np.where(np.asarray(s) > 0.5, 0.0, s) for s in scores]  # zero scores merge
        elif kind == 2:
            labels = [np.asarray(lab, dtype=np.int64) + (1 << 25) + 1 for lab in labels]
        elif kind == 3:
            for b in boxes:
                if len(b):
                    b[0, 1] = np.nan
        elif kind == 4:
            scores = [np.where(np.asarray(s) > 0.8, np.inf, s) for s in scores]
        else:
            kwargs["weights"] = [0.0] * len(boxes)
        ref = reference(boxes, scores, labels, conf_type=conf_type, **kwargs)
        got = ours(boxes, scores, labels, conf_type=conf_type, **kwargs)
        try:
            assert_same(ref, got)
        except AssertionError as exc:
            raise AssertionError(f"case {case} (kind {kind}) differs: {exc}") from None


def test_fast_and_exact_paths_agree():
    rng = np.random.default_rng(5)
    for _ in range(60):
        n = int(rng.integers(2, 200))
        c = rng.uniform(0, 1, (n, 2))
        s = rng.uniform(0.01, 0.2, (n, 2))
        P = np.clip(np.concatenate([c - s, c + s], 1), 0, 1)
        S = np.sort(rng.uniform(0.01, 2.0, n))[::-1]
        thr = float(rng.uniform(0, 0.9))
        D_fast = fusion._Sorted(P, S, int(rng.integers(1, 64)))
        D_exact = fusion._Sorted(P, S, 8)
        fast = fusion._cluster_fast(D_fast, 0, n, thr)
        exact = fusion._cluster_exact(D_exact, 0, n, thr, 0.0)
        assert D_fast.assign == D_exact.assign
        for a, e in zip(fast[:3], exact[:3]):
            np.testing.assert_array_equal(a, e)
        merged = np.array(fast[1]) > 1
        np.testing.assert_array_equal(fast[3][merged], exact[3][merged])


# --------------------------------------------------------------------------- #
# empty inputs and return types
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "boxes,scores,labels,kwargs",
    [
        ([], [], [], {}),
        ([[]], [[]], [[]], {}),
        ([np.zeros((0, 4)), np.zeros((0, 4))], [np.zeros(0)] * 2, [np.zeros(0)] * 2, {}),
        ([[[0.1, 0.1, 0.2, 0.2]]], [[0.1]], [[0]], {"skip_box_thr": 0.5}),
        ([[[0.1, 0.1, 0.1, 0.2]]], [[0.9]], [[0]], {}),  # zero area only
    ],
)
def test_empty_results(boxes, scores, labels, kwargs):
    ref = reference(boxes, scores, labels, **kwargs)
    got = ours(boxes, scores, labels, **kwargs)
    assert got[0].shape == (0, 4) and got[1].shape == (0,) and got[2].shape == (0,)
    assert_same(ref, got, exact=True)


def test_single_box():
    got = ours([[[0.2, 0.3, 0.4, 0.5]]], [[0.8]], [[3]], weights=[2.0])
    np.testing.assert_array_equal(got[0], [[0.2, 0.3, 0.4, 0.5]])
    np.testing.assert_array_equal(got[1], [0.8])  # 0.8 * 2 * min(1, 1) / 2
    np.testing.assert_array_equal(got[2], [3.0])


def test_warnings_for_fixed_and_dropped_boxes():
    boxes = [[[0.5, 0.1, 0.2, 0.4], [0.1, 0.1, 0.1, 0.3], [-0.1, 0.2, 0.3, 1.2]]]
    with pytest.warns(UserWarning) as record:
        weighted_boxes_fusion(boxes, [[0.9, 0.8, 0.7]], [[0, 0, 0]])
    text = " ".join(str(w.message) for w in record)
    assert "swapped" in text and "clipped" in text and "zero area" in text


# --------------------------------------------------------------------------- #
# bad arguments
# --------------------------------------------------------------------------- #
GOOD_BOXES = [[[0.1, 0.1, 0.3, 0.3]], [[0.1, 0.1, 0.3, 0.3]]]
GOOD_SCORES = [[0.9], [0.8]]
GOOD_LABELS = [[0], [0]]


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((GOOD_BOXES, GOOD_SCORES[:1], GOOD_LABELS), {}, "one entry per model"),
        ((GOOD_BOXES, GOOD_SCORES, GOOD_LABELS + [[0]]), {}, "one entry per model"),
        ((GOOD_BOXES[:1], GOOD_SCORES, GOOD_LABELS), {}, "one entry per model"),
        ((GOOD_BOXES, GOOD_SCORES, GOOD_LABELS), {"weights": [1.0]}, "weights"),
        ((GOOD_BOXES, GOOD_SCORES, GOOD_LABELS), {"weights": [1.0, 2.0, 3.0]}, "weights"),
        ((GOOD_BOXES, GOOD_SCORES, GOOD_LABELS), {"weights": [[1.0, 2.0]]}, "weights"),
        ((GOOD_BOXES, GOOD_SCORES, GOOD_LABELS), {"conf_type": "median"}, "conf_type"),
        (([[[0.1, 0.1, 0.3, 0.3, 0.5]], GOOD_BOXES[1]], GOOD_SCORES, GOOD_LABELS), {}, r"\[N, 4\]"),
        (([[0.1, 0.1, 0.3, 0.3], GOOD_BOXES[1]], GOOD_SCORES, GOOD_LABELS), {}, r"\[N, 4\]"),
        (([np.zeros((1, 1, 4)), GOOD_BOXES[1]], GOOD_SCORES, GOOD_LABELS), {}, r"\[N, 4\]"),
        ((GOOD_BOXES, [[0.9, 0.5], [0.8]], GOOD_LABELS), {}, "scores_list"),
        ((GOOD_BOXES, [[], [0.8]], GOOD_LABELS), {}, "scores_list"),
        ((GOOD_BOXES, GOOD_SCORES, [[0], [0, 1]]), {}, "labels_list"),
        ((GOOD_BOXES, GOOD_SCORES, [[np.nan], [0]]), {}, "labels_list"),
        ((GOOD_BOXES, GOOD_SCORES, [["cat"], [0]]), {}, "labels_list"),
        (("boxes", GOOD_SCORES, GOOD_LABELS), {}, "boxes_list"),
    ],
)
def test_bad_arguments_raise_value_error(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        weighted_boxes_fusion(*args, **kwargs)


# --------------------------------------------------------------------------- #
# iou_matrix
# --------------------------------------------------------------------------- #
def naive_iou(a, b):
    out = np.zeros((len(a), len(b)))
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            inter = iw * ih
            area_p = max(0.0, p[2] - p[0]) * max(0.0, p[3] - p[1])
            area_q = max(0.0, q[2] - q[0]) * max(0.0, q[3] - q[1])
            union = area_p + area_q - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


def test_iou_matrix_matches_naive_loop():
    rng = np.random.default_rng(2)
    for _ in range(20):
        n, m = int(rng.integers(0, 30)), int(rng.integers(0, 30))
        a = rng.uniform(-0.2, 1.2, (n, 4))
        b = rng.uniform(-0.2, 1.2, (m, 4))
        if n > 3:
            a[0, 2] = a[0, 0]  # zero width
            a[1] = b[0] if m else a[1]  # identical boxes
        got = iou_matrix(a, b)
        assert got.shape == (n, m) and got.dtype == np.float64
        np.testing.assert_allclose(got, naive_iou(a, b), rtol=1e-12, atol=1e-15)


def test_iou_matrix_known_values_and_shapes():
    a = [[0, 0, 2, 2]]
    b = [[1, 1, 3, 3], [0, 0, 2, 2], [2, 2, 3, 3], [0, 0, 1, 2]]
    np.testing.assert_allclose(iou_matrix(a, b), [[1 / 7, 1.0, 0.0, 0.5]])
    assert iou_matrix(np.zeros((0, 4)), b).shape == (0, 4)
    assert iou_matrix([], b).shape == (0, 4)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        iou_matrix([[0, 0, 1]], b)


def test_fusion_module_does_not_import_torch():
    code = "import sys, sdrun.stages.fusion; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
