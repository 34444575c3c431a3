"""The competition's metric, and reading label CSVs strictly.

**Row F1** (the competition's metric): for each row and column, the F1 of the
predicted and true *word sets* (a cell split on spaces; ``none`` or empty is the
empty set): 1 when both are empty, 0 when exactly one is, else
``2|P & T| / (|P| + |T|)``. Rows are averaged per column, then the three columns
are averaged.

**Notebook set-F1** (the notebook's `set_f1`, which it tunes on): per row and column,
precision ``TP / (TP + FP + 1e-9)`` and recall ``TP / (TP + FN + 1e-9)``, their harmonic
mean, 0 when both are 0, so a row where both sides are empty scores 0, not 1; averaged
over rows and columns. spotdiff tunes on the row F1 instead (docs/departures.md).

**Micro set-F1**: per column, every (row, word) pair pooled over all rows,
``2 TP / (2 TP + FP + FN)`` (1 when there is nothing to find and nothing predicted);
the three columns averaged. It ignores rows where both sides say "none".

``normalize=True`` maps every word on both sides through the notebook's synonym map
(`sdrun.bundle.vocab.normalize_label`) first (``man guy`` -> ``person``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence, cast

from ..bundle.vocab import normalize_label, parse_label_cell
from ..csvfile import LABEL_COLUMNS, CsvError, read_csv
from ..errors import SpotdiffError

COLUMNS = LABEL_COLUMNS  # added_objs, removed_objs, changed_objs
MAX_LISTED = 20

Sets = tuple[frozenset, frozenset, frozenset]  # one row: added, removed, changed


class ScoreError(SpotdiffError):
    """A label CSV that cannot be scored; the message names the file and the rows."""


def list_ids(ids: Iterable[str], limit: int = MAX_LISTED) -> str:
    ids = list(ids)
    shown = ", ".join(ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def cell_set(cell: str | None, normalize: bool = False) -> frozenset:
    words = parse_label_cell(cell or "")
    if normalize:
        words = [normalize_label(w) for w in words]
    return frozenset(w for w in words if w)


def read_label_csv(path: str | Path, normalize: bool = False, role: str = "labels") -> dict[str, Sets]:
    """img_id -> (added, removed, changed) word sets, in file order. Raises ScoreError for
    a missing file or column, an empty id, or repeated ids (all of them listed)."""
    path = Path(path)
    try:
        fields, reader = read_csv(path, role)
        missing = [c for c in ("img_id", *COLUMNS) if c not in fields]
        if missing:
            raise ScoreError(f"{path} ({role}): missing column(s) {', '.join(missing)}; "
                             f"expected img_id,{','.join(COLUMNS)} (found: {','.join(fields) or 'nothing'})")
        rows: dict[str, Sets] = {}
        dupes: dict[str, int] = {}
        blank, surplus = [], []
        for line_no, row in reader:
            if None in row:
                surplus.append(str(line_no))
            pid = (row.get("img_id") or "").strip()
            if not pid:
                blank.append(str(line_no))
                continue
            if pid in rows:
                dupes[pid] = dupes.get(pid, 1) + 1
                continue
            rows[pid] = cast(Sets, tuple(cell_set(row.get(c), normalize) for c in COLUMNS))
    except CsvError as e:
        raise ScoreError(str(e)) from None
    problems = []
    if surplus:
        problems.append(f"more cells than columns on line(s) {list_ids(surplus)} (a list of "
                        "labels with commas must be quoted: \"box,cone\")")
    if blank:
        problems.append(f"rows without an img_id on line(s) {list_ids(blank)}")
    if dupes:
        problems.append(f"{len(dupes)} duplicate id(s): " +
                        list_ids(f"{k} (x{n})" for k, n in dupes.items()))
    if problems:
        raise ScoreError(f"{path} ({role}): " + "; ".join(problems))
    return rows


def row_f1(pred: frozenset | set, true: frozenset | set) -> float:
    """F1 of two word sets: 1 if both are empty, 0 if exactly one is."""
    if not pred and not true:
        return 1.0
    if not pred or not true:
        return 0.0
    return 2.0 * len(pred & true) / (len(pred) + len(true))


def notebook_set_f1(true: frozenset | set, pred: frozenset | set) -> float:
    """The notebook's `set_f1(true_set, pred_set)`: 0 when both sets are empty."""
    tp, fp, fn = len(true & pred), len(pred - true), len(true - pred)
    precision, recall = tp / (tp + fp + 1e-9), tp / (tp + fn + 1e-9)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


