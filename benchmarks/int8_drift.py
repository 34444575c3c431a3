"""The int8 bundle's drift from PyTorch fp32 on the golden samples, per graph, with its sizes.

    python benchmarks/int8_drift.py --bundle engines/full-int8 [--fp32 engines/full]

Runs the golden check (`sdrun check`) of an int8 bundle (the references are the PyTorch
fp32 outputs recorded at build time) and tabulates, per graph, the largest relative L2
and max-abs difference of its outputs against the int8 tolerance the manifest records,
with the file sizes. Writes int8_drift_<bundle>.json/.md and prints the table last.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import common  # noqa: F401
from common import RESULTS, machine, md_table, write_outputs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True, help="an int8 bundle")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--name", help="output name (default int8_drift_<bundle folder>)")
    args = ap.parse_args(argv)
    from sdrun.apps.check import check_bundle
    from sdrun.bundle.bundle import Bundle

    b = Bundle.load(args.bundle)
    if b.manifest.get("precision") != "int8":
        raise SystemExit(f"{args.bundle}: not an int8 bundle (precision "
                         f"{b.manifest.get('precision', 'fp32')})")
    quant = b.manifest.get("build", {}).get("quantization", {})
    rows, graphs = [], {}
    for c in check_bundle(b):
        g = graphs.setdefault(f"{c.model}/{c.graph}", {"max_rel_l2": 0.0, "max_abs": 0.0, "ok": True,
                                                      "tolerance": c.tolerance, "outputs": {}})
        g["max_rel_l2"] = max(g["max_rel_l2"], c.rel_l2)
        g["max_abs"] = max(g["max_abs"], c.max_abs)
        g["ok"] = g["ok"] and c.ok
        g["outputs"][f"{c.case}/{c.output}"] = {"rel_l2": c.rel_l2, "max_abs": c.max_abs,
                                                "note": c.note}
    for name, g in graphs.items():
        q = quant.get(name, {})
        g.update({k: q.get(k) for k in ("fp32_bytes", "int8_bytes", "weight_type", "per_channel",
                                        "reduce_range", "max_abs_weight")})
        worst = max(g["outputs"].items(), key=lambda kv: kv[1]["rel_l2"])[0]
        rows.append([name, f"{g['max_rel_l2']:.3f} ({worst})", f"{g['max_abs']:.3g}",
                     f"{g['tolerance']:.2f}", "yes" if g["ok"] else "NO",
                     f"{(g['fp32_bytes'] or 0) / 1e6:.1f} -> {(g['int8_bytes'] or 0) / 1e6:.1f}"])
    report = {"benchmark": "int8_drift", "bundle": str(args.bundle), "machine": machine(),
              "graphs": graphs}
    m = report["machine"]
    md = (f"### int8 drift from PyTorch fp32 on the golden samples: {args.bundle}\n\n"
          f"{m['cpu']} ({m['isa']}; int8 kernel: {m['int8_kernel']}), {m['date']}. "
          "onnxruntime dynamic quantisation (MatMul/Gemm weights QInt8 per channel, "
          f"{'7-bit (reduce_range)' if all(q.get('reduce_range') for q in quant.values()) else '8-bit'}"
          ", activations quantised per call); every output compared with the PyTorch fp32 output recorded at "
          "build time (Grounding DINO after pairing its query slots).\n\n"
          + md_table(["graph", "max rel. L2 (output)", "max abs", "int8 tolerance", "ok", "MB fp32 -> int8"],
                     rows, "lrrrlr") + "\n")
    write_outputs(args.out_dir, args.name or f"int8_drift_{args.bundle.name}", report, md)
    print(md)
    return 0 if all(g["ok"] for g in graphs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
