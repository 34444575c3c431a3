"""Where Grounding DINO's time goes: onnxruntime (fp32, int8) against PyTorch, per part.

    python benchmarks/profile_gdino.py --bundle engines/full [--int8 engines/full-int8]

One 800x800 image (the golden "image" input, batch 1), the benchmarks' threads, a warm-up
call first. onnxruntime: its profiler's node times grouped by the part of the model a node
comes from (the ONNX node names keep the PyTorch module path: backbone, text_backbone,
encoder, decoder, ...) and by op type. PyTorch: the same parts timed with forward hooks.
Writes profile_gdino_<bundle>.json/.md and prints the table last.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (first: thread settings before torch)
from common import RESULTS, THREADS, machine, md_table, write_outputs

import numpy as np


def part_of(node_name: str) -> str:
    """The GroundingDinoModel child a node belongs to ("/model/model/encoder/..." -> encoder);
    the detection heads ("/model/class_embed...", "/model/bbox_embed...") are "heads"."""
    parts = [p for p in node_name.split("/") if p]
    if len(parts) >= 4 and parts[0] == "model" and parts[1] == "model":
        return parts[2].split(".")[0]
    if len(parts) >= 3 and parts[0] == "model" and parts[1] != "model":
        return "heads"
    return "other"


def ort_profile(path: Path, feeds: dict) -> dict:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = THREADS
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # as sdrun's own sessions (sdrun.backends.session): Swin's masked softmax makes
        # denormals, which without this cost ~1 s per view
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")
        opts.log_severity_level = 3
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "gd")
        s = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in s.get_inputs()]
        feeds = {k: feeds[k] for k in names}
        s.run(None, feeds)  # warm-up (profiled too; dropped below)
        t0 = time.perf_counter()
        s.run(None, feeds)
        wall = time.perf_counter() - t0
        events = json.loads(Path(s.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    start = runs[-1]["ts"] if runs else 0
    by_part, by_op = {}, {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < start:
            continue
        sec = e["dur"] / 1e6
        part = part_of(e["name"][: -len("_kernel_time")])
        op = e.get("args", {}).get("op_name", "?")
        by_part[part] = by_part.get(part, 0.0) + sec
        by_op[op] = by_op.get(op, 0.0) + sec
    return {"wall_s": wall, "by_part_s": by_part, "by_op_s": by_op}


def torch_profile(bundle_dir: Path, feeds: dict) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    from sdexport.context import BuildContext
    from sdexport.models import gdino as gdino_model
    from sdexport.sources import Source

    m = json.loads((bundle_dir / "manifest.json").read_text())
    ctx = BuildContext(vocabulary=m["vocabulary"], prompt_templates=m["prompt_templates"],
                       log=lambda s: None)
    model, _ = gdino_model.load_torch(Source("gdino", "local", str(bundle_dir / "source" / "gdino")), ctx)
    det = gdino_model.Detector(model).eval()
    args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in gdino_model.INPUT_NAMES]
    times: dict[str, float] = {}
    starts: dict[str, float] = {}

    def pre(name):
        def hook(mod, inp):
            starts[name] = time.perf_counter()
        return hook

    def post(name):
        def hook(mod, inp, out):
            times[name] = times.get(name, 0.0) + time.perf_counter() - starts[name]
        return hook

    for name, child in model.model.named_children():
        child.register_forward_pre_hook(pre(name))
        child.register_forward_hook(post(name))
    with torch.inference_mode():
        det(*args)  # warm-up
        times.clear()
        t0 = time.perf_counter()
        det(*args)
        wall = time.perf_counter() - t0
    # the decoder's hook also holds the heads it calls (class/bbox embeds are shared modules)
    times["other"] = max(0.0, wall - sum(times.values()))
    return {"wall_s": wall, "by_part_s": times}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--int8", type=Path, help="an int8 bundle of the same models")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--name", help="output name (default profile_gdino_<bundle folder>)")
    args = ap.parse_args(argv)
    from sdrun.apps.check import golden_cases
    from sdrun.bundle.bundle import Bundle

    b = Bundle.load(args.bundle, verify=False)
    entry = b.model("gdino")
    io = golden_cases(b.arrays(entry["golden_file"]))[("image", "model")]
    feeds = {k: np.ascontiguousarray(v[:1]) for k, v in io["in"].items()}
    report = {"benchmark": "profile_gdino", "bundle": str(args.bundle), "machine": machine(),
              "input": f"golden 'image' case, batch 1, {list(feeds['pixel_values'].shape)}"}
    report["onnxruntime_fp32"] = ort_profile(b.path(entry["graphs"]["model"]["file"]), feeds)
    if args.int8:
        b8 = Bundle.load(args.int8, verify=False)
        report["onnxruntime_int8"] = ort_profile(b8.path(b8.model("gdino")["graphs"]["model"]["file"]), feeds)
    report["torch"] = torch_profile(args.bundle, feeds)

    cols = [k for k in ("torch", "onnxruntime_fp32", "onnxruntime_int8") if k in report]
    parts = []
    for k in cols:
        for p in report[k]["by_part_s"]:
            if p not in parts:
                parts.append(p)
    parts.sort(key=lambda p: -report["onnxruntime_fp32"]["by_part_s"].get(p, 0.0))
    rows = [[p] + [f"{report[k]['by_part_s'].get(p, 0.0):.2f}" for k in cols] for p in parts]
    rows.append(["**wall**"] + [f"{report[k]['wall_s']:.2f}" for k in cols])
    ops = sorted(report["onnxruntime_fp32"]["by_op_s"].items(), key=lambda x: -x[1])[:10]
    oprows = [[op, f"{t:.2f}"] + ([f"{report['onnxruntime_int8']['by_op_s'].get(op, 0.0):.2f}"]
                                  if "onnxruntime_int8" in report else []) for op, t in ops]
    if "onnxruntime_int8" in report:
        extra = sorted(((op, t) for op, t in report["onnxruntime_int8"]["by_op_s"].items()
                        if op not in dict(ops)), key=lambda x: -x[1])[:5]
        oprows += [[op, "-", f"{t:.2f}"] for op, t in extra]
    m = report["machine"]
    md = (f"### Grounding DINO, one 800x800 image: where the time goes ({args.bundle})\n\n"
          f"{m['cpu']} ({m['isa']}), {THREADS} threads, {m['date']}; onnxruntime sessions "
          "set as sdrun's (no spinning, denormals as zero). Seconds per part of the model "
          "(onnxruntime: profiler node times summed by the module path kept in the node names; "
          "PyTorch: forward hooks on GroundingDinoModel's children).\n\n"
          + md_table(["part"] + cols, rows)
          + "\n\nonnxruntime, top op types (s):\n\n"
          + md_table(["op"] + [c for c in cols if c != "torch"], oprows) + "\n")
    write_outputs(args.out_dir, args.name or f"profile_gdino_{args.bundle.name}", report, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
