"""The FLOP floor: FLOPs of every graph of a bundle, and this machine's measured peak.

    python benchmarks/flops.py --bundle engines/full [--out-dir benchmarks/results]

FLOPs are counted from the ONNX graph as it runs: every graph is run once at batch 1 in
onnxruntime with graph optimisations off and profiling on, and each MatMul / Gemm / Conv
(and their integer forms) is counted from the shapes the profiler recorded
(2 x multiply-adds; element-wise ops, softmax, LayerNorm, GridSample are left out: they
are memory-bound and a few % of the arithmetic). Per call at batch B the count is B times
the batch-1 count (OWL-ViT's text graph: per prompt).

The peak is measured, not taken from a data sheet: a 2048^3 MatMul in onnxruntime (fp32)
and a MatMulInteger (u8 x s8, int8) with the benchmarks' threads and no spinning.
Writes flops_<bundle>.json / .md (latency.py reuses the graphs' counts from the JSON when
the graphs are the same, and measures the peak again at the start of every run).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (first: thread settings)
from common import RESULTS, THREADS, machine, md_table, write_outputs

import numpy as np

MATMUL = {"MatMul", "FusedMatMul", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
          "QLinearMatMul"}
CONV = {"Conv", "ConvInteger", "FusedConv", "QLinearConv"}


def _session(path, profile_dir=None, optimize=True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if profile_dir:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(profile_dir) / "profile")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _shape(entry):
    return next(iter(entry.values()))


def node_flops(op: str, inputs: list, outputs: list) -> float:
    """2 x multiply-adds of one node from its profiled input/output shapes."""
    if op in MATMUL or op == "Gemm":
        a, out = _shape(inputs[0]), _shape(outputs[0])
        k = a[-1] if len(a) >= 1 else 1
        return 2.0 * float(np.prod(out, dtype=np.float64)) * k
    if op in CONV:
        w, out = _shape(inputs[1]), _shape(outputs[0])
        # out [N, Cout, *spatial], weight [Cout, Cin/groups, *kernel]
        return 2.0 * float(np.prod(out, dtype=np.float64)) * float(np.prod(w[1:], dtype=np.float64))
    return 0.0


def graph_flops(path: Path, feeds: dict[str, np.ndarray]) -> dict:
    """FLOPs of one run of the graph on `feeds` (profiled, optimisations off), by op type."""
    with tempfile.TemporaryDirectory() as tmp:
        s = _session(path, tmp, optimize=False)
        names = [i.name for i in s.get_inputs()]
        s.run(None, {k: feeds[k] for k in names})
        events = json.loads(Path(s.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        args = e.get("args", {})
        f = node_flops(args.get("op_name", ""), args.get("input_type_shape", []),
                       args.get("output_type_shape", []))
        if f:
            by_op[args["op_name"]] = by_op.get(args["op_name"], 0.0) + f
    return {"flops": sum(by_op.values()), "by_op": by_op}


def unit_feeds(bundle, model: str, graph: str) -> tuple[dict, str]:
    """Batch-1 inputs for a graph (the golden inputs' first item) and what one unit is."""
    from sdrun.apps.check import golden_cases

    entry = bundle.model(model)
    cases = golden_cases(bundle.arrays(entry["golden_file"]))
    io = cases.get(("image", graph)) or cases[next(k for k in cases if k[1] == graph)]
    feeds = {k: np.ascontiguousarray(v[:1]) for k, v in io["in"].items()}
    unit = {"text": "prompt", "pair": "pair", "visual": "crop"}.get(graph, "image")
    return feeds, unit


def bundle_flops(bundle_dir: Path, log=print) -> dict:
    """{model/graph: {"gflop": per unit, "unit": ..., "by_op": {...}}} of a bundle."""
    from sdrun.bundle.bundle import Bundle

    bundle = Bundle.load(bundle_dir, verify=False)
    out = {}
    for model, entry in bundle.models.items():
        for graph, g in entry["graphs"].items():
            feeds, unit = unit_feeds(bundle, model, graph)
            t0 = time.perf_counter()
            r = graph_flops(bundle.path(g["file"]), feeds)
            out[f"{model}/{graph}"] = {"gflop": r["flops"] / 1e9, "unit": unit, "file": g["file"],
                                       "by_op_gflop": {k: v / 1e9 for k, v in r["by_op"].items()}}
            log(f"  [flops] {model}/{graph}: {r['flops'] / 1e9:.2f} GFLOP per {unit} "
                f"({time.perf_counter() - t0:.0f} s to count)")
    return out


def measured_peak(n: int = 2048, repeats: int = 5) -> dict:
    """GFLOP/s of onnxruntime's fp32 MatMul and int8 MatMulInteger on n^3 (median of repeats)."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    res = {}
    for kind in ("fp32", "int8"):
        if kind == "fp32":
            node = helper.make_node("MatMul", ["A", "B"], ["Y"])
            ins = [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n]),
                   helper.make_tensor_value_info("B", TensorProto.FLOAT, [n, n])]
            outs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [n, n])]
            feeds = {"A": rng.standard_normal((n, n), dtype=np.float32),
                     "B": rng.standard_normal((n, n), dtype=np.float32)}
        else:
            node = helper.make_node("MatMulInteger", ["A", "B"], ["Y"])
            ins = [helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n]),
                   helper.make_tensor_value_info("B", TensorProto.INT8, [n, n])]
            outs = [helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])]
            feeds = {"A": rng.integers(0, 255, (n, n), dtype=np.uint8),
                     "B": rng.integers(-127, 127, (n, n), dtype=np.int8)}
        model = helper.make_model(helper.make_graph([node], "peak", ins, outs),
                                  opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "peak.onnx"
            onnx.save(model, str(p))
            s = _session(p)
            s.run(None, feeds)
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                s.run(None, feeds)
                ts.append(time.perf_counter() - t0)
        res[kind] = 2.0 * n**3 / float(np.median(ts)) / 1e9
    return {"fp32_gflops": round(res["fp32"], 1), "int8_gops": round(res["int8"], 1),
            "method": f"onnxruntime MatMul / MatMulInteger {n}x{n}x{n}, {THREADS} threads, median of {repeats}"}


def _manifest_key(bundle_dir: Path) -> str:
    m = json.loads((Path(bundle_dir) / "manifest.json").read_text())
    files = sorted((g["file"], m["files"][g["file"]]["sha256"])
                   for e in m["models"].values() for g in e["graphs"].values())
    return json.dumps(files)


def load_or_count(bundle_dir: Path, out_dir: Path, log=print) -> dict:
    """flops_<bundle>.json from out_dir when it describes these graphs, else counted now."""
    path = Path(out_dir) / f"flops_{Path(bundle_dir).name}.json"
    key = _manifest_key(bundle_dir)
    graphs = None
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("graphs_key") == key:
                graphs = data["graphs"]
        except (ValueError, KeyError):
            pass
    # the graphs' FLOPs are cached; the peak is measured now (the machine's load changes)
    data = {"bundle": str(bundle_dir), "graphs_key": key,
            "graphs": graphs or bundle_flops(bundle_dir, log), "peak": measured_peak(),
            "machine": machine()}
    _write(out_dir, data)
    return data


def _write(out_dir: Path, data: dict) -> str:
    name = f"flops_{Path(data['bundle']).name}"
    rows = [[k, f"{v['gflop']:.2f}", v["unit"],
             ", ".join(f"{op} {g:.1f}" for op, g in sorted(v["by_op_gflop"].items(), key=lambda x: -x[1]))]
            for k, v in data["graphs"].items()]
    pk = data["peak"]
    md = (f"FLOPs per graph call of `{data['bundle']}` (MatMul/Gemm/Conv, 2 x multiply-adds, "
          "counted from onnxruntime's profiled shapes):\n\n"
          + md_table(["graph", "GFLOP", "per", "by op (GFLOP)"], rows, "lrll")
          + f"\n\nMeasured peak on this machine ({pk['method']}): fp32 {pk['fp32_gflops']:.0f} GFLOP/s, "
          f"int8 {pk['int8_gops']:.0f} GOP/s.\n")
    write_outputs(Path(out_dir), name, data, md)
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--recount", action="store_true", help="ignore a cached flops_<bundle>.json")
    args = ap.parse_args(argv)
    if args.recount:
        (args.out_dir / f"flops_{args.bundle.name}.json").unlink(missing_ok=True)
    data = load_or_count(args.bundle, args.out_dir)
    print(_write(args.out_dir, data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
