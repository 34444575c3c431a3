"""Tune the post-model parameters on cached model outputs, in numpy.

The sweep reproduces `Pipeline.finish` exactly (same functions, same float64
expressions on the same sub-arrays), but shares work between configurations:

* per pair, once: upsampled heatmaps, and for every ``heat_th`` of the grid the hot
  share of every candidate box (integral image); the change score and logit;
* per (heat_th, heat_lambda, det_thr): fused scores and the kept boxes;
* per distinct kept set and ``alpha``: one Hungarian assignment (its cost does not
  depend on ``iou_thr``);
* per ``iou_thr``: which assigned pairs count as matched / changed, the label sets,
  and the per-row F1 of each column against the truth (label sets as bit masks).

Then the "none" gates: for every configuration and column, the threshold on the
change score (or the change logit) below which the column says "none", chosen among
``off`` and quantiles of the training pairs' signal. Saying nothing scores 1 on a
row whose truth is empty and 0 otherwise, so a gate is a pure gain where the
pipeline's label sets are worse than silence. Columns are independent given the
other parameters, so each column's gate is optimised on its own, for every
configuration (jointly with the rest, cheaply: one vectorised pass).

The winner maximises the mean row-F1 on the training pairs; ties go to fewer gates,
then to the parameters closest to the current ones.
"""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence, cast

import numpy as np

from ..bundle.params import check_value, combination_problem
from ..bundle.vocab import normalize_label
from ..errors import SpotdiffError
from ..pipeline import COLUMNS, GATE_SIGNALS, PairOutputs, Pipeline
from ..stages import decide, heatmap
from ..stages.matching import assign, matched_and_changed, pair_matrices
from .score import Score, Sets, row_f1, score_sets

if TYPE_CHECKING:
    from .evaluate import Labelled

SWEPT = ("det_thr", "iou_thr", "alpha", "heat_lambda", "heat_th")
DEFAULT_GRID = {
    "det_thr": [0.15, 0.25, 0.35],
    "iou_thr": [0.4, 0.5, 0.6],
    "alpha": [0.3, 0.5, 0.7],
    "heat_lambda": [0.5, 0.8, 1.2],
    "heat_th": [0.4, 0.5, 0.6],
    # "none" gates: candidate thresholds are these quantiles of the training pairs'
    # signal (plus "off", and "every training pair says none")
    "gate_quantiles": [round(q, 2) for q in np.linspace(0.05, 0.95, 19)],
    "gate_signals": ["change_score", "change_logit"],
}
GATE_KEYS = tuple(f"none_gate_{c}" for c in COLUMNS)


class TuneError(SpotdiffError):
    pass


