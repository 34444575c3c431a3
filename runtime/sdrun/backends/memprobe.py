"""Measure what one call of a bundle's graph costs in memory: `fixed + batch * per_input`.

Each graph is measured in a fresh process (`python -m sdrun.backends.memprobe`), so that
nothing else the caller did (an export that peaked at 10 GB) hides in the peak: the graph
is opened as `sdrun` opens it (same session options, same arena mode), run once at batch 1
to settle (pre-packed weights, lazy kernels), and then the peak resident memory of a call
at each batch size (1, 2, 8, ... until a call stands out of the noise) is read against
the idle resident memory before it; the cost per input is the slope from the smallest
batch to the largest. It also records whether every row of a batched call has the same bits
as the input's call alone (`batch_invariant`), for distinct inputs and for one input
repeated: sdrun runs a graph that is not one input per call on CPU, so that an answer
never depends on which other inputs shared its call. The inputs are the bundle's golden
inputs of that graph (the first row of each case).

`sdexport build` records the result in the manifest (`graphs[g]["memory"]`), which
`sdrun.backends.memory.GraphCost` reads.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, cast

import numpy as np

from ..errors import SpotdiffError

if TYPE_CHECKING:
    from ..bundle.bundle import Bundle

BATCHES = (1, 2, 8, 32, 128)
MiB = 2**20
# A call's activations must stand out of the RSS's noise (pages the allocator keeps from
# earlier calls) for its slope to mean anything: the probe goes up the batches until a call
# peaks this high above idle, or takes this long.
ENOUGH_PEAK = 256 * MiB
ENOUGH_SECONDS = 15.0


def golden_rows(bundle: Bundle, model: str, graph: str) -> list[dict[str, np.ndarray]]:
    """The first row of each golden case's inputs of `graph` (distinct inputs)."""
    from ..bundle.bundle import golden_cases

    entry = bundle.model(model)
    cases = golden_cases(bundle.arrays(entry["golden_file"]))
    rows = [{k: v[:1] for k, v in io["in"].items()} for (_, g), io in sorted(cases.items()) if g == graph]
    if not rows:
        raise SpotdiffError(f"{bundle.root}: {model}/{graph} has no golden inputs to measure with")
    return rows


def golden_inputs(bundle: Bundle, model: str, graph: str) -> dict[str, np.ndarray]:
    """The first golden case's inputs of `graph`, first row only."""
    return golden_rows(bundle, model, graph)[0]


def same_rows(batched: dict[str, np.ndarray], alone: dict[str, np.ndarray]) -> bool:
    """Whether every row of `batched` has the bits of the first (only) row of `alone`. Grounding DINO's
    have not: onnxruntime's CPU kernels split some work by the call's shape, a few last bits move, and
    its two-stage top-k then swaps query slots."""
    return all(np.array_equal(row, alone[k][0], equal_nan=row.dtype.kind == "f")
               for k, v in batched.items() for row in v)


def measure_here(bundle_root: str | Path, model: str, graph: str, batches: Sequence[int] = BATCHES,
                 threads: int | None = None) -> dict:
    """Measure in this process (which should be fresh: see `measure`)."""
    from ..bundle.bundle import Bundle
    from .memory import peak_rss_bytes, reset_peak_rss, rss_bytes
    from .session import OnnxModel

    bundle = Bundle.load(bundle_root, verify=False)
    rows = golden_rows(bundle, model, graph)
    feeds = rows[0]
    session = OnnxModel(bundle.path(bundle.model(model)["graphs"][graph]["file"]), threads=threads)
    alones = [session.run(r) for r in rows]  # the first also settles the session
    alone = alones[0]
    # distinct inputs in one call against each alone (Grounding DINO's rows move then)
    mixed = session.run({k: np.concatenate([r[k] for r in rows]) for k in feeds})
    invariant = all(same_rows({k: v[i:i + 1] for k, v in mixed.items()}, a) for i, a in enumerate(alones))
    del mixed
    # /proc values: None only off Linux, where reset_peak_rss() below refuses first
    idle = idle_before = cast(int, rss_bytes())
    peaks, seconds = {}, {}
    for n in batches:
        if not reset_peak_rss():
            raise SpotdiffError("cannot reset the peak RSS (/proc/self/clear_refs): not Linux?")
        t0 = time.perf_counter()
        batch = {k: np.repeat(v, n, axis=0) for k, v in feeds.items()}  # inputs count too
        outs = session.run(batch)
        seconds[n] = time.perf_counter() - t0
        invariant = invariant and same_rows(outs, alone)
        del outs
        peaks[n] = cast(int, peak_rss_bytes()) - idle
        del batch
        idle = min(idle, cast(int, rss_bytes()))
        if len(peaks) >= 2 and (peaks[n] >= ENOUGH_PEAK or seconds[n] >= ENOUGH_SECONDS):
            break
    done = list(peaks)
    lo, hi = done[0], done[-1]
    per_input = max((peaks[hi] - peaks[lo]) // (hi - lo), MiB)
    fixed = max(0, max(peaks[n] - n * per_input for n in done))  # the line bounds every point
    return {"fixed_bytes": int(fixed), "per_input_bytes": int(per_input), "batch_invariant": invariant,
            "measured": {"batches": done, "call_peak_bytes": [int(peaks[n]) for n in done],
                         "call_seconds": [round(seconds[n], 3) for n in done],
                         "idle_rss_bytes": int(idle_before), "rss_after_bytes": int(cast(int, rss_bytes())),
                         "arena": session.arena}}


def measure(bundle_root: str | Path, model: str, graph: str, batches: Sequence[int] = BATCHES,
            threads: int | None = None, timeout: float = 1800) -> dict:
    """`measure_here` in a fresh Python process; SpotdiffError if it fails."""
    cmd = [sys.executable, "-m", "sdrun.backends.memprobe", str(bundle_root), model, graph,
           "--batches", *map(str, batches)] + ([] if threads is None else ["--threads", str(threads)])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SpotdiffError(f"measuring {model}/{graph}: no answer in {timeout:.0f} s") from None
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise SpotdiffError(f"measuring {model}/{graph} failed: {tail}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Measure one graph's memory per call (prints JSON).")
    ap.add_argument("bundle")
    ap.add_argument("model")
    ap.add_argument("graph")
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    print(json.dumps(measure_here(args.bundle, args.model, args.graph, tuple(args.batches), args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
