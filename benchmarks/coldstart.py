"""Cold start and memory: import + bundle load time and peak RSS, sdrun against PyTorch.

    python benchmarks/coldstart.py --bundle engines/full --repeats 3 [--first-pair]

Each trial is a fresh Python process (interleaved: sdrun, PyTorch, sdrun, PyTorch, ...,
after one untimed trial of each so that the files are in the page cache for everyone):

- sdrun:   `import sdrun` with what a run needs (numpy, onnxruntime, OpenCV, scipy's
           solver: sdrun itself loads them lazily) + `Pipeline.load(bundle)`,
           which verifies every file against the manifest's sha256, and
           `open_sessions()`, which creates every onnxruntime session (in parallel). As on
           any start after the bundle's first on a machine, the digests of unchanged files
           are remembered (`sdrun.bundle.digests`) and the optimised graphs cached (`sdrun.backends.ortcache`);
- sdrun (first load): the same with neither remembered (SPOTDIFF_DIGEST_CACHE=0,
           SPOTDIFF_GRAPH_CACHE=0): every file hashed, every graph optimised;
- torch:   `import torch, transformers, open_clip, timm` + the optimised PyTorch pipeline
           (`sdexport.reference_fast.FastPipeline`: the four models from the bundle's
           source/ folders, and the prompt embeddings computed once);
- sdrun openvino, and its first load: the same with `--provider openvino:f32`, its compiled
           models cached (`sdrun.backends.openvino_backend`) or compiled from the graphs.

Reported: seconds to import, to load, their sum (and with --first-pair: the first pair's
answer), the peak RSS (VmHWM) after loading, and after the first pair. Writes
coldstart_<bundle>.json/.md/.png and prints the table last.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import common  # noqa: F401
from common import (
    RESULTS,
    THREADS,
    bundle_label,
    machine,
    md_table,
    publish,
    pyplot,
    save_figure,
    summary,
)

CHILD_PRELUDE = textwrap.dedent("""
    import json, os, sys, time
    t_start = time.perf_counter()

    def vm(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) / 1024.0  # MiB
        return None
""")

CHILD = {
    "sdrun": textwrap.dedent("""
        import numpy, onnxruntime, scipy.optimize
        from sdrun.pipeline import Pipeline
        t_import = time.perf_counter()
        pipe = Pipeline.load(BUNDLE, provider=PROVIDER, threads=THREADS)
        pipe.open_sessions()   # sessions are otherwise created at first use
        t_load = time.perf_counter()
        def first(a, b):
            return pipe.diff(a, b)
    """),
    "torch": textwrap.dedent("""
        import torch, transformers, open_clip, timm
        torch.set_num_threads(THREADS)
        from sdexport.reference_fast import FastPipeline
        t_import = time.perf_counter()
        pipe = FastPipeline(BUNDLE, device="cuda" if PROVIDER == "cuda" else None)
        if PROVIDER == "cuda":
            torch.cuda.synchronize()
        t_load = time.perf_counter()
        def first(a, b):
            return pipe.diff(a, b)
    """),
}

CHILD_END = textwrap.dedent("""
    out = {"import_s": t_import - t_start, "load_s": t_load - t_import,
           "peak_rss_load_mib": vm("VmHWM"), "rss_load_mib": vm("VmRSS")}
    if FIRST_PAIR:
        from sdrun.apps.synth import make_pair, pair_rng
        a, b, _, _ = make_pair(pair_rng(0, 0), size=(224, 224))
        t0 = time.perf_counter()
        first(a, b)
        out["first_pair_s"] = time.perf_counter() - t0
        out["peak_rss_run_mib"] = vm("VmHWM")
    print("RESULT " + json.dumps(out))
