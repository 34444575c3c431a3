"""The competition's data layout: `DIR/data/{id}_1.png`, `{id}_2.png`, CSVs of ids and labels."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..csvfile import read_csv
from ..errors import SpotdiffError
from ..files import pair_id_problem

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class DatasetError(SpotdiffError):
    pass


@dataclass
class PairSource:
    pair_id: str
    a: Path | None
    b: Path | None
    problem: str | None = None  # why the pair cannot run (missing image, duplicate id)


def image_dir(data: Path) -> Path:
    """`DIR/data` when it exists (the competition layout), else DIR itself."""
    data = Path(data)
    if not data.is_dir():
        raise DatasetError(f"{data}: not a folder")
    return data / "data" if (data / "data").is_dir() else data


class _Finder:
    """`folder/stem.<ext>` for the first image extension that exists, in any letter
    case (`10000_1.PNG` too; the folder is listed once, at the first miss)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._by_lower: dict[str, Path] | None = None

    def __call__(self, stem: str) -> Path | None:
        for ext in IMAGE_EXTS:
            p = self.folder / f"{stem}{ext}"
            if p.exists():
                return p
        by_lower = self._by_lower
        if by_lower is None:
            by_lower = self._by_lower = {q.name.lower(): q for q in self.folder.iterdir()}
        return next((by_lower[f"{stem}{ext}".lower()] for ext in IMAGE_EXTS
                     if f"{stem}{ext}".lower() in by_lower), None)


def read_ids(csv_path: Path) -> list[str]:
    """The CSV's img_id column, in order (empty cells skipped); none at all is an error."""
    names, rows = read_csv(csv_path)
    if "img_id" not in names:
        raise DatasetError(f"{csv_path}: no img_id column (columns: {', '.join(names) or 'none'})")
    ids = [row["img_id"].strip() for _, row in rows if (row.get("img_id") or "").strip()]
    if not ids:
        raise DatasetError(f"{csv_path}: no ids (the img_id column has no values)")
    return ids


def list_pairs(data: str | Path, csv_path: str | Path | None = None) -> list[PairSource]:
    """Every pair to run, in order: the CSV's ids, or every `{id}_1.*` in the folder.
    Problems (an id without images, a repeated id) are kept on the pair, not raised,
    so one bad row never stops a run."""
    folder = image_dir(Path(data))
    if csv_path is not None:
        ids = read_ids(Path(csv_path))
    else:
        ids = sorted({p.name.rsplit("_1", 1)[0] for p in folder.iterdir()
                      if p.suffix.lower() in IMAGE_EXTS and p.stem.endswith("_1")},
                     key=lambda s: (len(s), s))
    pairs, seen, find = [], set(), _Finder(folder)
    for pair_id in ids:
        if pair_id in seen:
            pairs.append(PairSource(pair_id, None, None, f"duplicate id {pair_id!r} in {csv_path}: "
                                    "run once, the repeat skipped"))
            continue
        seen.add(pair_id)
        bad_id = pair_id_problem(pair_id)
        if bad_id:  # never looked up: an id is a name, not a path
            pairs.append(PairSource(pair_id, None, None, f"{csv_path}: {bad_id}"))
            continue
        a, b = find(f"{pair_id}_1"), find(f"{pair_id}_2")
        missing = [f"{pair_id}_{k}.png" for k, p in ((1, a), (2, b)) if p is None]
        problem = f"{folder}: no image {' or '.join(missing)}" if missing else None
        pairs.append(PairSource(pair_id, a, b, problem))
    return pairs


def pair_inputs(pairs: Iterable[PairSource | tuple]) -> list[tuple[str, Path]]:
    """Every image of `pairs` (PairSource or (id, a, b)) as (what it is, path), the inputs an
    output path is checked against (`sdrun.files.check_output_paths`)."""
    out = []
    for p in pairs:
        pair_id, a, b = (p.pair_id, p.a, p.b) if isinstance(p, PairSource) else p
        out += [(f"pair {pair_id}'s image {k}", Path(x)) for k, x in ((1, a), (2, b)) if x is not None]
    return out


def label_cell(labels: Iterable[str]) -> str:
    labels = sorted(set(labels))
    return " ".join(labels) if labels else "none"


def submission_row(pair_id: str, added: Iterable[str], removed: Iterable[str], changed: Iterable[str]) -> list[str]:
    return [pair_id, label_cell(added), label_cell(removed), label_cell(changed)]
