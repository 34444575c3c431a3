"""`sdrun precision`: which graphs (and which parts of Grounding DINO) may run in bf16 under
OpenVINO, chosen by the answers they keep.

A policy maps "model/graph" to "f32", "bf16" or, for a graph with parts
(`openvino_backend.PARTS`), {part: precision}. The search is greedy and each step is judged
end to end: a trial runs the whole pipeline with OpenVINO under the trial policy and is
accepted only if every pair's label sets (added, removed, changed) equal those of the
onnxruntime fp32 pipeline. All-bf16 is tried first (one trial when it holds); otherwise each
graph, largest first, is tried in bf16 with the others as accepted so far, and a graph that
fails whole is tried part by part. A graph whose bf16 is not measurably faster than its f32
(`MIN_SPEEDUP` on its golden inputs) stays f32: bf16 that buys nothing is drift for nothing.

The result goes into the bundle's manifest ("openvino" section) with each bf16 graph's golden
drift, from which `sdrun check --provider openvino` takes its tolerance.
"""
from __future__ import annotations

import gc
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..backends.cpu import cpu_info, isa_summary
from ..backends.openvino_backend import PARTS, TOLERANCE, describe, has_bf16, open_openvino, ov_version
from ..bundle.bundle import Bundle, golden_cases
from .check import check_graph

log = logging.getLogger(__name__)

MIN_SPEEDUP = 1.05  # bf16 must beat f32 by this on the graph's golden inputs
TOLERANCE_HEADROOM = 2.0  # the recorded check tolerance: measured drift times this
Precision = Any  # "f32" | "bf16" | {part: "f32" | "bf16"}
LabelSets = tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]


@dataclass
class Trial:
    policy: dict[str, Precision]
    agree: int
    total: int

    @property
    def ok(self) -> bool:
        return self.agree == self.total