""")

VARIANTS = {  # name: (child, extra environment, provider: None for --provider's)
    "sdrun": ("sdrun", {}, None),
    "sdrun (first load)": ("sdrun", {"SPOTDIFF_DIGEST_CACHE": "0", "SPOTDIFF_GRAPH_CACHE": "0"}, None),
    "torch": ("torch", {}, None),
    # OpenVINO (issue 25): its compiled models cached, and compiled from the ONNX graphs
    "sdrun openvino": ("sdrun", {}, "openvino:f32"),
    "sdrun openvino (first load)": ("sdrun", {"SPOTDIFF_DIGEST_CACHE": "0", "SPOTDIFF_GRAPH_CACHE": "0"},
                                    "openvino:f32"),
}
DEFAULT_VARIANTS = ("sdrun", "sdrun (first load)", "torch")
# the benchmark's own digest cache, filled by the warm-up trials (not the user's ~/.cache)
DIGEST_CACHE = tempfile.mkdtemp(prefix="spotdiff-coldstart-")


def trial(kind: str, bundle: Path, first_pair: bool, provider: str = "cpu",
          env: dict | None = None) -> dict:
    code = (CHILD_PRELUDE + f"BUNDLE = {str(bundle)!r}\nTHREADS = {THREADS}\n"
            f"PROVIDER = {provider!r}\n"
            f"FIRST_PAIR = {first_pair!r}\n" + CHILD[kind] + CHILD_END)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "SPOTDIFF_CACHE_DIR": DIGEST_CACHE, **(env or {})},
                       timeout=1800)
    wall = time.perf_counter() - t0
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not lines:
        raise RuntimeError(f"{kind} trial failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return {**json.loads(lines[-1][7:]), "process_wall_s": wall}


def run(args) -> dict:
    def log(s):
        print(s, file=sys.stderr, flush=True)

    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    report = {"benchmark": "coldstart", "bundle": str(args.bundle),
              "bundle_label": bundle_label(args.bundle), "machine": machine(),
              "repeats": args.repeats, "first_pair": args.first_pair, "provider": args.provider,
              "trials": []}
    for v in variants:  # warm the page cache for everyone; not counted
        kind, env, provider = VARIANTS[v]
        r = trial(kind, args.bundle, False, provider or args.provider, env)
        log(f"[warm-up] {v}: import {r['import_s']:.2f} s, load {r['load_s']:.2f} s")
    for i in range(args.repeats):
        for v in variants:
            kind, env, provider = VARIANTS[v]
            r = trial(kind, args.bundle, args.first_pair, provider or args.provider, env)
            report["trials"].append({"variant": v, "repeat": i, **r})
            log(f"[{i + 1}/{args.repeats}] {v}: import {r['import_s']:.2f} s, load {r['load_s']:.2f} s, "
                f"peak RSS {r['peak_rss_load_mib']:.0f} MiB"
                + (f", first pair {r['first_pair_s']:.2f} s, peak {r['peak_rss_run_mib']:.0f} MiB"
                   if args.first_pair else ""))
    summ = {}
    for v in variants:
        ts = [t for t in report["trials"] if t["variant"] == v]
        summ[v] = {k: summary(t[k] for t in ts) for k in
                   ("import_s", "load_s", "peak_rss_load_mib", "rss_load_mib", "process_wall_s",
                    "first_pair_s", "peak_rss_run_mib") if k in ts[0]}
        summ[v]["ready_s"] = summary(t["import_s"] + t["load_s"] for t in ts)
    report["summary"] = summ
    if "sdrun" in summ and "torch" in summ:
        s, t = summ["sdrun"], summ["torch"]
        report["ratios"] = {
            "ready_time_sdrun_over_torch": s["ready_s"]["median"] / t["ready_s"]["median"],
            "peak_rss_sdrun_over_torch": s["peak_rss_load_mib"]["median"] / t["peak_rss_load_mib"]["median"]}
        report["targets"] = [
            {"target": "cold start (import + load) <= 1/5 of PyTorch's", "want": 0.2,
             "got": report["ratios"]["ready_time_sdrun_over_torch"]},
            {"target": "peak RSS after load <= 1/2 of PyTorch's", "want": 0.5,
             "got": report["ratios"]["peak_rss_sdrun_over_torch"]}]
        for tg in report["targets"]:
            tg["met"] = tg["got"] <= tg["want"]
    return report


def markdown(report: dict) -> str:
    s = report["summary"]
    m = report["machine"]
    fp = report["first_pair"]
    lines = [f"### Cold start and memory: {report['bundle_label']}", "",
             f"{m['cpu']}, {m['cpus']} CPUs, {m['date']}; median of {report['repeats']} fresh "
             f"processes per variant (interleaved, warm page cache, {THREADS} threads).", ""]
    header = ["variant", "import s", "load s", "import + load s", "peak RSS after load (MiB)"]
    if fp:
        header += ["first pair s", "peak RSS after first pair (MiB)"]
    rows = []
    for v, x in s.items():
        row = [v, f"{x['import_s']['median']:.2f}", f"{x['load_s']['median']:.2f}",
               f"{x['ready_s']['median']:.2f} ({x['ready_s']['min']:.2f}–{x['ready_s']['max']:.2f})",
               f"{x['peak_rss_load_mib']['median']:.0f}"]
        if fp:
            row += [f"{x['first_pair_s']['median']:.2f}", f"{x['peak_rss_run_mib']['median']:.0f}"]
        rows.append(row)
    lines.append(md_table(header, rows))
    lines += ["", "sdrun: `import sdrun` + `Pipeline.load` + `open_sessions()` (every bundle file "
              "checked against its sha256, remembered from an earlier load while the file is "
              "unchanged; every onnxruntime session created, in parallel, from the cached "
              "optimised graphs); sdrun (first load): every file hashed and every graph "
              "optimised (nothing remembered); torch: `import torch, transformers, open_clip, timm` + "
              "the optimised PyTorch pipeline's load (4 models from source/, prompt embeddings once).", ""]
    if report.get("targets"):
        rows = [[t["target"], f"<= {t['want']:.2f}", f"{t['got']:.2f}", "met" if t["met"] else
                 f"missed (x{t['got'] / t['want']:.2f} over)"] for t in report["targets"]]
        lines.append(md_table(["target", "wanted", "sdrun / torch", ""], rows, "lrrl"))
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    plt = pyplot()
    s = report["summary"]
    names = list(s)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3))
    imp = [s[n]["import_s"]["median"] for n in names]
    load = [s[n]["load_s"]["median"] for n in names]
    a1.barh(names, imp, label="import")
    a1.barh(names, load, left=imp, label="load")
    a1.invert_yaxis()
    a1.set_xlabel("seconds")
    a1.legend(fontsize=8)
    a1.set_title("cold start")
    a2.barh(names, [s[n]["peak_rss_load_mib"]["median"] for n in names], color="#c84")
    a2.invert_yaxis()
    a2.set_xlabel("peak RSS after load (MiB)")
    a2.set_title("memory")
    save_figure(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--first-pair", action="store_true", help="also time a first pair per process")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--name", help="output name (default coldstart_<bundle folder>)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    return publish(args, "coldstart", run(args), markdown, plot)

if __name__ == "__main__":
    raise SystemExit(main())
