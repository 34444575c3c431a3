"""What onnxruntime's arena modes cost and give back, per graph of a bundle.

For every graph the pipeline runs and each arena mode (`sdrun.backends.session.ARENA_MODES`:
onnxruntime's default arena, the arena shrunk after every run, no arena), a fresh process
(`sdrun.backends.memprobe`) opens the graph as sdrun does, settles it with one call at batch
1, then times one call at batch 1 and one at batch 2 and reads the resident memory: idle
before the calls, the peak of each call above idle, and what stays after them. Modes are
interleaved per graph.

    python benchmarks/graph_memory.py --bundle engines/full --name graph_memory_full
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import common  # noqa: F401  (threads)
from common import RESULTS, THREADS, machine, md_table, write_outputs

import numpy as np

GRAPHS = (("owlvit", "image"), ("gdino", "model"), ("siamese", "pair"), ("clip", "visual"))
GiB = 2**30


def paired_timing(bundle, name: str, modes: list[str], batch: int, rounds: int) -> dict:
    """Seconds per call of one graph in each arena mode, the modes' sessions side by side in
    this process and their calls interleaved (A B C A B C ...)."""
    from sdrun.backends.memprobe import golden_inputs
    from sdrun.backends.session import OnnxModel

    model, graph = name.split("/")
    feeds = {k: np.repeat(v, batch, axis=0) for k, v in golden_inputs(bundle, model, graph).items()}
    path = bundle.path(bundle.model(model)["graphs"][graph]["file"])
    sessions = {m: OnnxModel(path, threads=THREADS, arena=m) for m in modes}
    for s in sessions.values():
        s.run(feeds)
    seconds: dict = {m: [] for m in modes}
    for _ in range(rounds):
        for m, s in sessions.items():
            t0 = time.perf_counter()
            s.run(feeds)
            seconds[m].append(time.perf_counter() - t0)
    return {"graph": name, "batch": batch, "rounds": rounds, "seconds": seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("engines/tiny"))
    ap.add_argument("--modes", nargs="+", default=["arena", "shrink", "no-arena"])
    ap.add_argument("--timing-graph", default="gdino/model",
                    help="graph whose speed is compared between modes in one process, interleaved")
    ap.add_argument("--timing-modes", nargs="+", default=["arena", "shrink"])
    ap.add_argument("--timing-batch", type=int, default=2)
    ap.add_argument("--timing-rounds", type=int, default=3)
    ap.add_argument("--name", default=None)
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()

    from sdrun.backends.memprobe import measure
    from sdrun.bundle.bundle import Bundle

    bundle = Bundle.load(args.bundle)
    results: dict = {}
    for model, graph in GRAPHS:
        if not bundle.has(model):
            continue
        for mode in args.modes:
            os.environ["SDRUN_ORT_ARENA"] = mode  # read by the probe's OnnxModel
            r = measure(args.bundle, model, graph, threads=THREADS)
            results.setdefault(f"{model}/{graph}", {})[mode] = r
            print(json.dumps({f"{model}/{graph}": {mode: r}}), flush=True)
    timing = paired_timing(bundle, args.timing_graph, args.timing_modes, args.timing_batch, args.timing_rounds)
    print(json.dumps({"timing": timing}), flush=True)
    rows = []
    for name, modes in results.items():
        base = modes.get("arena", next(iter(modes.values())))["measured"]["call_seconds"]
        for mode, r in modes.items():
            m = r["measured"]
            rows.append([name, mode, f"{m['call_seconds'][0]:.2f}", f"{m['call_seconds'][1]:.2f}",
                         f"{(m['call_seconds'][0] + m['call_seconds'][1]) / (base[0] + base[1]):.2f}",
                         f"{m['idle_rss_bytes'] / GiB:.2f}", f"{m['call_peak_bytes'][0] / GiB:.2f}",
                         f"{m['call_peak_bytes'][1] / GiB:.2f}", f"{m['rss_after_bytes'] / GiB:.2f}",
                         f"{r['per_input_bytes'] / GiB:.2f}"])
    mc = machine()
    md = [f"# Memory per call and arena modes ({mc['cpu']}; {mc['isa']}; {THREADS} threads; bundle "
          f"{args.bundle}; {mc['date']})", "",
          "Each graph in a fresh process, opened as sdrun opens it, settled by one call at batch 1; then one "
          "call at batch 1 and one at batch 2. RSS: idle before the calls, each call's peak above idle, what "
          "the process holds after both; per input: the batch-2 peak less the batch-1 peak. "
          "'time vs arena': seconds of both calls over onnxruntime's default arena's.", "",
          md_table(["graph", "mode", "b1 s", "b2 s", "time vs arena", "idle GiB", "b1 peak GiB",
                    "b2 peak GiB", "after GiB", "per input GiB"], rows, align="llrrrrrrrr")]
    base = statistics.median(timing["seconds"][args.timing_modes[0]])
    md += ["", f"Speed in one process, {args.timing_graph} at batch {args.timing_batch}, modes interleaved "
           f"for {args.timing_rounds} rounds after one warm-up call each (median seconds per call, and over "
           f"{args.timing_modes[0]}'s):", "",
           md_table(["mode", "median s", "runs s", f"x {args.timing_modes[0]}"],
                    [[m, f"{statistics.median(v):.2f}", " ".join(f"{x:.2f}" for x in v),
                      f"{statistics.median(v) / base:.3f}"] for m, v in timing["seconds"].items()])]
    write_outputs(args.out_dir, args.name or f"graph_memory_{args.bundle.name}",
                  {"machine": mc, "bundle": str(args.bundle), "results": results, "timing": timing},
                  "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
