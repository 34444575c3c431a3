"""Per-graph latency of an fp32 bundle and its int8 copy on this CPU, interleaved.

    python benchmarks/graph_speed.py --fp32 engines/full --int8 engines/full-int8 [--repeats 5]

Each graph runs on its golden "random" inputs (the batch recorded at build time) in
onnxruntime CPU sessions of both bundles, alternately fp32, int8, fp32, int8, ... after one
warm-up run each; the table gives the medians, the fp32/int8 ratio (median of the paired
ratios) and the CPU (model name, the instruction-set flags that pick onnxruntime's
kernels, and its int8 kernel family), since int8's gain depends on the CPU: VNNI runs four
u8*s8 products per instruction, AVX2 two. Writes graph_speed_<int8 bundle>_<int8 kernel>
.json/.md and prints the table last.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import common  # noqa: F401
from common import RESULTS, THREADS, machine, md_table, write_outputs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fp32", type=Path, required=True, help="an fp32 bundle")
    ap.add_argument("--int8", type=Path, required=True, help="its int8 copy")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", action="append", help="only this model (repeatable)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    from sdrun.apps.check import golden_cases
    from sdrun.backends.session import open_graph
    from sdrun.bundle.bundle import Bundle

    bundles = {"fp32": Bundle.load(args.fp32), "int8": Bundle.load(args.int8)}
    if bundles["int8"].manifest.get("precision") != "int8":
        raise SystemExit(f"{args.int8}: not an int8 bundle")
    graphs, rows = {}, []
    for model, entry in bundles["fp32"].models.items():
        if args.model and model not in args.model:
            continue
        cases = golden_cases(bundles["fp32"].arrays(entry["golden_file"]))
        for graph in sorted({g for (_, g) in cases}):
            feeds = cases.get(("random", graph), cases.get(("image", graph)))["in"]
            sessions = {p: open_graph(b, model, graph, threads=THREADS) for p, b in bundles.items()}
            times: dict[str, list[float]] = {p: [] for p in sessions}
            for s in sessions.values():
                s.run(feeds)  # warm-up: session creation, first-run allocations
            for _ in range(args.repeats):
                for p, s in sessions.items():
                    t0 = time.perf_counter()
                    s.run(feeds)
                    times[p].append(time.perf_counter() - t0)
            ratios = [a / b for a, b in zip(times["fp32"], times["int8"])]
            name = f"{model}/{graph}"
            batch = next(iter(feeds.values())).shape[0]
            graphs[name] = {"batch": batch, "fp32_s": times["fp32"], "int8_s": times["int8"],
                            "fp32_over_int8_paired": ratios}
            rows.append([name, str(batch), f"{statistics.median(times['fp32']):.3f}",
                         f"{statistics.median(times['int8']):.3f}",
                         f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}–{max(ratios):.2f})"])
            print(f"{name}: fp32 {statistics.median(times['fp32']):.3f} s, int8 "
                  f"{statistics.median(times['int8']):.3f} s", flush=True)
    here = machine()
    report = {"benchmark": "graph_speed", "fp32": str(args.fp32), "int8": str(args.int8),
              "repeats": args.repeats, "machine": here, "graphs": graphs}
    md = (f"### fp32 vs int8 per graph on {here['cpu']} ({args.fp32.name} / {args.int8.name})\n\n"
          f"CPU flags: {here['isa']}; onnxruntime int8 kernel: {here['int8_kernel']}; "
          f"{THREADS} threads, {args.repeats} interleaved runs after a warm-up, golden inputs.\n\n"
          + md_table(["graph", "batch", "fp32 s (median)", "int8 s (median)",
                      "fp32 / int8 (paired median, min–max)"], rows, "lrrrr") + "\n")
    write_outputs(args.out_dir, f"graph_speed_{args.int8.name}_{here['int8_kernel']}", report, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
