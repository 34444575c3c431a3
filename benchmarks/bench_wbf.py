"""Time sdrun.stages.fusion.weighted_boxes_fusion against ensemble-boxes 1.0.9.

    python benchmarks/bench_wbf.py [--repeats 30] [--warmup 3] [--seed 0]

Scenarios: 2 models x 300 boxes of one label, and 4 models x 100 boxes over 5
labels (detections of the same objects, jittered per model, so boxes do fuse).
Both implementations get the same inputs; their outputs are checked to be
identical first.  Calls are interleaved (the order alternating per repeat),
after warm-up, and the median over the repeats is reported.  Writes
benchmarks/results/wbf.json and benchmarks/results/wbf.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
try:
    from sdrun.stages.fusion import weighted_boxes_fusion as sdrun_wbf
except ImportError:  # not installed: use the checkout
    sys.path.insert(0, str(ROOT / "runtime"))
    from sdrun.stages.fusion import weighted_boxes_fusion as sdrun_wbf

SCENARIOS = [
    # name, models, boxes per model, labels, iou_thr
    ("2 lists x 300 boxes, 1 label", 2, 300, 1, 0.55),
    ("4 lists x 100 boxes, 5 labels", 4, 100, 5, 0.55),
]


def make_scene(rng, n_models, n_boxes, n_labels):
    """Each model detects the same objects, with its own jitter and scores."""
    centre = rng.uniform(0.05, 0.95, (n_boxes, 2))
    size = rng.uniform(0.02, 0.15, (n_boxes, 2))
    objects = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    labels = rng.integers(0, n_labels, n_boxes)
    boxes_list, scores_list, labels_list = [], [], []
    for _ in range(n_models):
        b = objects + rng.normal(0.0, 0.01, objects.shape)
        b = np.concatenate([np.minimum(b[:, :2], b[:, 2:]), np.maximum(b[:, :2], b[:, 2:])], axis=1)
        boxes_list.append(np.clip(b, 0.0, 1.0))
        scores_list.append(rng.uniform(0.05, 1.0, n_boxes))
        labels_list.append(labels.copy())
    return boxes_list, scores_list, labels_list


def time_call(fn, args, kwargs):
    """(wall seconds, CPU seconds of this process) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn(*args, **kwargs)
    t1, c1 = time.perf_counter(), time.process_time()
    return t1 - t0, c1 - c0


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per implementation and scenario")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for wbf.json / wbf.md")
    args = ap.parse_args(argv)

    import ensemble_boxes
    from ensemble_boxes import weighted_boxes_fusion as eb_wbf

    try:
        from importlib.metadata import version

        eb_version = version("ensemble-boxes")
    except Exception:  # pragma: no cover
        eb_version = getattr(ensemble_boxes, "__version__", "?")

    warnings.simplefilter("ignore")
    rng = np.random.default_rng(args.seed)
    rows = []
    for name, n_models, n_boxes, n_labels, iou_thr in SCENARIOS:
        data = make_scene(rng, n_models, n_boxes, n_labels)
        kwargs = dict(iou_thr=iou_thr, skip_box_thr=0.0, conf_type="avg")
        ref = eb_wbf(*data, **kwargs)
        got = sdrun_wbf(*data, **kwargs)
        same = all(np.array_equal(a, b) for a, b in zip(ref, got)) and len(ref[0]) == len(got[0])
        if not same:
            raise SystemExit(f"{name}: sdrun's result differs from ensemble-boxes'")
        for _ in range(args.warmup):
            eb_wbf(*data, **kwargs)
            sdrun_wbf(*data, **kwargs)
        t_eb, t_sd = [], []
        gc.collect()
        for i in range(args.repeats):
            if i % 2:
                t_sd.append(time_call(sdrun_wbf, data, kwargs))
                t_eb.append(time_call(eb_wbf, data, kwargs))
            else:
                t_eb.append(time_call(eb_wbf, data, kwargs))
                t_sd.append(time_call(sdrun_wbf, data, kwargs))
        wall_eb, cpu_eb = (np.array(v) * 1e3 for v in zip(*t_eb))
        wall_sd, cpu_sd = (np.array(v) * 1e3 for v in zip(*t_sd))
        med = statistics.median
        rows.append(
            {
                "scenario": name,
                "models": n_models,
                "boxes_per_model": n_boxes,
                "labels": n_labels,
                "iou_thr": iou_thr,
                "fused_boxes": int(len(ref[0])),
                "identical_output": True,
                "ensemble_boxes_ms": round(med(wall_eb), 3),
                "sdrun_ms": round(med(wall_sd), 3),
                "speedup": round(med(wall_eb) / med(wall_sd), 2),
                "ensemble_boxes_cpu_ms": round(med(cpu_eb), 3),
                "sdrun_cpu_ms": round(med(cpu_sd), 3),
                "speedup_cpu": round(med(cpu_eb) / med(cpu_sd), 2),
                "ensemble_boxes_min_ms": round(float(wall_eb.min()), 3),
                "sdrun_min_ms": round(float(wall_sd.min()), 3),
                # each repeat times the two back to back: the median of those
                # ratios is less sensitive to a machine whose speed drifts
                "speedup_paired_median": round(med(wall_eb / wall_sd), 2),
            }
        )

    lines = [
        f"WBF, median of {args.repeats} interleaved calls after {args.warmup} warm-up calls "
        f"(ensemble-boxes {eb_version}, numpy {np.__version__}, Python {platform.python_version()}, "
        f"{machine()['cpu']}, {os.cpu_count()} CPUs):",
        "",
        "| scenario | fused boxes | ensemble-boxes (ms) | sdrun (ms) | speed-up | speed-up, CPU time |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['fused_boxes']} | {r['ensemble_boxes_ms']:.2f} "
            f"| {r['sdrun_ms']:.2f} | {r['speedup']:.1f}x | {r['speedup_cpu']:.1f}x |"
        )
    lines += [
        "",
        "ms: median wall time per call; speed-up: ratio of the median wall times; speed-up, CPU time: "
        "ratio of the median CPU times of the process (less disturbed by other load on the machine). "
        "Outputs were checked to be identical before timing.",
    ]
    table = "\n".join(lines)
    print(table)

    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "weighted_boxes_fusion",
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seed": args.seed,
        "statistic": "median per call (wall and process CPU time), interleaved",
        "ensemble_boxes": eb_version,
        "machine": machine(),
        "results": rows,
    }
    (args.out / "wbf.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "wbf.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
