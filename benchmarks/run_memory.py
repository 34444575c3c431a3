"""Peak memory of `sdrun run` with large batches, and its answers against `sdrun diff`.

Runs `sdrun run BUNDLE --data DATA --batch-pairs N` as a child process (its peak resident
memory is the operating system's account of the child), then `sdrun diff --json` once per
distinct image pair of DATA (pairs whose files have the same bytes share one diff), and
compares every pair's label sets.

    python benchmarks/run_memory.py --bundle engines/full --data /tmp/run8 --batch-pairs 8 \\
        --param det_thr=0.9 --name run_memory_full_epyc-avx2
"""
from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (threads)
from common import RESULTS, THREADS, machine, md_table, write_outputs

from sdrun.csvfile import COLUMNS


def sdrun(*argv: str) -> list[str]:
    return [sys.executable, "-m", "sdrun.cli", *argv]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="a folder with data/{id}_1.png, data/{id}_2.png")
    ap.add_argument("--batch-pairs", type=int, default=8)
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--memory-budget", default=None)
    ap.add_argument("--name", default=None)
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    params = [x for p in args.param for x in ("--param", p)]
    budget = ["--memory-budget", args.memory_budget] if args.memory_budget else []

    work = Path(tempfile.mkdtemp(prefix="run-memory-"))
    t0 = time.perf_counter()
    run = subprocess.run(sdrun("run", str(args.bundle), "--data", str(args.data), "--out", str(work / "sub.csv"),
                               "--batch-pairs", str(args.batch_pairs), "--threads", str(THREADS), "--quiet",
                               *params, *budget), capture_output=True, text=True)
    run_s = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 2**30
    if run.returncode != 0:
        raise SystemExit(f"sdrun run failed ({run.returncode}): {run.stderr[-2000:]}")
    got = {d["img_id"]: d for d in map(json.loads, (work / "sub.details.jsonl").read_text().splitlines())}

    want, diffs = {}, {}
    for pid in sorted(got):
        a, b = args.data / "data" / f"{pid}_1.png", args.data / "data" / f"{pid}_2.png"
        key = hashlib.sha256(a.read_bytes() + b"\0" + b.read_bytes()).hexdigest()
        if key not in diffs:
            r = subprocess.run(sdrun("diff", str(args.bundle), str(a), str(b), "--json", "--threads",
                                     str(THREADS), *params, *budget), capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"sdrun diff {a} {b} failed: {r.stderr[-2000:]}")
            diffs[key] = json.loads(r.stdout)
        want[pid] = diffs[key]
    rows, same = [], 0
    for pid in sorted(got):
        ok = all(got[pid][c] == want[pid][c] for c in COLUMNS)
        same += ok
        rows.append([pid, *(" ".join(got[pid][c]) or "none" for c in COLUMNS), "yes" if ok else "NO"])
    m = machine()
    report = {"machine": m, "args": {k: str(v) for k, v in vars(args).items()}, "pairs": len(got),
              "run_seconds": run_s, "run_peak_rss_gib": peak_gib, "same_as_sdrun_diff": same,
              "distinct_pairs_diffed": len(diffs), "results": {p: {c: got[p][c] for c in COLUMNS} for p in got}}
    md = [f"# `sdrun run --batch-pairs {args.batch_pairs}` on {args.bundle}: peak memory and answers "
          f"({m['cpu']}; {m['isa']}; {m['memory_gib']} GiB; {THREADS} threads; {m['date']})", "",
          f"{len(got)} pairs in {run_s:.0f} s; peak RSS of the `sdrun run` process **{peak_gib:.2f} GiB** "
          f"(memory budget: {args.memory_budget or 'default'}; parameters {args.param or 'the bundle'}). "
          f"Label sets equal to `sdrun diff` on the same pair: **{same}/{len(got)}**.", "",
          md_table(["pair", "added", "removed", "changed", "same as sdrun diff"], rows, align="lllll")]
    write_outputs(args.out_dir, args.name or f"run_memory_{args.bundle.name}", report, "\n".join(md))
    print("\n".join(md))
    return 0 if same == len(got) else 1


if __name__ == "__main__":
    sys.exit(main())
