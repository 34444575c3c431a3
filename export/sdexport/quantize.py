"""int8 bundles: onnxruntime dynamic quantisation of a bundle's large graphs.

    sdexport build --preset full-random --precision int8 --out engines/full-int8
    python -m sdexport.quantize engines/full engines/full-int8     # from a built fp32 bundle

Every graph is first prepared with `quant_pre_process(..., skip_symbolic_shape=True)`
(onnxruntime's symbolic shape inference fails on these graphs; FACTS.md), then its
MatMul/Gemm weights become int8 with `quantize_dynamic` (activations are quantised per
call, at run time). Graphs are written next to the fp32 names, e.g.
`owlvit/image.int8.onnx`; the fp32 graphs are not kept in an int8 bundle.

The golden samples stay the PyTorch fp32 outputs recorded at build time: an int8 bundle
is checked against PyTorch fp32, with its own, wider tolerances (measured drift with a
margin, `INT8_TOLERANCE`), which the manifest records per graph as
`graphs.<g>.tolerance` next to `precision: int8`.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from sdrun.backends.cpu import cpu_info, int8_kernel, isa_summary
from sdrun.bundle.bundle import MANIFEST, bundle_files, sha256_file
from sdrun.files import (
    atomic_write,
    check_output_folder,
    check_output_paths,
    replace_folder,
)

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8")

# Weights QInt8 per output channel, 7-bit ("reduce_range"): AVX2 and AVX-512 CPUs without
# VNNI add u8*s8 products pairwise in saturating int16, which clips 8-bit weights (the tiny
# bundle drifted rel-L2 1.2 there instead of 0.02; sdrun/backends/cpu.py). With |w| <= 64 every
# x86 kernel is exact, so one bundle gives the same integers on every CPU, at the same speed.
# On this Xeon (AVX512-VNNI) QInt8 ran 1.5x faster than
# QUInt8 and per-channel drifted less than per-tensor at the same speed (OWL-ViT image graph:
# fp32 2.1 s, QUInt8 1.3 s, QInt8 0.89 s, QInt8 per channel 0.83 s on a loaded machine).
WEIGHT_TYPE = "qint8"
PER_CHANNEL = True
REDUCE_RANGE = True

# Which ops get int8 weights. Conv stays fp32: onnxruntime's ConvInteger is slower than its
# fp32 Conv on CPU, and the only Convs here are the patch embeddings (a few % of the FLOPs).
OP_TYPES = ["MatMul", "Gemm"]

# Measured drift (relative L2 against PyTorch fp32 on the golden samples of the tiny-random
# and full-random bundles, 7-bit QInt8 weights per channel) with a ~2x margin; keyed
# (model, graph). 7-bit weights have twice the quantisation step of 8-bit ones, and drift
# up to 3x more (Siamese logits: 0.05 -> 0.16 tiny, 0.08 -> 0.22 full); in exchange the
# integers are the same on every CPU, so these hold on AVX2, AVX-512 and VNNI alike.
# Grounding DINO's two-stage top-k re-ranks its proposals on the drifted encoder scores
# (nearly every slot moves; the check pairs slots up again), so its drift is large; the
# Siamese logit is 1-3 numbers near 0 (random head), where a relative error is fragile.
INT8_TOLERANCE = {
    ("owlvit", "image"): 0.1,    # measured <= 0.037 (full), 0.027 (tiny)
    ("owlvit", "text"): 0.1,     # measured <= 0.054 (full), 0.028 (tiny)
    ("gdino", "model"): 0.4,     # measured <= 0.094 (full), 0.202 (tiny), after slot matching
    ("siamese", "pair"): 0.5,    # measured <= 0.223 (full), 0.163 (tiny): the change logit
    ("clip", "visual"): 0.05,    # measured <= 0.023 (full), 0.013 (tiny)
}
DEFAULT_INT8_TOLERANCE = 0.1


def int8_name(rel: str) -> str:
    """owlvit/image.onnx -> owlvit/image.int8.onnx"""
    stem, dot, ext = rel.rpartition(".")
    return f"{stem}.int8.{ext}" if dot else f"{rel}.int8"


def quantize_graph(src: str | Path, dst: str | Path, weight_type: str = WEIGHT_TYPE,
                   per_channel: bool = PER_CHANNEL, reduce_range: bool = REDUCE_RANGE,
                   op_types: list[str] | None = None, exclude: str | None = None) -> dict:
    """One fp32 ONNX graph -> a dynamically quantised one; nodes whose name matches the
    regular expression `exclude` stay fp32. Returns what was done."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src), Path(dst)
    wtype = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}[weight_type.lower()]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        excluded = _matching_nodes(prepared, exclude) if exclude else []
        quantize_dynamic(str(prepared), str(dst), op_types_to_quantize=op_types or OP_TYPES,
                         per_channel=per_channel, reduce_range=reduce_range, weight_type=wtype,
                         nodes_to_exclude=excluded, extra_options={"MatMulConstBOnly": True})
    return {"weight_type": weight_type.lower(), "per_channel": per_channel,
            "reduce_range": reduce_range, "op_types": list(op_types or OP_TYPES),
            "max_abs_weight": max_abs_int8_weight(dst),
            "exclude": exclude, "excluded_nodes": len(excluded),
            "fp32_bytes": src.stat().st_size, "int8_bytes": dst.stat().st_size,
            "seconds": round(time.perf_counter() - t0, 1)}


