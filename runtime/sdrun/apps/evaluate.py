"""`sdrun eval`: run a bundle on labelled pairs and write a report folder.

    OUT/report.md            the metric per column, per label, most missed / most wrongly
                             predicted labels, the worst pairs, the plot
    OUT/predictions.csv      the submission for these pairs (`sdrun score` it against the CSV)
    OUT/pairs.csv            per pair: F1 of each column, change score and logit, truth, prediction
    OUT/score_vs_change.png  pair score against the change score and the change logit
    OUT/worst/{id}.png       the worst pairs: both images, heatmap, kept boxes by status, truth

The truth is normalised with the synonym map (`sdrun.bundle.vocab.normalize_label`: man,
guy -> person, the notebook's map) unless asked not to, and so are the predictions (vocabulary
labels are normalised words already), exactly as `sdrun score --normalize` does.
"""
from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence, cast

import cv2
import numpy as np

from ..bundle.vocab import normalize_label
from ..csvfile import COLUMNS, SUBMISSION_COLUMNS
from ..files import atomic_write, id_file_stem
from ..pipeline import PairResult
from .dataset import DatasetError, list_pairs, submission_row
from .score import COLUMNS as CSV_COLUMNS
from .score import Score, Sets, label_counts, list_ids, read_label_csv, score_sets

log = logging.getLogger(__name__)

REPORT_FILES = ("report.md", "predictions.csv", "pairs.csv", "score_vs_change.png")

SHORT = dict(zip(CSV_COLUMNS, COLUMNS))
NONE_SETS: Sets = (frozenset(), frozenset(), frozenset())


@dataclass
class Labelled:
    pairs: list[tuple[str, Path, Path]]  # (id, image 1, image 2) of every pair with both images
    truth: dict[str, Sets]  # id -> true word sets (of every CSV row)
    skipped: dict[str, str] = field(default_factory=dict)  # id -> why it cannot run


def load_labelled(data: str | Path, csv_path: str | Path, normalize: bool = True,
                  warn: Callable[[str], None] | None = None) -> Labelled:
    """The CSV's labelled rows and the pairs of DATA that have both images. Rows without
    images are skipped with one warning that names them; none at all is an error."""
    warn = warn or log.warning
    truth = read_label_csv(csv_path, normalize=normalize, role="labels")
    if not truth:
        raise DatasetError(f"{csv_path}: no labelled rows")
    sources = list_pairs(data, csv_path)
    pairs: list[tuple[str, Path, Path]] = []
    skipped: dict[str, str] = {}
    for p in sources:
        if p.problem:
            skipped[p.pair_id] = p.problem
        else:  # no problem: both images were found
            pairs.append((p.pair_id, cast(Path, p.a), cast(Path, p.b)))
    if skipped:
        first = next(iter(skipped.values()))
        warn(f"warning: {len(skipped)} of {len(truth)} labelled pair(s) cannot run and are left out: "
             f"{list_ids(skipped, 10)} (the first: {first})")
    if not pairs:
        raise DatasetError(f"{data}: none of the {len(truth)} pairs of {csv_path} has both images "
                           "(expected data/{id}_1.png and data/{id}_2.png)")
    return Labelled(pairs, truth, skipped)


def predicted_sets(r: PairResult) -> Sets:
    return cast(Sets, tuple(frozenset(w for w in (normalize_label(x) for x in getattr(r, c)) if w)
                            for c in COLUMNS))


# ---- the report ---------------------------------------------------------------------
@dataclass
class Evaluation:
    ids: list[str]
    results: dict[str, PairResult]
    truth: dict[str, Sets]
    score: Score
    none_score: Score  # everything "none" on the same pairs, for comparison

    def pair_score(self, n: int) -> float:
        return float(np.mean(self.score.per_row[n]))


def evaluate(results: Mapping[str, PairResult], truth: Mapping[str, Sets]) -> Evaluation:
    ids = [i for i in results if results[i].ok]
    if not ids:
        raise DatasetError("no pair could be evaluated (every pair failed)")
    pred = [predicted_sets(results[i]) for i in ids]
    true = [truth[i] for i in ids]
    return Evaluation(ids, dict(results), dict(truth), score_sets(pred, true),
                      score_sets([NONE_SETS] * len(ids), true))


def _cell(words) -> str:
    return " ".join(sorted(words)) or "none"


