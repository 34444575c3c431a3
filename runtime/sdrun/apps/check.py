"""`sdrun check`: run every graph on the golden samples recorded from PyTorch.

Golden files are `.npz` archives with keys `{case}__{graph}__in__{name}` and
`{case}__{graph}__out__{name}`. Each output is compared with relative L2
(||run - ref|| / ||ref||) against the tolerance the manifest states: a graph's own
`tolerance` (int8 graphs carry theirs, see `sdexport.quantize`) or else its model's.
The references are PyTorch fp32 outputs, whatever the graph's precision, except the cases
a model's `runtime_golden` lists: outputs that depend on a prompt PyTorch never ran
(`sdrun vocab`), recorded by the runtime itself; each check says which reference it used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..backends.interface import Model
from ..backends.session import open_graph
from ..bundle.bundle import Bundle, golden_cases
from ..stages.matching import linear_sum_assignment

DEFAULT_REL_L2 = 1e-5


@dataclass
class OutputCheck:
    model: str
    graph: str
    case: str
    output: str
    shape: tuple
    max_abs: float
    rel_l2: float
    tolerance: float
    note: str = ""
    precision: str = "fp32"
    reference: str = "pytorch"  # or "runtime": the runtime's own record (`sdrun vocab`)

    @property
    def ok(self) -> bool:
        return bool(self.rel_l2 <= self.tolerance)


def compare(run: np.ndarray, ref: np.ndarray) -> tuple[float, float, str]:
    """(max_abs, rel_l2, note) of `run` against `ref`; non-finite entries must coincide."""
    if run.shape != ref.shape:
        return np.inf, np.inf, f"shape {run.shape} != reference {ref.shape}"
    run = run.astype(np.float64)
    ref = ref.astype(np.float64)
    fin_run, fin_ref = np.isfinite(run), np.isfinite(ref)
    if not np.array_equal(fin_run, fin_ref) or not np.array_equal(run[~fin_ref], ref[~fin_ref]):
        return np.inf, np.inf, "non-finite entries differ"
    if not fin_ref.any():
        return 0.0, 0.0, "all entries non-finite"
    d = run[fin_ref] - ref[fin_ref]
    max_abs = float(np.abs(d).max()) if d.size else 0.0
    denom = float(np.linalg.norm(ref[fin_ref]))
    rel = float(np.linalg.norm(d)) / denom if denom > 0 else max_abs
    return max_abs, rel, ""


def match_slots(run: dict, ref: dict, keys: list[str], axis: int = 1) -> tuple[dict, int]:
    """Reorder the query slots of `run` to best match `ref` (per batch item).

    Grounding DINO's two-stage top-k can swap two adjacent slots on ~1e-5
    differences; each slot then carries different boxes and logits. Slots are
    paired by Hungarian matching on the summed L1 distance of the slot's outputs.
    Returns the reordered outputs and the number of slots that moved.
    """
    out = dict(run)
    first = ref[keys[0]]
    moved = 0
    for b in range(first.shape[0]):
        cost: np.ndarray | float = 0.0
        for k in keys:
            a = np.nan_to_num(np.moveaxis(ref[k][b], axis - 1, 0).reshape(first.shape[axis], -1),
                              posinf=0.0, neginf=0.0)
            r = np.nan_to_num(np.moveaxis(run[k][b], axis - 1, 0).reshape(first.shape[axis], -1),
                              posinf=0.0, neginf=0.0)
            cost = cost + np.abs(a[:, None, :] - r[None, :, :]).mean(-1)
        rows, cols = linear_sum_assignment(np.asarray(cost))
        perm = cols[np.argsort(rows)]
        moved += int((perm != np.arange(len(perm))).sum())
        for k in keys:
            arr = out[k].copy()
            arr[b] = np.take(run[k][b], perm, axis=axis - 1)
            out[k] = arr
    return out, moved


PYTORCH, RUNTIME = "pytorch", "runtime"


def reference_of(entry: dict, case: str, graph: str) -> str:
    """Who recorded a golden case of a model: PyTorch at build time, or the runtime
    (`sdrun vocab`, listed in the model's `runtime_golden`)."""
    return RUNTIME if f"{case}/{graph}" in (entry.get("runtime_golden") or {}).get("cases", []) else PYTORCH


def tolerance_for(entry: dict, graph_entry: dict) -> tuple[float, str]:
    """(relative-L2 tolerance, precision) of one graph: the graph's own tolerance when it has
    one (an int8 graph does), else its model's, else DEFAULT_REL_L2."""
    tol = graph_entry.get("tolerance") or entry.get("tolerance") or {}
    precision = graph_entry.get("precision") or entry.get("precision") or "fp32"
    return float(tol.get("rel_l2", DEFAULT_REL_L2)), str(precision)


class _StreamGroup:
    """A weak-referenceable owner of one CUDA stream (see sdrun.backends.trt.device_context)."""


def check_graph(bundle: Bundle, model: str, graph: str, session: Model, tolerance: float | None = None
                ) -> Iterator[OutputCheck]:
    """Yield an `OutputCheck` per (case, output) of one graph run by `session` (anything with
    `run(feeds) -> dict`: an OnnxModel, a TrtModel). `tolerance` defaults to the model's."""
    entry = bundle.model(model)
    gentry = entry["graphs"][graph]
    graph_tol, precision = tolerance_for(entry, gentry)
    if tolerance is None:
        tolerance = graph_tol
    golden = bundle.arrays(entry["golden_file"])
    for (case, g), io in sorted(golden_cases(golden).items()):
        if g != graph:
            continue
        outs = session.run(io["in"])
        reference = reference_of(entry, case, g)
        ref_name = "PyTorch fp32" if reference == PYTORCH else "the runtime's fp32 record"
        note = "" if precision == "fp32" else f"{precision} graph vs {ref_name}"
        slots = gentry.get("slot_outputs")
        if slots:
            outs, moved = match_slots(outs, io["out"], slots, axis=gentry.get("slot_axis", 1))
            if moved:
                note = "; ".join(x for x in (note, f"{moved} slot(s) reordered") if x)
        for oname, ref in io["out"].items():
            max_abs, rel, why = compare(outs[oname], ref)
            yield OutputCheck(model, graph, case, oname, tuple(ref.shape), max_abs, rel, tolerance,
                              why or note, precision, reference)


def check_bundle(bundle: Bundle, provider: str = "cpu", models: list[str] | None = None, *,
                 allow_onnx_fallback: bool = False) -> Iterator[OutputCheck]:
    """Yield an `OutputCheck` per (model, graph, case, output).

    With provider "tensorrt" the bundle's engines for this GPU are checked, each
    against its precision's tolerance as recorded in the manifest (fp16 engines are
    not held to fp32's 1e-5).
    """
    group = _StreamGroup()  # one CUDA stream for the whole check
    for name, entry in bundle.models.items():
        if models and name not in models:
            continue
        graphs = sorted({g for (_, g) in golden_cases(bundle.arrays(entry["golden_file"]))})
        for graph in graphs:
            tol, _ = tolerance_for(entry, entry["graphs"][graph])
            session = open_graph(bundle, name, graph, provider=provider,
                                 allow_onnx_fallback=allow_onnx_fallback, group=group)
            gtol = getattr(session, "check_tolerance", None)
            yield from check_graph(bundle, name, graph, session,
                                   tol if gtol is None else max(tol, gtol))
