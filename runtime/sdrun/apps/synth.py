"""Synthetic "spot the difference" pairs, shaped like the competition's data.

Each pair is one static scene (gradient + noise background, a road band with a
dashed line, buildings and poles) with 2-6 simple objects drawn with cv2, seen
twice. In image 2 some objects may be added, removed, moved ("changed") or
recoloured ("changed"); ~40% of pairs have no change at all. Both images get
distractors that are NOT changes: compression-like blocky patches (8/16 px
block-aligned regions, slightly flattened and brighter/darker) and sensor noise;
image 2 also gets a global brightness/contrast shift.

Sizes are (height, width); images are uint8 RGB.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from ..bundle.vocab import normalize_label
from ..csvfile import COLUMNS, SUBMISSION_COLUMNS
from ..errors import SpotdiffError
from ..files import atomic_write
from .dataset import IMAGE_EXTS


class SynthError(SpotdiffError):
    """An output folder synth would mix its pairs into."""

CLASSES = ("person", "car", "box", "cone", "bag", "umbrella", "bicycle", "sign")
P_NO_CHANGE = 0.15  # the real train.csv has 2.8% all-none rows; tests need some
OPS, OP_P = ("add", "remove", "move", "recolor"), (0.35, 0.3, 0.15, 0.2)
AA, DARK, WHITE = cv2.LINE_AA, (30, 30, 30), (235, 235, 235)


def _pt(x, y):
    return int(round(x)), int(round(y))


def _draw(img, o):
    """Draw object `o` (centre cx, cy; height ~ scale s) in its class's way."""
    x, y, s, c = o["center"][0], o["center"][1], o["scale"], o["color"]
    t = max(1, int(round(0.06 * s)))
    label = o["label"]
    if label == "person":
        for dx in (-0.05, 0.05):
            cv2.line(img, _pt(x + dx * s, y + 0.1 * s), _pt(x + 1.6 * dx * s, y + 0.5 * s), DARK, t, AA)
        cv2.ellipse(img, _pt(x, y - 0.08 * s), _pt(0.14 * s, 0.22 * s), 0, 0, 360, c, -1, AA)
        cv2.circle(img, _pt(x, y - 0.38 * s), max(1, int(0.11 * s)), (200, 160, 130), -1, AA)
    elif label == "car":
        cab = [_pt(x - 0.5 * s, y - 0.2 * s), _pt(x - 0.3 * s, y - 0.48 * s),
               _pt(x + 0.35 * s, y - 0.48 * s), _pt(x + 0.55 * s, y - 0.2 * s)]
        cv2.fillPoly(img, [np.array(cab)], c, AA)
        win = [_pt(x - 0.38 * s, y - 0.24 * s), _pt(x - 0.24 * s, y - 0.42 * s),
               _pt(x + 0.3 * s, y - 0.42 * s), _pt(x + 0.43 * s, y - 0.24 * s)]
        cv2.fillPoly(img, [np.array(win)], (190, 215, 230), AA)
        r = int(0.12 * s)  # rounded body: two rectangles + four corner circles
        x0, y0, x1, y1 = x - 0.9 * s, y - 0.25 * s, x + 0.9 * s, y + 0.2 * s
        cv2.rectangle(img, _pt(x0 + r, y0), _pt(x1 - r, y1), c, -1, AA)
        cv2.rectangle(img, _pt(x0, y0 + r), _pt(x1, y1 - r), c, -1, AA)
        for cx, cy in ((x0 + r, y0 + r), (x1 - r, y0 + r), (x0 + r, y1 - r), (x1 - r, y1 - r)):
            cv2.circle(img, _pt(cx, cy), r, c, -1, AA)
        for dx in (-0.55, 0.55):
            cv2.circle(img, _pt(x + dx * s, y + 0.2 * s), max(2, int(0.16 * s)), DARK, -1, AA)
    elif label == "box":
        p0, p1 = _pt(x - 0.35 * s, y - 0.35 * s), _pt(x + 0.35 * s, y + 0.35 * s)
        cv2.rectangle(img, p0, p1, c, -1, AA)
        cv2.rectangle(img, p0, p1, DARK, t, AA)
        cv2.line(img, _pt(x, y - 0.35 * s), _pt(x, y + 0.35 * s), DARK, t, AA)
    elif label == "cone":
        tri = [_pt(x, y - 0.5 * s), _pt(x - 0.25 * s, y + 0.35 * s), _pt(x + 0.25 * s, y + 0.35 * s)]
        cv2.fillPoly(img, [np.array(tri)], c, AA)
        cv2.line(img, _pt(x - 0.12 * s, y), _pt(x + 0.12 * s, y), WHITE, t + 1, AA)
        cv2.rectangle(img, _pt(x - 0.35 * s, y + 0.35 * s), _pt(x + 0.35 * s, y + 0.45 * s), DARK, -1, AA)
    elif label == "bag":
        cv2.ellipse(img, _pt(x, y - 0.12 * s), _pt(0.17 * s, 0.2 * s), 0, 180, 360, DARK, t, AA)
        cv2.rectangle(img, _pt(x - 0.3 * s, y - 0.12 * s), _pt(x + 0.3 * s, y + 0.35 * s), c, -1, AA)
    elif label == "umbrella":
        cv2.line(img, _pt(x, y - 0.1 * s), _pt(x, y + 0.4 * s), DARK, t, AA)
        cv2.ellipse(img, _pt(x - 0.06 * s, y + 0.4 * s), _pt(0.06 * s, 0.06 * s), 0, 0, 180, DARK, t, AA)
        cv2.ellipse(img, _pt(x, y - 0.1 * s), _pt(0.55 * s, 0.35 * s), 0, 180, 360, c, -1, AA)
    elif label == "bicycle":
        for dx in (-0.4, 0.4):
            cv2.circle(img, _pt(x + dx * s, y + 0.2 * s), max(2, int(0.25 * s)), DARK, t, AA)
        pts = [(-0.4, 0.2), (-0.1, -0.2), (0.0, 0.2), (-0.4, 0.2), (0.0, 0.2), (0.3, -0.2), (-0.1, -0.2),
               (0.3, -0.2), (0.4, 0.2)]
        for (ax, ay), (bx, by) in zip(pts, pts[1:]):
            cv2.line(img, _pt(x + ax * s, y + ay * s), _pt(x + bx * s, y + by * s), c, t, AA)
        cv2.line(img, _pt(x + 0.25 * s, y - 0.3 * s), _pt(x + 0.35 * s, y - 0.2 * s), DARK, t, AA)
    elif label == "sign":
        cv2.line(img, _pt(x, y + 0.5 * s), _pt(x, y - 0.2 * s), (120, 120, 120), t, AA)
        a = np.pi / 8 + np.arange(8) * np.pi / 4
        octa = np.array([_pt(x + 0.25 * s * np.cos(v), y - 0.25 * s + 0.25 * s * np.sin(v)) for v in a])
        cv2.fillPoly(img, [octa], c, AA)
        cv2.polylines(img, [octa], True, WHITE, max(1, t // 2), AA)


def _bbox(o, h, w):
    canvas = np.zeros((h, w), np.uint8)  # every fixed colour has a non-zero first channel
    _draw(canvas, dict(o, color=(255, 255, 255)))
    ys, xs = np.nonzero(canvas)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _overlaps(a, b, margin=3):
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _colour(rng, far_from=None):
    while True:
        hsv = np.array([[[rng.integers(0, 180), rng.integers(90, 256), rng.integers(90, 256)]]], np.uint8)
        c = tuple(int(v) for v in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])
        dist = np.abs(np.subtract(c, far_from if far_from is not None else -255))
        if dist.sum() > 150 and dist.max() > 100:
            return c


def _place(rng, bg, label, avoid, oid, scale=None, colour=None, tries=60):
    """A new object on `bg` that overlaps none of `avoid` (and stands out from bg), or None."""
    h, w = bg.shape[:2]
    for _ in range(tries):
        s = scale or min(h, w) * rng.uniform(0.09, 0.15)
        cx, cy = int(rng.uniform(s, w - s)), int(rng.uniform(0.6 * s, h - 0.6 * s))
        if scale is None:
            s *= 0.7 + 0.6 * cy / h  # rough perspective: nearer (lower) is bigger
        o = {"id": oid, "label": label, "center": (cx, cy), "scale": float(s), "color": colour}
        x0, y0, x1, y1 = o["bbox"] = _bbox(o, h, w)
        if not any(_overlaps(o["bbox"], a["bbox"]) for a in avoid):
            o["color"] = colour or _colour(rng, far_from=bg[y0:y1, x0:x1].reshape(-1, 3).mean(0))
            return o
    return None


GROUND = ((85, 125, 60), (150, 150, 145), (140, 120, 90), (95, 95, 100), (110, 140, 80))


def _background(rng, h, w):
    """A static CCTV-like scene: ground colours, soft luma noise, buildings, a road, poles."""
    base, patch = (np.array(GROUND[k], float) + rng.uniform(-15, 15, 3) for k in rng.choice(len(GROUND), 2))
    t = np.linspace(1.15, 0.9, h)[:, None, None]  # farther (top) is a little brighter
    img = base * t * np.ones((1, w, 1))
    luma = cv2.resize(rng.normal(0, 10, (8, 8)), (w, h), interpolation=cv2.INTER_CUBIC)[..., None]
    img = np.clip(img + luma + 5 * rng.standard_normal((h, w, 3), dtype=np.float32), 0, 255).astype(np.uint8)
    cv2.ellipse(img, _pt(rng.uniform(0, w), rng.uniform(0.4, 1) * h), _pt(rng.uniform(0.2, 0.5) * w, 0.2 * h),
                float(rng.uniform(-30, 30)), 0, 360, tuple(int(v) for v in patch), -1, AA)
    for _ in range(rng.integers(1, 4)):  # buildings along the top, with windows
        x0, bw, bh = int(rng.uniform(0, w)), int(rng.uniform(0.1, 0.3) * w), int(rng.uniform(0.1, 0.3) * h)
        cv2.rectangle(img, (x0, 0), (x0 + bw, bh), tuple(int(v) for v in rng.uniform(60, 200, 3)), -1)
        for wx in range(x0 + 4, x0 + bw - 4, 10):
            cv2.rectangle(img, (wx, bh // 3), (wx + 4, bh // 3 + 6), (50, 60, 70), -1)
    y0, y1, dy = rng.uniform(0.3, 0.8) * h, rng.uniform(0.3, 0.8) * h, rng.uniform(0.12, 0.22) * h
    grey = int(rng.uniform(70, 140))
    cv2.fillPoly(img, [np.array([_pt(0, y0), _pt(w, y1), _pt(w, y1 + dy), _pt(0, y0 + dy)])], (grey,) * 3, AA)
    for k in range(0, w, 24):  # dashed centre line
        ya, yb = (y0 + dy / 2 + min(1.0, v / w) * (y1 - y0) for v in (k, k + 12))
        cv2.line(img, _pt(k, ya), _pt(k + 12, yb), WHITE, 1, AA)
    for _ in range(rng.integers(1, 4)):  # poles
        px, py = int(rng.uniform(0, w)), int(rng.uniform(0.3, 0.9) * h)
        cv2.line(img, (px, py), (px, py - int(0.25 * h)), (40, 40, 45), 2, AA)
    return img


def _distract(rng, img, global_shift):
    f = img.astype(np.float32)
    h, w = f.shape[:2]
    if global_shift:
        f = (f - 128) * rng.uniform(0.92, 1.08) + 128 + rng.uniform(-10, 10)
    for _ in range(rng.integers(8, 25)):  # compression-like blocky patches
        b = int(rng.choice([8, 16]))
        ph, pw = b * rng.integers(1, 5, size=2)
        y, x = b * int(rng.integers(0, max(1, h // b))), b * int(rng.integers(0, max(1, w // b)))
        reg = f[y:y + ph, x:x + pw]
        rh, rw = reg.shape[:2]
        flat = cv2.resize(cv2.resize(reg, (max(1, rw // b), max(1, rh // b)), interpolation=cv2.INTER_AREA),
                          (rw, rh), interpolation=cv2.INTER_NEAREST)
        a = rng.uniform(0.1, 0.4)
        f[y:y + ph, x:x + pw] = reg * (1 - a) + flat * a + rng.uniform(-8, 8)
    f += 1.5 * rng.standard_normal(f.shape, dtype=np.float32)
    return np.clip(np.rint(f), 0, 255).astype(np.uint8)


def _classes(labels):
    if labels is None:
        return list(CLASSES)
    out = [normalize_label(lab) for lab in labels]
    bad = [lab for lab in out if lab not in CLASSES]
    if bad or not out:
        raise ValueError(f"cannot draw {bad or 'an empty label list'}; drawable: {', '.join(CLASSES)}")
    return out


def make_pair(rng: np.random.Generator, size: tuple[int, int] = (224, 224), labels: Sequence[str] | None = None
              ) -> tuple[np.ndarray, np.ndarray, dict[str, set[str]], tuple[list[dict], list[dict]]]:
    """(img1, img2, truth, (objects1, objects2)) for one synthetic pair.

    truth = {"added", "removed", "changed"}: sets of labels. Objects are dicts
    {id, label, center, scale, color, bbox=(x0, y0, x1, y1)}; an object keeps its
    id across the two images, so an id in only one list was added/removed and
    one whose center/color differs was changed (moved/recoloured).
    """
    h, w = size
    classes = _classes(labels)
    bg = _background(rng, h, w)
    objs1: list[dict] = []
    for i in range(int(rng.integers(2, 7))):
        o = _place(rng, bg, str(rng.choice(classes)), objs1, oid=i)
        if o is not None:
            objs1.append(o)
    objs2 = [dict(o) for o in objs1]
    truth: dict[str, set[str]] = {"added": set(), "removed": set(), "changed": set()}
    next_id, touched = len(objs1), set()
    if rng.random() >= P_NO_CHANGE:  # else: no change at all, only distractors
        for op in rng.choice(OPS, size=int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1])), p=OP_P):
            free = [o for o in objs2 if o["id"] not in touched]  # one operation per object
            if op == "add":
                old = new = _place(rng, bg, str(rng.choice(classes)), objs1 + objs2, oid=next_id)
                next_id += 1
            elif not free:
                continue
            else:
                old = free[int(rng.integers(len(free)))]
                if op == "move":  # to a free spot that does not overlap its old place
                    new = _place(rng, bg, old["label"], objs1 + objs2, old["id"], old["scale"], old["color"])
                else:
                    new = dict(old, color=_colour(rng, far_from=old["color"])) if op == "recolor" else None
            if new is None and op != "remove":
                continue
            objs2 = [o for o in objs2 if o["id"] != old["id"]] + ([new] if new else [])
            touched.add(old["id"])
            truth[{"add": "added", "remove": "removed"}.get(op, "changed")].add(old["label"])
    images = []
    for objs, shift in ((objs1, False), (objs2, True)):
        img = bg.copy()
        for o in objs:
            _draw(img, o)
        images.append(_distract(rng, img, global_shift=shift))
    return images[0], images[1], truth, (objs1, objs2)


def pair_rng(seed: int, i: int) -> np.random.Generator:
    """Pair i's generator: the same as np.random.default_rng(seed).spawn(n)[i] for any n > i."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,)))


def write_synthetic_pairs(out_dir: str | Path, n_pairs: int, seed: int = 0, size: tuple[int, int] = (224, 224),
                          labels: Sequence[str] | None = None, overwrite: bool = False) -> Path:
    """Write out_dir/data/{id}_1.png, {id}_2.png (ids 10000 + i) and out_dir/labels.csv.

    A folder that holds other images (another dataset, or more pairs from an earlier
    call) is refused (SynthError): they would be mixed with these pairs, or replaced.
    `overwrite` deletes the images of `out_dir/data` first."""
    out_dir = Path(out_dir)
    data = out_dir / "data"
    names = {f"{10000 + i}_{k}.png" for i in range(n_pairs) for k in (1, 2)}
    existing = [p for p in data.iterdir() if p.suffix.lower() in IMAGE_EXTS] if data.is_dir() else []
    others = sorted(p.name for p in existing if p.name not in names)
    if existing and overwrite:
        for p in existing:
            p.unlink()
    elif others:
        raise SynthError(f"{data}: holds {len(others)} image(s) that are not these {n_pairs} pairs "
                         f"({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}); choose an "
                         "empty folder, or add --overwrite to delete the folder's images first")
    labels_csv = out_dir / "labels.csv"
    if labels_csv.exists() and not existing and not overwrite:
        raise SynthError(f"{labels_csv}: exists beside no pairs of an earlier `sdrun synth`; it "
                         "would be replaced: choose an empty folder, or add --overwrite")
    data.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_pairs):
        img_id = 10000 + i
        img1, img2, truth, _ = make_pair(pair_rng(seed, i), size, labels)
        # plain writes: the images come first, labels.csv (written whole) makes them a dataset
        for k, img in ((1, img1), (2, img2)):
            cv2.imwrite(str(out_dir / "data" / f"{img_id}_{k}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        rows.append([img_id] + [" ".join(sorted(truth[k])) or "none" for k in COLUMNS])
    path = out_dir / "labels.csv"
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(SUBMISSION_COLUMNS)
    writer.writerows(rows)
    atomic_write(path, text.getvalue())
    return path
