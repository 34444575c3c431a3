"""The notebook's `PairDataset`: images `DIR/data/{id}_1.png`, `_2.png`, the weak label
(any of added / removed / changed non-empty after normalisation), its augmentations.

Two departures (docs/departures.md): the geometric augmentations (flip, affine) are drawn
once per pair and applied to both images, where the notebook draws them per image (so
half its "no change" pairs differ by a flip); and tensors are scaled to [0, 1], as the
heat map sees them at inference (the notebook's `ToTensorV2` leaves 0-255).

Every random draw is a function of (seed, epoch, pair index): an epoch gives the same
batches whatever the number of workers, and a resumed run repeats them exactly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from sdrun.apps.dataset import image_dir, list_pairs
from sdrun.apps.score import read_label_csv
from sdrun.errors import SpotdiffError
from sdrun.files import atomic_write
from sdrun.stages.images import ImageError, load_image

SIZE = (224, 224)


class TrainDataError(SpotdiffError):
    """Training data that cannot be used; the message names the file, row or label."""


@dataclass(frozen=True)
class Row:
    img_id: str
    a: Path
    b: Path
    change: float  # the weak label: 1.0 when any column has a label
    classes: np.ndarray  # [3, V] 0/1: label v added / removed / changed (per-class heads)


def read_rows(data: str | Path, csv_path: str | Path, vocabulary: Sequence[str] | None,
              warn: Callable[[str], None]) -> tuple[list[Row], list[str]]:
    """(rows with both images, the vocabulary). Labels are normalised with the notebook's
    synonym map; `vocabulary` None takes every label of the CSV (the notebook's), else a
    label outside it is an error naming the rows. Rows without images are left out with a
    warning; none left is an error."""
    truth = read_label_csv(csv_path, normalize=True, role="--csv")
    if not truth:
        raise TrainDataError(f"{csv_path}: no rows")
    labels = sorted({w for sets in truth.values() for s in sets for w in s})
    vocab = list(vocabulary) if vocabulary is not None else labels
    unknown = {w: [i for i, sets in truth.items() if any(w in s for s in sets)] for w in labels
               if w not in vocab}
    if unknown:
        shown = "; ".join(f"{w!r} (rows {', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''})"
                          for w, ids in list(unknown.items())[:5])
        raise TrainDataError(f"{csv_path}: label(s) not in the vocabulary: {shown}; vocabulary: "
                             f"{', '.join(vocab)}")
    index = {w: k for k, w in enumerate(vocab)}
    pairs = {p.pair_id: p for p in list_pairs(data, csv_path)}
    rows, missing = [], []
    for img_id, sets in truth.items():
        p = pairs.get(img_id)
        if p is None or p.problem:
            missing.append(img_id)
            continue
        classes = np.zeros((3, len(vocab)), np.float32)
        for c, s in enumerate(sets):
            classes[c, [index[w] for w in s]] = 1.0
        rows.append(Row(img_id, p.a, p.b, float(any(sets)), classes))
    if missing:
        shown = ", ".join(missing[:10]) + (f", ... ({len(missing) - 10} more)" if len(missing) > 10 else "")
        warn(f"warning: {len(missing)} row(s) of {csv_path} have no images in {image_dir(data)}, "
             f"left out: {shown}")
    if not rows:
        raise TrainDataError(f"{csv_path}: no row has both images in {image_dir(data)}")
    return rows, vocab


def split(rows: Sequence[Row], val_frac: float, seed: int) -> tuple[list[Row], list[Row]]:
    """A deterministic split (a permutation drawn from `seed`); both parts non-empty."""
    if not 0.0 < val_frac < 1.0:
        raise TrainDataError(f"--val-frac {val_frac}: must lie strictly between 0 and 1")
    order = np.random.default_rng(seed).permutation(len(rows))
    n_val = int(round(val_frac * len(rows)))
    if n_val == 0 or n_val == len(rows):
        raise TrainDataError(f"--val-frac {val_frac} of {len(rows)} pair(s) leaves "
                             f"{'no validation' if n_val == 0 else 'no training'} pair; "
                             "use more pairs or another --val-frac")
    val = sorted(order[:n_val].tolist())
    train = sorted(order[n_val:].tolist())
    return [rows[i] for i in train], [rows[i] for i in val]


def check_both_kinds(rows: Sequence[Row], train: Sequence[Row], csv_path: str | Path,
                     val_frac: float, seed: int) -> None:
    """TrainDataError (naming the CSV) unless the pairs, and the training part of their
    split, hold both kinds of weak label: changed (a label in any column) and unchanged
    (every column empty or "none"). With one kind the change head has nothing to separate:
    its loss falls to 0 by predicting a constant, and AUC and F1 are undefined."""
    def one_kind(part: Sequence[Row]) -> str | None:
        n_pos = sum(r.change > 0.5 for r in part)
        if n_pos == 0:
            return "unchanged (no label in added_objs, removed_objs or changed_objs)"
        if n_pos == len(part):
            return "changed (a label in added_objs, removed_objs or changed_objs)"
        return None

    kind = one_kind(rows)
    if kind is not None:
        raise TrainDataError(
            f"{csv_path}: every one of the {len(rows)} usable pair(s) is {kind}; the change head "
            "learns to tell changed from unchanged pairs and needs both kinds: add pairs of the "
            "other kind")
    kind = one_kind(train)
    if kind is not None:
        raise TrainDataError(
            f"{csv_path}: the training part of the split (--val-frac {val_frac}, --seed {seed}; "
            f"{len(train)} of {len(rows)} pairs) holds only pairs that are {kind}; the change head "
            "needs both kinds: choose another --seed or --val-frac, or add pairs of the other kind")


def write_split(path: Path, train: Sequence[Row], val: Sequence[Row]) -> None:
    atomic_write(path, json.dumps({"train": [r.img_id for r in train], "val": [r.img_id for r in val]}) + "\n")


def balanced_weights(rows: Sequence[Row]) -> np.ndarray:
    """Per-row sampling weight 1 / (rows of its class): both classes drawn equally often."""
    y = np.array([r.change for r in rows]) > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return np.where(y, 1.0 / max(n_pos, 1), 1.0 / max(n_neg, 1))


def item_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence((seed, epoch, index)).generate_state(1)[0])


def transforms(size: tuple[int, int] = SIZE):
    """(geometric, photometric, validation) albumentations pipelines with the notebook's
    parameters (albumentations 2 names: CoarseDropout's holes as ranges, `fill`)."""
    import albumentations as A

    h, w = size
    geometric = A.Compose([
        A.Resize(h, w),
        A.HorizontalFlip(p=0.5),
        A.Affine(scale=(0.9, 1.1), translate_percent=(0.0, 0.02), rotate=(-10, 10), p=0.5),
    ], additional_targets={"image2": "image"})  # one draw for both images
    photometric = A.Compose([
        A.ColorJitter(p=0.5),
        A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(10, 20),
                        hole_width_range=(10, 20), fill=0, p=0.3),
    ])
    validation = A.Compose([A.Resize(h, w)], additional_targets={"image2": "image"})
    return geometric, photometric, validation


def to_chw01(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32) / 255.0


class PairDataset:
    """Items (index, pairs [2, 3, H, W] float32 in [0, 1], change label, class labels [3, V]),
    or (index, None, ...) for a pair whose images cannot be read (`collate` drops it)."""

    def __init__(self, rows: Sequence[Row], train: bool, seed: int, size: tuple[int, int] = SIZE):
        self.rows, self.train, self.seed, self.size = list(rows), train, seed, size
        self.epoch = 0
        self._tf = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        if self._tf is None:  # built in the worker: albumentations objects hold their RNG
            self._tf = transforms(self.size)
        geometric, photometric, validation = self._tf
        row = self.rows[i]
        try:
            a, b = load_image(row.a), load_image(row.b)
        except ImageError as e:
            return i, None, str(e), None
        if self.train:
            s = item_seed(self.seed, self.epoch, i)
            geometric.set_random_seed(s)
            out = geometric(image=a, image2=b)
            a, b = out["image"], out["image2"]
            photometric.set_random_seed(s + 1)
            a = photometric(image=a)["image"]
            photometric.set_random_seed(s + 2)
            b = photometric(image=b)["image"]
        else:
            out = validation(image=a, image2=b)
            a, b = out["image"], out["image2"]
        return i, np.stack([to_chw01(a), to_chw01(b)]), row.change, row.classes


def collate(items):
    """A batch of the readable items: (indices, pairs, change, classes) as torch tensors,
    plus the (index, error) of the unreadable ones."""
    import torch

    ok = [it for it in items if it[1] is not None]
    broken = [(it[0], it[2]) for it in items if it[1] is None]
    if not ok:
        return None, broken
    idx = torch.tensor([it[0] for it in ok])
    x = torch.from_numpy(np.stack([it[1] for it in ok]))
    y = torch.tensor([it[2] for it in ok], dtype=torch.float32)
    c = torch.from_numpy(np.stack([it[3] for it in ok]))
    return (idx, x, y, c), broken
