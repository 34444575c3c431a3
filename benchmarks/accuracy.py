"""Accuracy against PyTorch: does each contender give the seed-style reference's answers?

    python benchmarks/accuracy.py --bundle engines/full --pairs 3
    python benchmarks/accuracy.py --bundle engines/full --from-latency benchmarks/results/latency_full.json
    python benchmarks/accuracy.py --bundle engines/tiny --pairs 2 --out-dir /tmp/bench

On the same pairs, every contender (the optimised PyTorch pipeline, sdrun fp32, sdrun
int8) is compared with the PyTorch reference (`sdexport.reference`, fp32): the share of
pairs whose three label sets (added, removed, changed) are identical, per column too; the
kept objects paired per image (equal labels, Hungarian on box and score distance,
IoU >= 0.5), the IoU of paired boxes, how many objects have no partner, and the
differences of detector and fused scores and of the change logit. `--from-latency`
reuses the answers a latency run recorded (the same pairs, no second run). `--against
sdrun-fp32` compares with sdrun's own fp32 answers instead (e.g. OpenVINO's f32 and bf16,
issue 25: the PyTorch reference is then not run). Writes
accuracy_<bundle>.json/.md/.png and prints the table last.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import common  # noqa: F401  (first: thread settings before torch)
from common import (
    CONTENDERS,
    DESCRIBE,
    add_common_args,
    bundle_label,
    int8_bundle_for,
    load_contenders,
    machine,
    make_pairs,
    md_table,
    parse_params,
    publish,
    pyplot,
    save_figure,
    save_partial,
)

import numpy as np
from scipy.optimize import linear_sum_assignment

from sdrun.csvfile import COLUMNS

MATCH_IOU = 0.5


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a[:, None], b[None]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    def area(x):
        return (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def compare(ref: dict, run: dict) -> dict:
    """One pair: `run`'s answer against the reference's."""
    cols = {c: ref[c] == run[c] for c in COLUMNS}
    ious, dscore, dfused, dbox = [], [], [], []
    unmatched_ref = unmatched_run = 0
    for image in (1, 2):
        ro = [o for o in ref["objects"] if o["image"] == image]
        qo = [o for o in run["objects"] if o["image"] == image]
        if not ro or not qo:
            unmatched_ref += len(ro)
            unmatched_run += len(qo)
            continue
        rb = np.array([o["box"] for o in ro], np.float64)
        qb = np.array([o["box"] for o in qo], np.float64)
        same = np.array([o["label"] for o in ro])[:, None] == np.array([o["label"] for o in qo])[None]
        iou = np.where(same, _iou(rb, qb), 0.0)
        # pair by the largest coordinate difference (px) plus the score difference, so that
        # near-duplicate boxes of one label pair with their own counterpart; then keep the
        # pairs of equal label with IoU >= MATCH_IOU
        rs = np.array([o["score"] for o in ro])[:, None]
        qs = np.array([o["score"] for o in qo])[None]
        cost = np.abs(rb[:, None] - qb[None]).max(-1) + 100.0 * np.abs(rs - qs) + 1e6 * ~same
        i, j = linear_sum_assignment(cost)
        ok = iou[i, j] >= MATCH_IOU
        i, j = i[ok], j[ok]
        unmatched_ref += len(ro) - len(i)
        unmatched_run += len(qo) - len(j)
        ious += iou[i, j].tolist()
        dscore += [abs(ro[a]["score"] - qo[b]["score"]) for a, b in zip(i, j)]
        dfused += [abs(ro[a]["fused"] - qo[b]["fused"]) for a, b in zip(i, j)]
        dbox += np.abs(rb[i] - qb[j]).max(-1).tolist() if len(i) else []
    return {"identical": all(cols.values()), "columns": cols,
            "objects_ref": len(ref["objects"]), "objects_run": len(run["objects"]),
            "matched": len(ious), "unmatched_ref": unmatched_ref, "unmatched_run": unmatched_run,
            "iou": ious, "score_diff": dscore, "fused_diff": dfused, "box_err_px": dbox,
            "logit_diff": abs(ref["change_logit"] - run["change_logit"])}


def summarise(per_pair: dict[str, list[dict]]) -> dict:
    out = {}
    for name, rows in per_pair.items():
        n = len(rows)
        def cat(k, rows=rows):
            return [v for r in rows for v in r[k]]
        ious, ds, df, db = cat("iou"), cat("score_diff"), cat("fused_diff"), cat("box_err_px")
        n_ref = sum(r["objects_ref"] for r in rows)
        out[name] = {
            "pairs": n,
            "identical_pairs": sum(r["identical"] for r in rows),
            "identical_share": sum(r["identical"] for r in rows) / n if n else None,
            "column_share": {c: sum(r["columns"][c] for r in rows) / n
                             for c in COLUMNS} if n else {},
            "objects_ref": n_ref, "objects_run": sum(r["objects_run"] for r in rows),
            "matched_share": (sum(r["matched"] for r in rows) / n_ref) if n_ref else None,
            "unmatched_ref": sum(r["unmatched_ref"] for r in rows),
            "unmatched_run": sum(r["unmatched_run"] for r in rows),
            "iou_mean": float(np.mean(ious)) if ious else None,
            "iou_min": float(np.min(ious)) if ious else None,
            "box_err_px_max": float(np.max(db)) if db else None,
            "score_diff_max": float(np.max(ds)) if ds else None,
            "score_diff_mean": float(np.mean(ds)) if ds else None,
            "fused_diff_max": float(np.max(df)) if df else None,
            "logit_diff_max": max(r["logit_diff"] for r in rows) if rows else None,
        }
    return out


def answers_from_latency(path: Path) -> tuple[list[str], dict[str, dict[str, dict]], dict]:
    """{contender: {pair: answer}} from a latency JSON (its last repeat of each pair)."""
    data = json.loads(Path(path).read_text())
    answers: dict[str, dict[str, dict]] = {}
    for r in data["runs"]:
        answers.setdefault(r["contender"], {})[r["pair"]] = r["answer"]
    return data["pair_ids"], answers, data


def run(args) -> dict:
    def log(s):
        print(s, file=sys.stderr, flush=True)

    bundle = args.bundle
    baseline = args.against
    report = {"benchmark": "accuracy", "bundle": str(bundle), "bundle_label": bundle_label(bundle),
              "machine": machine(), "against": baseline,
              "reference": ("sdexport.reference.ReferencePipeline (PyTorch fp32)" if baseline == "reference"
                            else f"{baseline}: {DESCRIBE[baseline]}"),
              "match_iou": MATCH_IOU}
    if args.from_latency:
        pair_ids, answers, lat = answers_from_latency(args.from_latency)
        report.update({"source": f"answers recorded by {args.from_latency}",
                       "int8_bundle": lat.get("int8_bundle"), "machine": lat.get("machine"),
                       "params": lat.get("params") or {}})
        if baseline not in answers:
            raise SystemExit(f"{args.from_latency}: no {baseline} answers recorded")
    else:
        which = [baseline] + [c for c in args.contenders.split(",") if c and c != baseline]
        bad = [c for c in which if c not in CONTENDERS]
        if bad:
            raise SystemExit(f"unknown contender(s) {bad}")
        int8 = int8_bundle_for(bundle, args.int8, log) if "sdrun-int8" in which else None
        report["int8_bundle"] = str(int8) if int8 else None
        contenders, _ = load_contenders(bundle, int8, which, provider=args.provider,
                                        params=parse_params(args.param))
        report["provider"] = args.provider
        report["params"] = parse_params(args.param)
        pairs = make_pairs(args.pairs, seed=args.seed, real=not args.synthetic_only)
        pair_ids = [p[0] for p in pairs]
        answers = {c.name: {} for c in contenders}
        report["source"] = "run here, one pass per contender and pair"
        for pid, a, b in pairs:
            for c in contenders:
                t0 = time.perf_counter()
                answers[c.name][pid] = c.run(a, b)
                log(f"{pid} {c.name}: {time.perf_counter() - t0:.1f} s "
                    f"{ {k: answers[c.name][pid][k] for k in ('added', 'removed', 'changed')} }")
            report["answers"] = answers
            save_partial(args.out_dir, args.name or f"accuracy_{bundle.name}", report)
    report["pair_ids"] = pair_ids
    report["answers"] = answers
    ref = answers[baseline]
    per_pair = {name: [compare(ref[p], got[p]) for p in pair_ids if p in got and p in ref]
                for name, got in answers.items() if name != baseline}
    report["per_pair"] = {name: [{**{k: v for k, v in r.items() if not isinstance(v, list)},
                                  "pair": p} for r, p in zip(rows, pair_ids)]
                          for name, rows in per_pair.items()}
    report["summary"] = summarise(per_pair)
    return report


def _f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def markdown(report: dict) -> str:
    s = report["summary"]
    m = report.get("machine") or {}
    against = "the PyTorch reference" if report.get("against", "reference") == "reference" else report["against"]
    lines = [f"### Accuracy against {against}: {report['bundle_label']}", "",
             *([f"{m.get('cpu', '?')}; ISA: {m.get('isa', '?')}.", ""] if m else []),
             f"{len(report['pair_ids'])} pairs ({', '.join(report['pair_ids'])}); reference: "
             f"{report['reference']}; {report['source']}; {m.get('date', '')}."
             + (f" Pipeline parameters overridden for every contender: {report['params']}."
                if report.get("params") else ""), ""]
    rows = []
    for name, v in s.items():
        cs = v["column_share"]
        rows.append([name, f"{v['identical_pairs']}/{v['pairs']} ({100 * v['identical_share']:.0f}%)",
                     " / ".join(f"{100 * cs[c]:.0f}%" for c in COLUMNS),
                     f"{v['objects_run']} / {v['objects_ref']}",
                     _f(v["matched_share"], "{:.1%}"), _f(v["iou_mean"], "{:.4f}"),
                     _f(v["iou_min"], "{:.4f}"), _f(v["box_err_px_max"], "{:.2f}"),
                     _f(v["score_diff_max"], "{:.2e}"), _f(v["fused_diff_max"], "{:.2e}"),
                     _f(v["logit_diff_max"], "{:.2e}")])
    lines.append(md_table(["contender", "label sets identical", "added / removed / changed",
                           "objects (run / ref)", "objects paired", "IoU mean", "IoU min",
                           "max box err px", "max |d score|", "max |d fused|", "max |d logit|"], rows))
    lines += ["", f"Objects are the kept boxes of both images, paired per image (equal labels; "
              f"Hungarian on the largest coordinate difference plus 100 x the score difference; "
              f"a pair counts with IoU >= {MATCH_IOU}); IoU, box error and score differences are over "
              "the paired ones. d score: detector score after WBF; d fused: after the heat fusion; "
              "d logit: the Siamese change logit."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    plt = pyplot()
    s = report["summary"]
    names = list(s)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = np.arange(len(names))
    ax.bar(x - 0.2, [100 * s[n]["identical_share"] for n in names], 0.4, label="pairs with identical label sets %")
    ax.bar(x + 0.2, [100 * (s[n]["matched_share"] or 0) for n in names], 0.4, label="reference objects paired %")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, loc="lower left")
    against = "the PyTorch reference" if report.get("against", "reference") == "reference" else report["against"]
    ax.set_title(f"agreement with {against}: {report['bundle_label']}", fontsize=9)
    save_figure(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, pairs=3, contenders="torch,sdrun-fp32,sdrun-int8")
    ap.add_argument("--from-latency", type=Path, help="reuse the answers of a latency run")
    ap.add_argument("--against", default="reference", choices=["reference", "sdrun-fp32"],
                    help="the answers to compare with: the PyTorch reference, or sdrun's fp32 "
                         "(onnxruntime) for the other sdrun contenders")
    args = ap.parse_args(argv)
    return publish(args, "accuracy", run(args), markdown, plot)


if __name__ == "__main__":
    raise SystemExit(main())