@dataclass
class Score:
    """The metric over a set of rows: per column and averaged."""

    n_rows: int
    row_f1: dict[str, float]  # column -> mean row F1
    micro_f1: dict[str, float]  # column -> micro set-F1
    per_row: list[tuple[float, float, float]] = field(default_factory=list, repr=False)
    notebook_f1: dict[str, float] = field(default_factory=dict)  # column -> mean notebook set_f1

    @property
    def mean(self) -> float:
        return sum(self.row_f1.values()) / len(self.row_f1)

    @property
    def micro_mean(self) -> float:
        return sum(self.micro_f1.values()) / len(self.micro_f1)

    @property
    def notebook_mean(self) -> float:
        return sum(self.notebook_f1.values()) / len(self.notebook_f1)

    def table(self) -> str:
        lines = [f"{'column':14} {'row-F1':>8} {'notebook set_f1':>16} {'micro-F1':>9}"]
        for c in COLUMNS:
            lines.append(f"{c:14} {self.row_f1[c]:8.4f} {self.notebook_f1[c]:16.4f} "
                         f"{self.micro_f1[c]:9.4f}")
        lines.append(f"{'mean':14} {self.mean:8.4f} {self.notebook_mean:16.4f} {self.micro_mean:9.4f}")
        lines.append(f"{self.n_rows} rows. row-F1: the competition's metric (per-row F1 of the "
                     "label sets, both empty = 1). notebook set_f1: the notebook's per-row F1 "
                     "(both empty = 0). micro-F1: every (row, label) pooled per column.")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"rows": self.n_rows, "row_f1": self.row_f1, "row_f1_mean": self.mean,
                "notebook_set_f1": self.notebook_f1, "notebook_set_f1_mean": self.notebook_mean,
                "micro_f1": self.micro_f1, "micro_f1_mean": self.micro_mean}


def score_sets(pred: Sequence[Sets], true: Sequence[Sets]) -> Score:
    """The metric over aligned rows of (added, removed, changed) sets."""
    if len(pred) != len(true):
        raise ValueError(f"{len(pred)} predicted rows but {len(true)} true rows")
    if not true:
        raise ValueError("no rows to score")
    per_row = [cast("tuple[float, float, float]", tuple(row_f1(p[k], t[k]) for k in range(3)))
               for p, t in zip(pred, true)]
    row = {c: sum(r[k] for r in per_row) / len(per_row) for k, c in enumerate(COLUMNS)}
    micro = {}
    for k, c in enumerate(COLUMNS):
        tp = sum(len(p[k] & t[k]) for p, t in zip(pred, true))
        fp = sum(len(p[k] - t[k]) for p, t in zip(pred, true))
        fn = sum(len(t[k] - p[k]) for p, t in zip(pred, true))
        micro[c] = 1.0 if tp + fp + fn == 0 else 2.0 * tp / (2 * tp + fp + fn)
    notebook = {c: sum(notebook_set_f1(t[k], p[k]) for p, t in zip(pred, true)) / len(true)
                for k, c in enumerate(COLUMNS)}
    return Score(len(per_row), row, micro, per_row, notebook)


def align(pred: Mapping[str, Sets], true: Mapping[str, Sets], pred_name: str = "submission",
          true_name: str = "truth") -> list[str]:
    """The ids to score (the truth's, in its order); ScoreError listing every id the
    submission lacks and every id the truth does not know."""
    missing = [k for k in true if k not in pred]
    unknown = [k for k in pred if k not in true]
    problems = []
    if missing:
        problems.append(f"{len(missing)} id(s) of {true_name} missing from {pred_name}: {list_ids(missing)}")
    if unknown:
        problems.append(f"{len(unknown)} id(s) of {pred_name} not in {true_name}: {list_ids(unknown)}")
    if problems:
        raise ScoreError("; ".join(problems))
    return list(true)


def score_files(submission: str | Path, truth: str | Path, normalize: bool = False) -> Score:
    pred = read_label_csv(submission, normalize, role="submission")
    true = read_label_csv(truth, normalize, role="truth")
    ids = align(pred, true, f"the submission {submission}", f"the truth {truth}")
    return score_sets([pred[i] for i in ids], [true[i] for i in ids])


# ---- per-label statistics (for reports) -------------------------------------------
def label_counts(pred: Sequence[Sets], true: Sequence[Sets]) -> dict[str, dict[str, dict[str, int]]]:
    """column -> label -> {"tp", "fp", "fn"} over all rows."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for k, c in enumerate(COLUMNS):
        per: dict[str, dict[str, int]] = {}
        for p, t in zip(pred, true):
            for w in p[k] | t[k]:
                e = per.setdefault(w, {"tp": 0, "fp": 0, "fn": 0})
                e["tp" if (w in p[k] and w in t[k]) else "fp" if w in p[k] else "fn"] += 1
        out[c] = per
    return out
