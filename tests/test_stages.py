"""The pipeline's pure stages, numpy in and numpy out, without models."""
from __future__ import annotations

import numpy as np
import pytest

from sdrun.stages import detect, heatmap
from sdrun.stages.matching import match_objects


def test_unflip_is_an_involution_and_mirrors():
    rng = np.random.default_rng(0)
    (x1, x2), (y1, y2) = np.sort(rng.uniform(size=(2, 20)), 0), np.sort(rng.uniform(size=(2, 20)), 0)
    b = np.stack([x1, y1, x2, y2], -1)
    f = detect.unflip(b)
    np.testing.assert_allclose(detect.unflip(f), b)
    np.testing.assert_allclose(f[:, 0], 1 - b[:, 2])
    assert (f[:, 2] >= f[:, 0]).all()


def test_owlvit_detections_match_direct_definition():
    rng = np.random.default_rng(1)
    n, d, p = 30, 8, 12
    emb = rng.normal(size=(n, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    shift, scale = rng.normal(size=(n, 1)), np.abs(rng.normal(size=(n, 1))) + 0.5
    q = detect.normalize_queries(rng.normal(size=(p, d)))
    prompt_labels = np.repeat(np.arange(p // 3), 3)
    boxes = rng.uniform(0.2, 0.8, size=(n, 4))
    out_b, out_s, out_l = detect.owlvit_detections(boxes, emb, shift, scale, q, prompt_labels, 0.3)
    logits = np.array([[(emb[i] @ q[j] + shift[i, 0]) * scale[i, 0] for j in range(p)] for i in range(n)])
    scores = 1 / (1 + np.exp(-logits.max(1)))
    keep = scores > 0.3
    np.testing.assert_allclose(out_s, scores[keep], rtol=1e-6)
    np.testing.assert_array_equal(out_l, prompt_labels[logits.argmax(1)][keep])
    np.testing.assert_allclose(out_b, detect.cxcywh_to_xyxy(boxes[keep]), rtol=1e-6)


def test_gdino_label_scores_use_only_each_labels_tokens():
    logits = np.full((2, 10), -np.inf)
    logits[:, :6] = [[0, 2, -1, 5, 0, -3], [1, -2, 3, 0, 0, 0]]
    token_labels = np.array([-1, 0, -1, 1, 1, -1])  # [CLS] l0 . l1 l1 .
    per_label = detect.label_token_scores(logits, token_labels, 3)
    def sig(x):
        return 1 / (1 + np.exp(-x))
    np.testing.assert_allclose(per_label[0], [sig(2), sig(5), 0.0])
    np.testing.assert_allclose(per_label[1], [sig(-2), sig(0), 0.0])
    boxes = np.array([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]])
    b, s, lab = detect.gdino_detections(logits, boxes, token_labels, 3, threshold=0.5)
    np.testing.assert_array_equal(lab, [1])  # the second box's best label scores exactly 0.5: not kept
    np.testing.assert_allclose(s, [sig(5)])


def test_heatmap_orientation_and_normalisation():
    patch = np.zeros((14, 14), np.float32)
    patch[2, 10] = 5.0  # hot near the top right
    heat = heatmap.upsample_heat(patch, 100, 300)  # a wide image
    assert heat.shape == (100, 300)
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert y < 30 and x > 200
    assert heat.max() == pytest.approx(1.0, abs=0.1)


def test_change_score_is_the_notebooks_top_k_mean():
    heat = np.arange(1000, dtype=np.float32).reshape(20, 50) / 1000
    assert heatmap.change_score(heat) == pytest.approx(np.sort(heat.ravel())[-50:].mean())
    small = np.arange(39, dtype=np.float32).reshape(3, 13)  # k = max(1, 39 // 20) = 1, not round(1.95)
    assert heatmap.change_score(small) == 38.0


def test_hot_share_integral_image_equals_slice_and_mean():
    rng = np.random.default_rng(2)
    for _ in range(20):
        h, w = rng.integers(20, 120, 2)
        heat = rng.uniform(size=(h, w)).astype(np.float32)
        x1, x2 = np.sort(rng.uniform(-10, w + 10, (2, 40)), axis=0)
        y1, y2 = np.sort(rng.uniform(-10, h + 10, (2, 40)), axis=0)
        boxes = np.stack([x1, y1, x2, y2], -1)
        boxes[:3, 2] = boxes[:3, 0]  # zero width
        boxes[3:6] = np.round(boxes[3:6]) - 1e-5  # edges a float hair below whole pixels
        fast = heatmap.hot_share(heat, boxes, 0.5)
        for k, (a, b, c, d) in enumerate(boxes):
            def px(v, size):  # the notebook's int(max(0, min(size - 1, v))), 1e-3 px edge snap
                return int(max(0, min(size - 1, v + 1e-3)))
            xa, ya, xb, yb = px(a, w), px(b, h), px(c, w), px(d, h)
            region = heat[ya:yb, xa:xb]
            slow = (region >= 0.5).mean() if region.size else 0.0
            assert fast[k] == pytest.approx(slow, abs=1e-12)


def test_hot_share_leaves_out_the_last_column_as_the_notebook_does():
    heat = np.zeros((10, 10), np.float32)
    heat[:, -1] = 1.0  # only the last column is hot
    assert heatmap.hot_share(heat, np.array([[5.0, 0.0, 10.0, 10.0]]), 0.5)[0] == 0.0
    heat[:, -2] = 1.0
    assert heatmap.hot_share(heat, np.array([[5.0, 0.0, 10.0, 10.0]]), 0.5)[0] == pytest.approx(0.25)


def test_fuse_scores():
    s = heatmap.fuse_scores(np.array([0.2, 0.5]), np.array([0.0, 0.5]), 0.8)
    np.testing.assert_allclose(s, [0.2, 0.5 * 1.4], rtol=1e-6)


def _emb(*vecs):
    v = np.array(vecs, np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_matching_rules():
    a_boxes = np.array([[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.7, 0.7], [0.0, 0.8, 0.1, 0.9]])
    b_boxes = np.array([[0.1, 0.1, 0.3, 0.3], [0.55, 0.6, 0.75, 0.8], [0.8, 0.0, 0.9, 0.1]])
    labels_a, labels_b = np.array([0, 1, 2]), np.array([0, 1, 0])
    ea = _emb([1, 0, 0], [0, 1, 0], [0, 0, 1])
    eb = _emb([1, 0, 0], [0, 1, 0], [0.9, 0.1, 0])
    m = match_objects(a_boxes, labels_a, ea, b_boxes, labels_b, eb, alpha=0.5, iou_thr=0.5)
    # identical box + embedding: matched, not changed; moved box, same look: matched, changed
    assert (0, 0) in m.pairs and (1, 1) in m.pairs and m.changed == [(1, 1)]
    assert m.removed == [2] and m.added == [2]  # label 2 only in a; b's third box has no partner


def test_matching_never_pairs_different_labels_and_handles_empty():
    box = np.array([[0.1, 0.1, 0.5, 0.5]])
    m = match_objects(box, [0], _emb([1, 0]), box, [1], _emb([1, 0]), alpha=0.5, iou_thr=0.1)
    assert m.pairs == [] and m.added == [0] and m.removed == [0]
    m = match_objects(np.zeros((0, 4)), [], np.zeros((0, 2)), box, [1], _emb([1, 0]), 0.5, 0.5)
    assert m.added == [0] and m.removed == []


def test_clip_similarity_falls_back_to_iou_without_a_crop():
    from sdrun.stages.matching import clip_similarity

    ea = np.array([[1.0, 0.0], [np.nan, np.nan]])  # box 2 of image 1 had no crop
    eb = np.array([[0.0, 1.0], [1.0, 0.0]])
    iou = np.array([[0.1, 0.2], [0.3, 0.4]])
    np.testing.assert_allclose(clip_similarity(ea, eb, iou), [[0.5, 1.0], [0.3, 0.4]])
    # nothing embedded on one side (a (K, 0) array): the IoU everywhere
    np.testing.assert_allclose(clip_similarity(ea, np.zeros((2, 0)), iou), iou)