@dataclass
class PolicyReport:
    policy: dict[str, Precision]
    trials: list[Trial]
    tolerance: dict[str, float] = field(default_factory=dict)
    drift: dict[str, dict[str, float]] = field(default_factory=dict)
    speedup: dict[str, float] = field(default_factory=dict)
    pairs: int = 0

    def section(self) -> dict[str, Any]:
        """The manifest's "openvino" section for this policy."""
        info = cpu_info()
        return {"policy": self.policy, "tolerance": self.tolerance,
                "measured": {"cpu": info.get("model", "?"), "isa": isa_summary(), "bf16": has_bf16(),
                             "openvino": ov_version(), "pairs": self.pairs, "trials": len(self.trials),
                             "drift_rel_l2": self.drift, "bf16_speedup": self.speedup,
                             "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}


def graph_keys(bundle: Bundle) -> list[str]:
    """Every "model/graph" of the bundle, largest file first (where bf16 buys most)."""
    files = bundle.manifest["files"]
    keys = [(files.get(g["file"], {}).get("bytes", 0), f"{m}/{name}")
            for m, e in bundle.models.items() for name, g in e.get("graphs", {}).items()]
    return [k for _, k in sorted(keys, key=lambda t: (-t[0], t[1]))]


def choose_policy(keys: Sequence[str], parts: Callable[[str], Sequence[str]],
                  trial: Callable[[dict[str, Precision]], Trial]) -> tuple[dict[str, Precision], list[Trial]]:
    """The greedy search (module docstring); `trial(policy)` judges one policy."""
    trials: list[Trial] = []

    def holds(policy: dict[str, Precision]) -> bool:
        t = trial(policy)
        trials.append(t)
        log.info("trial %s: %d/%d pairs agree", {k: describe(v) for k, v in policy.items()}, t.agree, t.total)
        return t.ok

    everything = dict.fromkeys(keys, "bf16")
    if holds(everything):
        return everything, trials
    policy: dict[str, Precision] = dict.fromkeys(keys, "f32")
    for key in keys:
        if holds({**policy, key: "bf16"}):
            policy[key] = "bf16"
            continue
        names = list(parts(key))
        if not names:
            continue
        split = dict.fromkeys(names, "f32")
        for part in names:
            candidate = {**split, part: "bf16"}
            if holds({**policy, key: candidate}):
                split = candidate
        if any(p == "bf16" for p in split.values()):
            policy[key] = split
    return policy, trials


def parts_of(key: str) -> list[str]:
    return list(PARTS.get(key.split("/")[0], {}))


def with_policy(bundle: Bundle, policy: dict[str, Precision]) -> Bundle:
    """The same bundle (same files) with `policy` as its OpenVINO policy, in memory only."""
    return Bundle(root=bundle.root, manifest={**bundle.manifest, "openvino": {"policy": policy}})


def label_sets_of(pipe: Any, pairs: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> list[LabelSets]:
    out = []
    for pair_id, a, b in pairs:
        r = pipe.diff(a, b, pair_id)
        out.append((tuple(r.added), tuple(r.removed), tuple(r.changed)))
    return out


def golden_feeds(bundle: Bundle, model: str, graph: str) -> list[dict[str, np.ndarray]]:
    golden = bundle.arrays(bundle.model(model)["golden_file"])
    return [io["in"] for (_, g), io in sorted(golden_cases(golden).items()) if g == graph]


def fastest_seconds(session: Any, feeds: Sequence[dict[str, np.ndarray]], repeats: int = 3) -> float:
    """The fastest of `repeats` passes of `session` over `feeds`, after one untimed pass."""
    session.open()
    for f in feeds:
        session.run(f)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for f in feeds:
            session.run(f)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_policy(bundle: Bundle, pairs: Sequence[tuple[str, np.ndarray, np.ndarray]],
                   params: dict | None = None, threads: int | None = None, min_speedup: float = MIN_SPEEDUP,
                   pipeline: Callable[..., Any] | None = None) -> PolicyReport:
    """Measure each graph's bf16 speed-up on its golden inputs, search the policy among the
    graphs that gain at least `min_speedup` on `pairs` (id, image 1, image 2), and record
    each bf16 graph's golden drift. `pipeline(bundle, provider)` makes a Pipeline."""
    if pipeline is None:
        from ..pipeline import Pipeline

        def pipeline(b: Bundle, provider: str) -> Any:
            return Pipeline(b, provider=provider, params=params, threads=threads)

    keys = graph_keys(bundle)
    if has_bf16():
        speedup = {key: graph_speedup(bundle, key, threads) for key in keys}
    else:  # OpenVINO runs bf16 in f32 here: nothing to gain, timing would only measure noise
        log.warning("this CPU has no bf16 arithmetic: every graph stays f32")
        speedup = dict.fromkeys(keys, 1.0)
    candidates = [k for k in keys if has_bf16() and speedup[k] >= min_speedup]
    for key in keys:
        log.info("%s: bf16 %.2fx f32 on its golden inputs%s", key, speedup[key],
                 "" if key in candidates else ": stays f32")
    reference = label_sets_of(pipeline(bundle, "cpu"), pairs)
    gc.collect()

    def trial(policy: dict[str, Precision]) -> Trial:
        full = {**dict.fromkeys(keys, "f32"), **policy}
        got = label_sets_of(pipeline(with_policy(bundle, full), "openvino"), pairs)
        gc.collect()
        return Trial(full, sum(g == r for g, r in zip(got, reference)), len(pairs))

    chosen, trials = choose_policy(candidates, parts_of, trial) if candidates else ({}, [])
    policy = {**dict.fromkeys(keys, "f32"), **chosen}
    report = PolicyReport(policy, trials, speedup={k: round(v, 3) for k, v in speedup.items()}, pairs=len(pairs))
    for key, precision in policy.items():
        if precision == "f32":
            continue
        model, graph = key.split("/")
        lowered = open_openvino(bundle, model, graph, precision, threads)
        drift = {f"{c.case}/{c.output}": c.rel_l2 for c in check_graph(bundle, model, graph, lowered, 1.0)}
        report.drift[key] = {k: float(f"{v:.3g}") for k, v in drift.items()}
        worst = max(drift.values(), default=0.0)
        report.tolerance[key] = float(f"{max(TOLERANCE['f32'], worst * TOLERANCE_HEADROOM):.2g}")
        del lowered
        gc.collect()
    return report


def graph_speedup(bundle: Bundle, key: str, threads: int | None) -> float:
    """f32 time over bf16 time of one graph on its golden inputs (OpenVINO both)."""
    model, graph = key.split("/")
    feeds = golden_feeds(bundle, model, graph)
    f32 = fastest_seconds(open_openvino(bundle, model, graph, "f32", threads), feeds)
    gc.collect()
    with warnings.catch_warnings():  # "no bf16 on this CPU" was said once by the caller
        warnings.simplefilter("ignore", RuntimeWarning)
        bf16 = fastest_seconds(open_openvino(bundle, model, graph, "bf16", threads), feeds)
    gc.collect()
    return f32 / bf16 if bf16 > 0 else 1.0