def load_grid(path: str | Path | None) -> dict:
    """The default grid, with the keys a JSON file sets replaced (`--grid FILE`)."""
    grid = json.loads(json.dumps(DEFAULT_GRID))
    if path is None:
        return grid
    path = Path(path)
    try:
        user = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TuneError(f"{path}: cannot read the grid as JSON ({e})") from None
    if not isinstance(user, dict):
        raise TuneError(f"{path}: expected a JSON object like {{\"det_thr\": [0.2, 0.3]}}")
    unknown = set(user) - set(grid)
    if unknown:
        raise TuneError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(grid)}")
    for k, v in user.items():
        if not isinstance(v, list) or (k != "gate_signals" and not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
            raise TuneError(f"{path}: {k} must be a list of {'names' if k == 'gate_signals' else 'numbers'}")
        if k in SWEPT and not v:
            raise TuneError(f"{path}: {k} needs at least one value")
        if k == "gate_signals" and set(v) - set(GATE_SIGNALS):
            raise TuneError(f"{path}: gate_signals can hold {', '.join(GATE_SIGNALS)}")
        if k == "gate_quantiles" and any(not 0 <= q <= 1 for q in v):
            raise TuneError(f"{path}: gate_quantiles must lie in [0, 1]")
        if k in SWEPT:
            v = [check_value(k, x, f"{path}: {k}[{i}]") for i, x in enumerate(v)]
        grid[k] = [float(x) for x in v] if k != "gate_signals" else list(v)
    return grid


# ---- per pair: what does not depend on the swept parameters ------------------------
@dataclass
class _Prep:
    labels: tuple[np.ndarray, np.ndarray]
    scores: tuple[np.ndarray, np.ndarray]
    boxes: tuple[np.ndarray, np.ndarray]
    emb: tuple[np.ndarray, np.ndarray]  # float64
    shares: dict[float, tuple[np.ndarray, np.ndarray]]
    signal: dict[str, float]
    bits: tuple[list[int], list[int]]  # bit of each candidate's (normalised) label


def _prepare(o: PairOutputs, heat_ths: Sequence[float], label_bits: Sequence[int]) -> _Prep:
    if not o.embeds_all:
        raise TuneError(f"pair {o.pair_id}: outputs lack embeddings of some candidates")
    heats = o.heatmaps()
    shares: dict[float, tuple[np.ndarray, np.ndarray]] = {}
    boxes_px = []
    for (h, w), d in zip(o.image_sizes, o.detections):
        boxes_px.append(decide.pixel_boxes(d.boxes, h, w))
    for th in heat_ths:
        shares[th] = cast("tuple[np.ndarray, np.ndarray]",
                          tuple(heatmap.hot_share(heat, px, th) for heat, px in zip(heats, boxes_px)))
    d0, d1 = o.detections
    return _Prep(labels=(d0.labels, d1.labels), scores=(d0.scores, d1.scores), boxes=(d0.boxes, d1.boxes),
                 emb=(np.asarray(o.embeds[0], np.float64), np.asarray(o.embeds[1], np.float64)), shares=shares,
                 signal={"change_score": heatmap.change_score(heats[0]), "change_logit": o.change_logit},
                 bits=([label_bits[int(lab)] for lab in d0.labels], [label_bits[int(lab)] for lab in d1.labels]))


def _matrices(p: _Prep, ia: np.ndarray, ib: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`match_objects`' matrices of the kept boxes, computed on the same sub-arrays (a slice
    of the full matrices would differ in the last bits: BLAS sums in another order for
    other shapes)."""
    return pair_matrices(p.boxes[0][ia], p.labels[0][ia], p.emb[0][ia],
                         p.boxes[1][ib], p.labels[1][ib], p.emb[1][ib])


def _f1_bits(pred: int, true: int) -> float:
    if not pred and not true:
        return 1.0
    if not pred or not true:
        return 0.0
    return 2.0 * (pred & true).bit_count() / (pred.bit_count() + true.bit_count())


def _or(bits: Sequence[int], idx) -> int:
    m = 0
    for i in idx:
        m |= bits[i]
    return m


# ---- the sweep ---------------------------------------------------------------------
@dataclass
class Sweep:
    configs: list[dict]  # the swept parameters of each configuration
    f1: np.ndarray  # [configs, 3 columns, pairs] row F1 without gates
    truth_empty: np.ndarray  # [3, pairs] 1.0 where the true set is empty
    signals: dict[str, np.ndarray]  # name -> [pairs]
    ids: list[str]
    seconds: float
    prep_seconds: float


def grid_configs(grid: Mapping) -> list[dict]:
    """Every combination of the grid's values that the pipeline accepts: a det_thr no box
    can reach with that heat_lambda is left out (it is "none" everywhere, scored apart),
    so a winner never makes the bundle refuse its own parameters."""
    configs = [dict(zip(SWEPT, v)) for v in itertools.product(*(grid[k] for k in SWEPT))]
    usable = [c for c in configs if combination_problem(c) is None]
    if not usable:
        raise TuneError(f"no combination of the grid is usable: {combination_problem(configs[0])}")
    return usable


def sweep(pipe: Pipeline, outputs: Mapping[str, PairOutputs], truth: Mapping[str, Sets],
          grid: Mapping, progress: bool = False) -> Sweep:
    """Per-row F1 of every column for every configuration of the grid on every pair."""
    ids = list(outputs)
    words: dict[str, int] = {}

    def bit(word: str) -> int:
        return 1 << words.setdefault(word, len(words))

    def mask(ws) -> int:
        m = 0
        for w in sorted(ws):
            m |= bit(w)
        return m

    label_bits = [bit(normalize_label(lab)) for lab in pipe.labels]
    true_bits = [[mask(truth[i][k]) for i in ids] for k in range(3)]
    t0 = time.perf_counter()
    preps = [_prepare(outputs[i], grid["heat_th"], label_bits) for i in ids]
    t1 = time.perf_counter()
    configs = grid_configs(grid)
    cindex = {tuple(c[k] for k in SWEPT): n for n, c in enumerate(configs)}
    f1 = np.zeros((len(configs), 3, len(ids)))
    from tqdm import tqdm

    for n, p in enumerate(tqdm(preps, unit="pair", desc="sweep", disable=not progress, dynamic_ncols=True)):
        tb = [true_bits[k][n] for k in range(3)]
        masks: dict[tuple[bytes, bytes], tuple[np.ndarray, np.ndarray, np.ndarray] | None] = {}
        # kept boxes -> their matrices (None: nothing to match)
        done: dict = {}  # (kept boxes, alpha, iou_thr) -> F1 of the three columns
        assigned: dict = {}  # (kept boxes, alpha) -> Hungarian result
        for th, lam, det in itertools.product(grid["heat_th"], grid["heat_lambda"], grid["det_thr"]):
            ia, ib = (decide.kept(heatmap.fuse_scores(p.scores[k], p.shares[th][k], lam), det)
                      for k in (0, 1))
            mk = (ia.tobytes(), ib.tobytes())
            if mk not in masks:
                masks[mk] = _matrices(p, ia, ib) if len(ia) and len(ib) else None
            for alpha in grid["alpha"]:
                for iou_thr in grid["iou_thr"]:
                    key = (mk, alpha, iou_thr)
                    if key not in done:
                        mats = masks[mk]
                        if mats is None:  # match_objects: nothing to match
                            matched, changed = [], []
                        else:
                            if (mk, alpha) not in assigned:
                                assigned[(mk, alpha)] = assign(*mats, alpha)
                            a = assigned[(mk, alpha)]
                            ok, ch = matched_and_changed(a, iou_thr)
                            matched = list(zip(a.rows[ok].tolist(), a.cols[ok].tolist()))
                            changed = list(zip(a.rows[ch].tolist(), a.cols[ch].tolist()))
                        added, removed, changed_a = decide.column_members(len(ia), len(ib), matched, changed)
                        sets = (_or(p.bits[1], ib[added]), _or(p.bits[0], ia[removed]),
                                _or(p.bits[0], ia[changed_a]))
                        done[key] = [_f1_bits(sets[k], tb[k]) for k in range(3)]
                    c = cindex.get((det, iou_thr, alpha, lam, th))
                    if c is not None:
                        f1[c, :, n] = done[key]
    t2 = time.perf_counter()
    truth_empty = np.array([[0.0 if truth[i][k] else 1.0 for i in ids] for k in range(3)])
    signals = {s: np.array([p.signal[s] for p in preps], np.float64) for s in GATE_SIGNALS}
    return Sweep(configs, f1, truth_empty, signals, ids, seconds=t2 - t1, prep_seconds=t1 - t0)


ALWAYS = float(np.finfo(np.float64).max)  # a gate no finite signal reaches: always "none"


def gate_candidates(values: np.ndarray, quantiles: Sequence[float]) -> np.ndarray:
    """-inf (off), thresholds at the quantiles of `values`, and ALWAYS (the column always
    says none; the largest finite float, so that params.json stays standard JSON)."""
    if not len(values):
        return np.array([-np.inf])
    qs = np.quantile(values, sorted(quantiles)) if len(quantiles) else np.zeros(0)
    cands = np.unique(qs[qs > values.min()])  # a gate at or below the minimum changes nothing
    return np.concatenate([[-np.inf], cands, [ALWAYS]])


@dataclass
class Choice:
    config: dict  # swept parameters
    signal: str
    gates: dict[str, float | None]  # column -> threshold (None: off)
    train: float  # mean row-F1 on the training pairs, gates applied
    train_nogate: float
    val: float | None
    train_cols: list[float] = field(default_factory=list)
    val_cols: list[float] | None = None
    extra: dict = field(default_factory=dict)  # the per-class heads' parameters, when tuned

    def params(self) -> dict:
        return {**self.config, "none_gate_signal": self.signal,
                **{f"none_gate_{c}": self.gates[c] for c in COLUMNS}, **self.extra}

    @property
    def n_gates(self) -> int:
        return sum(g is not None for g in self.gates.values())


def choose(sw: Sweep, train_ids: Sequence[str], val_ids: Sequence[str], grid: Mapping,
           current: Mapping) -> list[Choice]:
    """Every configuration with its best gates (on the training pairs), best first."""
    pos = {i: n for n, i in enumerate(sw.ids)}
    tr = np.array([pos[i] for i in train_ids], np.int64)
    va = np.array([pos[i] for i in val_ids], np.int64)
    f_tr, none_tr = sw.f1[:, :, tr], sw.truth_empty[:, tr]  # [C,3,n], [3,n]
    gates_on = bool(grid.get("gate_signals", GATE_SIGNALS))
    signals = list(grid.get("gate_signals", GATE_SIGNALS)) or [GATE_SIGNALS[0]]
    per_signal = {}  # signal -> (mean over columns of the best [C], gate index [C,3], candidates)
    for s in signals:
        cands = (gate_candidates(sw.signals[s][tr], grid.get("gate_quantiles", [])) if gates_on
                 else np.array([-np.inf]))
        below = decide.gated(cands[:, None], sw.signals[s][tr][None, :])  # [G, n]
        # [C, 3, G]: mean over training pairs of (gated ? truth empty : F1)
        scores = np.where(below[None, None], none_tr[None, :, None, :], f_tr[:, :, None, :]).mean(-1)
        gi = scores.argmax(-1)  # first max: "off" wins ties
        per_signal[s] = (np.take_along_axis(scores, gi[..., None], -1)[..., 0].mean(-1), gi, cands)
    choices = []
    for c, cfg in enumerate(sw.configs):
        s = max(signals, key=lambda s: (per_signal[s][0][c], -signals.index(s)))
        totals, gi, cands = per_signal[s]
        gates = {col: (None if gi[c, k] == 0 else float(cands[gi[c, k]])) for k, col in enumerate(COLUMNS)}
        train_cols = [float(np.where(decide.gated(cands[gi[c, k]], sw.signals[s][tr]), none_tr[k], f_tr[c, k]).mean())
                      for k in range(3)]
        val_cols = None
        if len(va):
            val_cols = [float(np.where(decide.gated(cands[gi[c, k]], sw.signals[s][va]), sw.truth_empty[k, va],
                                       sw.f1[c, k, va]).mean()) for k in range(3)]
        choices.append(Choice(cfg, s, gates, float(np.mean(train_cols)), float(f_tr[c].mean(-1).mean()),
                              None if val_cols is None else float(np.mean(val_cols)), train_cols, val_cols))

    def distance(ch: Choice) -> float:
        return sum(abs(ch.config[k] - float(current.get(k, ch.config[k]))) / max(abs(float(current.get(k, 1.0))), 1e-9)
                   for k in SWEPT)

    choices.sort(key=lambda ch: (-round(ch.train, 12), ch.n_gates, distance(ch)))
    return choices


# ---- per-class change heads ------------------------------------------------------------
HEAD_THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.05, 1.0, 0.05))
HEAD_MODES = ("off", "detectors", "heads")  # no heads; heads confirm detector labels; heads alone


@dataclass
class HeadChoice:
    """How the label sets use the per-class heads: `mode` and a probability threshold per column."""

    mode: str
    thresholds: dict[str, float | None]
    train: float
    val: float | None

    def params(self) -> dict:
        return {"class_mode": "heads" if self.mode == "heads" else "detectors",
                **{f"class_thr_{c}": (None if self.mode == "off" else self.thresholds[c]) for c in COLUMNS}}


def head_sweep(pipe: Pipeline, outputs: Mapping[str, PairOutputs], truth: Mapping[str, Sets],
               base: Mapping, train: Sequence[str], val: Sequence[str]) -> list[HeadChoice]:
    """For the detector parameters `base`: the metric with the heads off, with a per-column
    head threshold a detector label must also reach, and with the heads alone naming the
    labels; each mode's thresholds chosen per column on `train`. Best on train first."""

    off = {**base, "class_mode": "detectors", **{f"class_thr_{c}": None for c in COLUMNS}}
    index = {w: j for j, w in enumerate(pipe.labels)}
    p = {**pipe.effective_params, **off}
    rows = {}
    for i in [*train, *val]:
        o = outputs[i]
        r = pipe.finish(o, off)
        shut = [decide.gated(p.get(f"none_gate_{c}"), decide.gate_signal(p, r.change_score, r.change_logit))
                for c in COLUMNS]
        rows[i] = (r, cast(np.ndarray, o.class_probs), shut)  # the caller checked: every pair has them

    def column_f1(ids, mode, k, t) -> float:
        if not ids:
            return 0.0
        total = 0.0
        for i in ids:
            r, probs, shut = rows[i]
            words = getattr(r, COLUMNS[k])
            if mode == "detectors" and t is not None:
                words = [w for w in words if probs[k][index[w]] >= t]
            elif mode == "heads":
                words = [] if shut[k] else [pipe.labels[j] for j in np.flatnonzero(probs[k] >= t)]
            total += row_f1(frozenset(normalize_label(w) for w in words), truth[i][k])
        return total / len(ids)

    out = []
    for mode in HEAD_MODES:
        candidates = [None] if mode == "off" else ([None, *HEAD_THRESHOLDS] if mode == "detectors"
                                                   else list(HEAD_THRESHOLDS))
        thresholds, tr_cols = {}, []
        va_cols: list[float] = []
        for k, c in enumerate(COLUMNS):
            scored = [(column_f1(train, mode, k, t), t) for t in candidates]
            best_f1, best_t = max(scored, key=lambda st: (round(st[0], 12), -(st[1] or 0.0)))
            thresholds[c] = best_t
            tr_cols.append(best_f1)
            if val:
                va_cols.append(column_f1(val, mode, k, best_t))
        out.append(HeadChoice(mode, thresholds, sum(tr_cols) / 3,
                              sum(va_cols) / 3 if val else None))
    return sorted(out, key=lambda h: (-round(h.train, 12), HEAD_MODES.index(h.mode)))


# ---- exact evaluation through Pipeline.finish ---------------------------------------
def finish_score(pipe: Pipeline, outputs: Mapping[str, PairOutputs], truth: Mapping[str, Sets],
                 ids: Sequence[str], params: Mapping | None = None) -> Score:
    """The metric of `Pipeline.finish` with these parameters on these pairs (both sides
    normalised as in the sweep)."""
    pred = []
    for i in ids:
        r = pipe.finish(outputs[i], dict(params or {}))
        pred.append(cast(Sets, tuple(frozenset(normalize_label(w) for w in getattr(r, c)) for c in COLUMNS)))
    return score_sets(pred, [truth[i] for i in ids])


def split_ids(ids: Sequence[str], val_frac: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, validation) ids: a seeded permutation of the sorted ids, the first
    round(val_frac * n) for validation (at least 1 when val_frac > 0 and n >= 2).
    Depends only on the set of ids, the fraction and the seed. Both lists keep the
    input order."""
    if not 0 <= val_frac < 1:
        raise TuneError(f"--val-frac must be in [0, 1), not {val_frac}")
    uniq = sorted(set(ids))
    n_val = int(round(val_frac * len(uniq)))
    if val_frac > 0 and len(uniq) >= 2:
        n_val = min(max(n_val, 1), len(uniq) - 1)
    perm = np.random.default_rng(seed).permutation(len(uniq))
    val = {uniq[k] for k in perm[:n_val]}
    return [i for i in ids if i not in val], [i for i in ids if i in val]


def format_gates(ch: Choice) -> str:
    if not ch.n_gates:
        return "off"
    short = {"added": "add", "removed": "rem", "changed": "chg"}
    return f"{ch.signal.replace('change_', '')}: " + " ".join(
        f"{short[c]} off" if g is None else f"{short[c]} always" if g >= ALWAYS else f"{short[c]}<{g:.3g}"
        for c, g in ch.gates.items())


def table(choices: Sequence[Choice], n: int = 10) -> str:
    head = (f"{'#':>3} {'det_thr':>7} {'iou_thr':>7} {'alpha':>5} {'lambda':>6} {'heat_th':>7}  "
            f"{'train':>6} {'no-gate':>7} {'val':>6}  gates")
    lines = [head]
    for r, ch in enumerate(choices[:n], 1):
        c = ch.config
        val = f"{ch.val:6.4f}" if ch.val is not None else f"{'-':>6}"
        lines.append(f"{r:3d} {c['det_thr']:7.3g} {c['iou_thr']:7.3g} {c['alpha']:5.3g} "
                     f"{c['heat_lambda']:6.3g} {c['heat_th']:7.3g}  {ch.train:6.4f} "
                     f"{ch.train_nogate:7.4f} {val}  {format_gates(ch)}")
    return "\n".join(lines)



# ---- the whole command ---------------------------------------------------------------
@dataclass
class TuneSummary:
    n_train: int
    n_val: int
    n_configs: int
    choices: list[Choice]
    best: Choice
    current: dict  # the bundle's parameters before tuning
    current_train: float
    current_val: float | None
    none_train: float
    none_val: float | None
    best_train_exact: float  # the winner's training score through Pipeline.finish
    best_val_exact: float | None
    sweep_seconds: float
    prep_seconds: float
    fill_seconds: float  # models run now (0 when every pair was cached)
    computed: int  # pairs the models ran on now
    model_seconds: float  # model time of all these pairs, as recorded in the cache
    clip_seconds: float
    candidates: int  # candidate boxes (both images, all pairs): what the cache embeds
    kept: int  # boxes the current parameters keep: what `sdrun run` embeds
    errors: dict[str, str]
    heads: list[HeadChoice] | None = None  # per-class heads: each mode, best on train first
    verdict: str = ""
    written: Path | None = None

    @property
    def improves_train(self) -> bool:
        return self.best_train_exact > self.current_train + 1e-12

    @property
    def improves_val(self) -> bool | None:
        if self.best_val_exact is None or self.current_val is None:
            return None
        return self.best_val_exact > self.current_val + 1e-12


def run_tune(pipe: Pipeline, labelled: Labelled, val_frac: float = 0.2, seed: int = 0, grid: Mapping | None = None,
             cache_dir: str | Path | None = None, batch_pairs: int = 1, progress: bool = True,
             warn: Callable[[str], None] | None = None) -> TuneSummary:
    """Fill the cache, sweep, choose; nothing is written (see `write_choice`)."""
    from .cache import OutputCache

    grid = dict(grid or DEFAULT_GRID)
    cache = OutputCache(pipe, cache_dir)
    fill = cache.fill(labelled.pairs, batch_pairs=batch_pairs, progress=progress, warn=warn)
    outputs = fill.outputs
    if len(outputs) < 2:
        raise TuneError(f"{len(outputs)} usable pair(s): tuning needs at least 2")
    # the split of every pair with images (as `sdrun eval --val-frac` makes it), less failures
    train, val = split_ids([str(p[0]) for p in labelled.pairs], val_frac, seed)
    train, val = [i for i in train if i in outputs], [i for i in val if i in outputs]
    if not train:
        raise TuneError("no training pair left (every one failed); lower --val-frac")
    sw = sweep(pipe, outputs, labelled.truth, grid, progress=progress)
    current = {**{k: pipe.params.get(k) for k in SWEPT},
               **{k: pipe.effective_params.get(k) for k in ("none_gate_signal", *GATE_KEYS)}}
    choices = choose(sw, train, val, grid, current)
    best = choices[0]
    heads = None
    if all(o.class_probs is not None for o in outputs.values()):
        heads = head_sweep(pipe, outputs, labelled.truth, best.params(), train, val)
        best.extra = heads[0].params()
    cur_tr = finish_score(pipe, outputs, labelled.truth, train).mean
    cur_va = finish_score(pipe, outputs, labelled.truth, val).mean if val else None
    best_tr = finish_score(pipe, outputs, labelled.truth, train, best.params()).mean
    best_va = finish_score(pipe, outputs, labelled.truth, val, best.params()).mean if val else None
    none: list[Sets] = [(frozenset(), frozenset(), frozenset())]
    none_tr = score_sets(none * len(train), [labelled.truth[i] for i in train]).mean
    none_va = score_sets(none * len(val), [labelled.truth[i] for i in val]).mean if val else None
    kept = 0
    for o in outputs.values():
        r = pipe.finish(o)
        kept += len(r.objects)
    cands = sum(len(d.scores) for o in outputs.values() for d in o.detections)
    return TuneSummary(
        n_train=len(train), n_val=len(val), n_configs=len(sw.configs), choices=choices, best=best,
        current=current, current_train=cur_tr, current_val=cur_va, none_train=none_tr, none_val=none_va,
        best_train_exact=best_tr, best_val_exact=best_va, sweep_seconds=sw.seconds,
        prep_seconds=sw.prep_seconds, fill_seconds=fill.fill_seconds, computed=fill.computed,
        model_seconds=fill.model_seconds, clip_seconds=fill.clip_seconds, candidates=cands, kept=kept,
        errors=fill.errors, heads=heads)


def write_choice(bundle_root: str | Path, choice: Choice) -> Path:
    """Merge the winner into the bundle's parameters file (sha256 in the manifest updated;
    the old file kept as `<params file>.bak`)."""
    from ..bundle.bundle import Bundle, write_params

    b = Bundle.load(bundle_root)
    return write_params(bundle_root, {**b.params, **choice.params()})
