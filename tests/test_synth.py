"""sdrun.apps.synth: synthetic pairs in the competition's format."""
from __future__ import annotations

import csv
from collections import Counter

import cv2
import numpy as np
import pytest

from sdrun.apps.synth import CLASSES, make_pair, pair_rng, write_synthetic_pairs
from sdrun.bundle.vocab import LABEL_COLUMNS, parse_label_cell

N_STATS = 200


@pytest.fixture(scope="module")
def pairs():
    return [make_pair(pair_rng(0, i)) for i in range(N_STATS)]


def _no_change(truth):
    return not any(truth.values())


def _read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_write_is_deterministic_and_pairs_independent_of_n(tmp_path):
    a = write_synthetic_pairs(tmp_path / "a", 6, seed=3)
    b = write_synthetic_pairs(tmp_path / "b", 6, seed=3)
    c = write_synthetic_pairs(tmp_path / "c", 3, seed=3)
    write_synthetic_pairs(tmp_path / "d", 3, seed=4)
    assert a == tmp_path / "a" / "labels.csv"
    assert a.read_bytes() == b.read_bytes()
    files = sorted(p.name for p in (tmp_path / "a" / "data").iterdir())
    assert files == sorted(f"{10000 + i}_{k}.png" for i in range(6) for k in (1, 2))
    for name in files:
        assert (tmp_path / "a" / "data" / name).read_bytes() == (tmp_path / "b" / "data" / name).read_bytes()
    for name in sorted(p.name for p in (tmp_path / "c" / "data").iterdir()):
        assert (tmp_path / "c" / "data" / name).read_bytes() == (tmp_path / "a" / "data" / name).read_bytes()
    assert a.read_text().splitlines()[:4] == c.read_text().splitlines()
    png = "10000_1.png"
    assert (tmp_path / "d" / "data" / png).read_bytes() != (tmp_path / "c" / "data" / png).read_bytes()


def test_pair_rng_matches_spawn():
    children = np.random.default_rng(7).spawn(5)
    for i in (0, 4):
        assert pair_rng(7, i).integers(0, 2**62) == children[i].integers(0, 2**62)


def test_csv_format_and_images_match_truth(tmp_path):
    path = write_synthetic_pairs(tmp_path, 12, seed=1)
    fields, rows = _read_csv(path)
    assert fields == ["img_id", *LABEL_COLUMNS]
    assert [int(r["img_id"]) for r in rows] == [10000 + i for i in range(12)]
    for i, row in enumerate(rows):
        img1, img2, truth, _ = make_pair(pair_rng(1, i))
        for col, key in zip(LABEL_COLUMNS, ("added", "removed", "changed")):
            cell = row[col]
            assert cell == "none" or (cell and " ".join(sorted(set(cell.split()))) == cell)
            assert set(parse_label_cell(cell)) == truth[key]
        for k, img in ((1, img1), (2, img2)):
            bgr = cv2.imread(str(tmp_path / "data" / f"{row['img_id']}_{k}.png"), cv2.IMREAD_UNCHANGED)
            assert bgr.shape == (224, 224, 3)
            np.testing.assert_array_equal(bgr[..., ::-1], img)  # written RGB -> BGR


@pytest.mark.parametrize("size", [(224, 224), (120, 160)])
def test_shapes_and_dtypes(size):
    for i in range(5):
        img1, img2, truth, (objs1, objs2) = make_pair(pair_rng(0, i), size)
        for img in (img1, img2):
            assert img.shape == (*size, 3) and img.dtype == np.uint8
        assert set(truth) == {"added", "removed", "changed"}
        for o in objs1 + objs2:
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= size[1] and 0 <= y0 < y1 <= size[0]


def test_truth_is_consistent_with_objects(pairs):
    for _, _, truth, (objs1, objs2) in pairs:
        assert 2 <= len(objs1) <= 6
        by1, by2 = {o["id"]: o for o in objs1}, {o["id"]: o for o in objs2}
        assert len(by1) == len(objs1) and len(by2) == len(objs2)
        added = {by2[i]["label"] for i in by2.keys() - by1.keys()}
        removed = {by1[i]["label"] for i in by1.keys() - by2.keys()}
        changed = {by1[i]["label"] for i in by1.keys() & by2.keys() if by1[i] != by2[i]}
        assert truth == {"added": added, "removed": removed, "changed": changed}
        for i in by1.keys() & by2.keys():  # a change is a move or a recolour, never a relabel
            assert by1[i]["label"] == by2[i]["label"] and by1[i]["scale"] == by2[i]["scale"]
        if _no_change(truth):
            assert objs1 == objs2
        for objs in (objs1, objs2):  # objects never overlap, so none hides another
            boxes = [o["bbox"] for o in objs]
            for j, a in enumerate(boxes):
                for b in boxes[j + 1:]:
                    assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
        for label in added - removed:  # a plain addition raises that class's count
            n1 = sum(o["label"] == label for o in objs1)
            assert sum(o["label"] == label for o in objs2) > n1


def test_change_mix(pairs):
    share = sum(_no_change(t) for _, _, t, _ in pairs) / len(pairs)
    assert 0.05 <= share <= 0.3
    kinds = Counter(k for _, _, t, _ in pairs for k, v in t.items() if v)
    assert min(kinds[k] for k in ("added", "removed", "changed")) >= 10
    seen = {o["label"] for _, _, _, (o1, o2) in pairs for o in o1 + o2}
    assert seen == set(CLASSES)


def _diff(a, b):
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2)


def test_no_change_pairs_differ_only_by_distractors(pairs):
    quiet = [_diff(a, b) for a, b, t, _ in pairs if _no_change(t)]
    assert quiet
    for d in quiet:
        assert d.mean() > 1.0  # noise, brightness shift, blocky patches
        assert d.mean() < 20 and np.percentile(d, 99) < 60
        assert (d > 60).mean() < 0.01
    # every added, removed, moved or recoloured object shows up more strongly than that
    for a, b, _t, (objs1, objs2) in pairs:
        d = _diff(a, b)
        by1, by2 = {o["id"]: o for o in objs1}, {o["id"]: o for o in objs2}
        for i in by1.keys() | by2.keys():
            if by1.get(i) != by2.get(i):
                x0, y0, x1, y1 = (by2.get(i) or by1[i])["bbox"]
                assert d[y0:y1, x0:x1].max() > 70


def test_labels_argument():
    for i in range(10):
        _, _, truth, (objs1, objs2) = make_pair(pair_rng(2, i), labels=["person", "auto"])
        assert {o["label"] for o in objs1 + objs2} <= {"person", "car"}
    with pytest.raises(ValueError, match="cannot draw"):
        make_pair(pair_rng(0, 0), labels=["spaceship"])