def _label_table(counts: dict[str, dict[str, int]], limit: int = 20) -> list[str]:
    rows = sorted(counts.items(), key=lambda kv: (-(kv[1]["tp"] + kv[1]["fn"]), -kv[1]["fp"], kv[0]))
    out = ["| label | true | predicted | TP | FP | FN | precision | recall | F1 |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, c in rows[:limit]:
        tp, fp, fn = c["tp"], c["fp"], c["fn"]
        prec = tp / (tp + fp) if tp + fp else float("nan")
        rec = tp / (tp + fn) if tp + fn else float("nan")
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
        out.append(f"| {label} | {tp + fn} | {tp + fp} | {tp} | {fp} | {fn} | {prec:.3f} | {rec:.3f} | {f1:.3f} |")
    if len(rows) > limit:
        out.append(f"\n({len(rows) - limit} more labels not shown)")
    return out


def _top(counts: dict[str, dict[str, int]], key: str, n: int = 5) -> str:
    items = sorted(((c[key], label) for label, c in counts.items() if c[key]), key=lambda x: (-x[0], x[1]))
    return ", ".join(f"{label} ({k})" for k, label in items[:n]) or "none"


def scatter_png(xs: Sequence[float] | np.ndarray, ys: Sequence[float] | np.ndarray,
                colours: Sequence[tuple[int, int, int]], xlabel: str, ylabel: str, title: str,
                size: tuple[int, int] = (420, 320)) -> np.ndarray:
    """A simple scatter plot as an RGB image (cv2 only): axes, 5 ticks per axis, points."""
    w, h = size
    left, right, top, bottom = 52, 14, 26, 40
    img = np.full((h, w, 3), 255, np.uint8)
    xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    finite = np.isfinite(xs) & np.isfinite(ys)
    x0, x1 = (float(xs[finite].min()), float(xs[finite].max())) if finite.any() else (0.0, 1.0)
    if x1 - x0 < 1e-9:
        x0, x1 = x0 - 0.5, x1 + 0.5
    pad = 0.04 * (x1 - x0)
    x0, x1 = x0 - pad, x1 + pad
    y0, y1 = -0.04, 1.04

    def px(x, y):
        return (int(round(left + (x - x0) / (x1 - x0) * (w - left - right))),
                int(round(h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))))

    black, grey, font = (0, 0, 0), (225, 225, 225), cv2.FONT_HERSHEY_SIMPLEX
    span = x1 - x0 - 2 * pad
    digits = int(min(4, max(0, np.ceil(-np.log10(span / 4)) + 1)))
    for t in np.linspace(0, 1, 5):
        gx, gy = x0 + pad + t * span, t
        cv2.line(img, px(gx, y0), px(gx, y1), grey, 1)
        cv2.line(img, px(x0, gy), px(x1, gy), grey, 1)
        label = "0" if abs(gx) < 0.5 * 10.0 ** -digits else f"{gx:.{digits}f}"
        cv2.putText(img, label, (px(gx, y0)[0] - 12, h - bottom + 14), font, 0.33, black, 1, cv2.LINE_AA)
        cv2.putText(img, f"{gy:.2f}", (4, px(x0, gy)[1] + 4), font, 0.33, black, 1, cv2.LINE_AA)
    cv2.rectangle(img, px(x0, y1), px(x1, y0), black, 1)
    for x, y, c in zip(xs[finite], ys[finite], np.asarray(colours)[finite]):
        cv2.circle(img, px(x, y), 3, tuple(int(v) for v in c), -1, cv2.LINE_AA)
    cv2.putText(img, xlabel, (left + 4, h - 8), font, 0.4, black, 1, cv2.LINE_AA)
    cv2.putText(img, ylabel, (4, 16), font, 0.4, black, 1, cv2.LINE_AA)
    cv2.putText(img, title, (left + 90, 16), font, 0.4, black, 1, cv2.LINE_AA)
    return img