def max_abs_int8_weight(path: str | Path) -> int:
    """The largest |value| among a graph's int8 initializers (its quantised weights)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    peaks = [int(np.abs(numpy_helper.to_array(t).astype(np.int16)).max())
             for t in model.graph.initializer
             if t.data_type == onnx.TensorProto.INT8 and np.prod(t.dims) > 0]
    return max(peaks, default=0)


def _matching_nodes(path: Path, pattern: str) -> list[str]:
    import re

    import onnx

    rx = re.compile(pattern)
    model = onnx.load(str(path), load_external_data=False)
    return [n.name for n in model.graph.node if rx.search(n.name)]


def quantize_bundle_dir(root: str | Path, log: Callable[[str], None] = logger.info,
                        weight_type: str = WEIGHT_TYPE, per_channel: bool = PER_CHANNEL,
                        reduce_range: bool = REDUCE_RANGE, keep_fp32: bool = False) -> dict:
    """Quantise every graph of the bundle folder `root` in place and rewrite its manifest:
    graph entries name the int8 files, `precision: int8`, per-graph int8 tolerances.
    The fp32 graphs are removed unless `keep_fp32`."""
    root = Path(root)
    mpath = root / MANIFEST
    manifest = json.loads(mpath.read_text())
    if manifest.get("precision", "fp32") != "fp32":
        raise ValueError(f"{root}: already {manifest['precision']}")
    report = {}
    for model, entry in manifest["models"].items():
        for graph, g in entry["graphs"].items():
            rel = g["file"]
            out_rel = int8_name(rel)
            log(f"[{model}/{graph}] int8 ({weight_type}{', per channel' if per_channel else ''}) ...")
            info = quantize_graph(root / rel, root / out_rel, weight_type=weight_type,
                                  per_channel=per_channel, reduce_range=reduce_range)
            log(f"  {rel} {info['fp32_bytes'] / 1e6:.0f} MB -> {out_rel} "
                f"{info['int8_bytes'] / 1e6:.0f} MB in {info['seconds']:.0f} s")
            g["file"] = out_rel
            g["precision"] = "int8"
            g["quantization"] = {"method": "onnxruntime.quantization.quantize_dynamic", **{
                k: info[k] for k in ("weight_type", "per_channel", "reduce_range", "op_types",
                                     "max_abs_weight")}}
            g["tolerance"] = {"rel_l2": INT8_TOLERANCE.get((model, graph), DEFAULT_INT8_TOLERANCE),
                              "reference": "PyTorch fp32 golden outputs"}
            if keep_fp32:
                g["fp32_file"] = rel
            else:
                os.remove(root / rel)
                manifest["files"].pop(rel, None)
            p = root / out_rel
            manifest["files"][out_rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            report[f"{model}/{graph}"] = info
    manifest["precision"] = "int8"
    manifest.setdefault("build", {})["quantized_on"] = {
        "cpu": cpu_info().get("model", platform.machine()), "isa": isa_summary(),
        "int8_kernel": int8_kernel()}
    manifest["build"]["quantization"] = {
        k: {kk: vv for kk, vv in v.items() if kk not in ("exclude",)} for k, v in report.items()}
    atomic_write(mpath, json.dumps(manifest, indent=2) + "\n")
    return report


def quantize_bundle(src: str | Path, out: str | Path, log: Callable[[str], None] = logger.info,
                    **kwargs) -> Path:
    """A copy of the fp32 bundle `src` at `out` with int8 graphs (hard links for the files
    that stay the same where the file system allows)."""
    src, out = Path(src), Path(out)
    if not (src / MANIFEST).is_file():
        raise FileNotFoundError(f"{src}: not a bundle (no {MANIFEST})")
    inputs = [("the fp32 bundle", src)]
    check_output_paths({"--out": out}, protected_dirs=inputs)
    check_output_folder(out, "--out", owned=bundle_files, inputs=inputs,
                        hint=" (a bundle quantised before is replaced)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.quantizing-")) / "bundle"

    def link_or_copy(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    manifest = json.loads((src / MANIFEST).read_text())
    graphs = {g["file"] for e in manifest["models"].values() for g in e["graphs"].values()}
    shutil.copytree(src, staging, copy_function=link_or_copy,
                    ignore=lambda d, names: [n for n in names
                                             if (Path(d) / n).relative_to(src).as_posix() in graphs])
    (staging / MANIFEST).unlink()
    shutil.copy2(src / MANIFEST, staging / MANIFEST)
    for rel in graphs:  # quantize_bundle_dir reads the fp32 graph from the staging folder
        link_or_copy(src / rel, staging / rel)
    try:
        quantize_bundle_dir(staging, log=log, **kwargs)
        from .memory import record_graph_memory

        record_graph_memory(staging, log=log)
    except BaseException:
        shutil.rmtree(staging.parent, ignore_errors=True)
        raise
    replace_folder(staging, out, owned=bundle_files, inputs=inputs)
    shutil.rmtree(staging.parent, ignore_errors=True)
    return out


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Write an int8 copy of an fp32 bundle, then check it.")
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--weight-type", default=WEIGHT_TYPE, choices=["qint8", "quint8"])
    ap.add_argument("--per-tensor", action="store_true", help="one scale per weight tensor")
    ap.add_argument("--full-range", action="store_true",
                    help="8-bit weights instead of 7-bit (exact only on VNNI/aarch64 CPUs)")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args(argv)
    out = quantize_bundle(args.src, args.out, weight_type=args.weight_type,
                          per_channel=not args.per_tensor, reduce_range=not args.full_range)
    print(f"int8 bundle written to {out}")
    if not args.no_check:
        from .verify import verify

        failures = verify(out)
        if failures:
            print(f"{failures} output(s) out of tolerance")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