def _caption(img: np.ndarray, text: str) -> np.ndarray:
    bar = np.full((22, img.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, text[:200], (4, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([img, bar], axis=0)


def worst_picture_path(out: str | Path, pair_id: str) -> Path:
    """Where the report draws one of the worst pairs."""
    return Path(out) / "worst" / f"{id_file_stem(pair_id)}.png"


def write_report(out: str | Path, ev: Evaluation, images: Mapping[str, tuple[Path, Path]],
                 header: Sequence[str] = (), worst: int = 12) -> Path:
    """Write the report folder; returns the path of report.md."""
    from ..stages.images import load_image
    from .viz import render_pair, write_picture

    out = Path(out)
    (out / "worst").mkdir(parents=True, exist_ok=True)
    s, ids = ev.score, ev.ids
    pair_scores = [ev.pair_score(n) for n in range(len(ids))]

    rows = io.StringIO()
    w = csv.writer(rows, lineterminator="\n")
    w.writerow(SUBMISSION_COLUMNS)
    for i in ids:
        r = ev.results[i]
        w.writerow(submission_row(i, r.added, r.removed, r.changed))
    atomic_write(out / "predictions.csv", rows.getvalue())

    rows = io.StringIO()
    w = csv.writer(rows, lineterminator="\n")
    w.writerow(("img_id", "score", "f1_added", "f1_removed", "f1_changed", "change_score", "change_logit",
                "true_added", "true_removed", "true_changed", "pred_added", "pred_removed", "pred_changed"))
    for n, i in enumerate(ids):
        r, t, p = ev.results[i], ev.truth[i], predicted_sets(ev.results[i])
        w.writerow((i, f"{pair_scores[n]:.4f}", *(f"{v:.4f}" for v in s.per_row[n]), f"{r.change_score:.6f}",
                    f"{r.change_logit:.6f}", *(_cell(x) for x in t), *(_cell(x) for x in p)))
    atomic_write(out / "pairs.csv", rows.getvalue())

    # the plot: pair score against the change score and the change logit
    colours = [(60, 160, 60) if not any(ev.truth[i]) else (40, 90, 220) for i in ids]
    panels = [scatter_png([ev.results[i].change_score for i in ids], pair_scores, colours, "change score",
                          "pair score", "green: truth all none"),
              scatter_png([ev.results[i].change_logit for i in ids], pair_scores, colours, "change logit",
                          "pair score", "blue: something changed")]
    write_picture(out / "score_vs_change.png", np.concatenate(panels, axis=1))

    md = ["# sdrun eval", "", *header, "",
          "## Metric", "",
          "Row-F1 is the competition's metric (per-row F1 of the label sets, both empty = 1, "
          "averaged over rows, then over the columns); micro-F1 pools every (row, label) per "
          "column (our reading of the seed's set-F1). The all-\"none\" column is what "
          "predicting nothing scores on the same pairs.", "",
          "| column | row-F1 | micro-F1 | all \"none\" |", "|---|---:|---:|---:|"]
    for c in CSV_COLUMNS:
        md.append(f"| {SHORT[c]} | {s.row_f1[c]:.4f} | {s.micro_f1[c]:.4f} | {ev.none_score.row_f1[c]:.4f} |")
    md.append(f"| **mean** | **{s.mean:.4f}** | {s.micro_mean:.4f} | {ev.none_score.mean:.4f} |")
    md += ["", f"{len(ids)} pairs.", ""]

    counts = label_counts([predicted_sets(ev.results[i]) for i in ids], [ev.truth[i] for i in ids])
    md += ["## Labels per column", ""]
    for c in CSV_COLUMNS:
        md += [f"### {SHORT[c]}", "",
               f"- most missed (false negatives): {_top(counts[c], 'fn')}",
               f"- most wrongly predicted (false positives): {_top(counts[c], 'fp')}", ""]
        md += _label_table(counts[c]) if counts[c] else ["(no labels, true or predicted)"]
        md.append("")

    def wrong(n: int) -> int:  # labels missed or wrongly predicted, over the three columns
        p, t = predicted_sets(ev.results[ids[n]]), ev.truth[ids[n]]
        return sum(len(p[k] ^ t[k]) for k in range(3))

    order = sorted(range(len(ids)), key=lambda n: (pair_scores[n], -wrong(n), ids[n]))[:worst]
    md += ["## Worst pairs", "",
           "Lowest pair score first (mean of the three columns' F1), then most wrong labels. "
           "Boxes: green added, red removed, yellow changed, grey matched; the heatmap is blended in.", "",
           "| pair | score | added (true / predicted) | removed | changed | change score |",
           "|---|---:|---|---|---|---:|"]
    for n in order:
        i = ids[n]
        r, t, p = ev.results[i], ev.truth[i], predicted_sets(ev.results[i])
        md.append(f"| {i} | {pair_scores[n]:.3f} | " + " | ".join(f"{_cell(t[k])} / {_cell(p[k])}" for k in range(3))
                  + f" | {r.change_score:.3f} |")
    md.append("")
    for n in order:
        i = ids[n]
        a, b = images[i]
        pic = render_pair(load_image(a), load_image(b), ev.results[i])
        t = ev.truth[i]
        pic = _caption(pic, "truth: " + " | ".join(f"{SHORT[c]}: {_cell(t[k])}" for k, c in enumerate(CSV_COLUMNS)))
        name = worst_picture_path(out, i).relative_to(out).as_posix()
        write_picture(out / name, pic)
        md += [f"![{i}]({name})", ""]
    md += ["## Score against change", "", "![score vs change](score_vs_change.png)", "",
           "Each point is a pair: its score (mean of the three columns' F1) against the change "
           "score (mean of the top 5% of the Siamese heatmap) and the change logit. If the "
           "all-\"none\" pairs (green) sit at low change values, a \"none\" gate (`sdrun tune`) helps.", ""]
    path = out / "report.md"
    atomic_write(path, "\n".join(md))
    return path
