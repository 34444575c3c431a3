"""Grounding DINO int8: static (QDQ, calibrated) against dynamic quantisation, beside fp32.

    python benchmarks/int8_static.py --bundle engines/full [--calib 4] [--repeats 3]

The fp32 graph of an fp32 bundle is quantised twice, into a temporary folder:
- dynamic: what `sdexport build --precision int8` ships (sdexport.quantize.quantize_graph);
- static: onnxruntime `quantize_static`, QDQ format, min/max ranges calibrated on `--calib`
  synthetic images (never the real pairs it is judged on); only the MatMuls with a
  weight operand inside the Swin backbone and the encoder are quantised (uint8
  activations, int8 7-bit weights per channel, as the dynamic bundle); the deformable
  sampling, LayerNorms, attention products, decoder and heads stay fp32.

Then, interleaved on one 800x800 image (the golden "image" input, batch 1), seconds per
view for each; drift against the PyTorch fp32 golden outputs (relative L2 after slot
matching, as `sdrun check`); and the detections each gives on the real pairs' images and
synthetic ones: the label set at the bundle's Grounding DINO box threshold, compared with
fp32's. Writes int8_static_<bundle>.json/.md and prints the table last.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (first: thread settings)
from common import RESULTS, THREADS, machine, make_pairs, md_table, median, write_outputs

import numpy as np

QUANTISED_PARTS = ("/backbone/", "/model/model/encoder/")


def weight_matmuls(path: Path) -> list[str]:
    """Names of the MatMul nodes of the backbone and encoder whose second input is a weight."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in weights
            and any(p in n.name for p in QUANTISED_PARTS)]


def calibrate_ranges(path: Path, nodes: list[str], calib: list[dict], cache: Path) -> int:
    """Min/max of every input and output of `nodes` over the calibration feeds, written as
    onnxruntime's calibration cache. onnxruntime's own calibrator runs the graph with every
    optimisation off and peaks above 20 GB on the full Grounding DINO (killed here at 24 GB);
    this one adds ReduceMin/ReduceMax outputs to the optimised graph (~4 GB)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper
    from onnxruntime.quantization.calibrate import (
        CalibrationMethod,
        TensorsData,
        save_tensors_data,
    )

    model = onnx.load(str(path))
    weights = {t.name for t in model.graph.initializer}
    wanted = set(nodes)
    tensors = list(dict.fromkeys(t for n in model.graph.node if n.name in wanted
                                 for t in [*n.input, *n.output] if t and t not in weights))
    todo = set(tensors)

    def reductions(names):
        out = []
        for t in names:
            if t in todo:
                for op in ("ReduceMin", "ReduceMax"):
                    out.append(helper.make_node(op, [t], [f"{t}__{op}"], keepdims=0))
        return out

    # Each reduction right after its tensor's producer: onnxruntime runs nodes in this order,
    # and reductions at the end would keep every calibrated tensor alive (> 24 GB).
    nodes = reductions(i.name for i in model.graph.input)
    for n in model.graph.node:
        nodes += [n, *reductions(n.output)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    for t in tensors:
        for op in ("ReduceMin", "ReduceMax"):
            model.graph.output.append(
                helper.make_tensor_value_info(f"{t}__{op}", onnx.TensorProto.FLOAT, []))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.log_severity_level = 3
    s = ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                             providers=["CPUExecutionProvider"])
    del model
    names = [f"{t}__{op}" for t in tensors for op in ("ReduceMin", "ReduceMax")]
    lo = {t: np.inf for t in tensors}
    hi = {t: -np.inf for t in tensors}
    inputs = [i.name for i in s.get_inputs()]
    for feeds in calib:
        values = dict(zip(names, s.run(names, {k: feeds[k] for k in inputs})))
        for t in tensors:
            lo[t] = min(lo[t], float(values[f"{t}__ReduceMin"]))
            hi[t] = max(hi[t], float(values[f"{t}__ReduceMax"]))
    data = {t: (np.array(lo[t], np.float32), np.array(hi[t], np.float32)) for t in tensors}
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), cache)
    return len(tensors)


def quantize_static_graph(src: Path, dst: Path, calib: list[dict], log=print) -> dict:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".static-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        nodes = weight_matmuls(prepared)
        log(f"  static: {len(nodes)} MatMuls, calibrating on {len(calib)} images ...")
        cache = Path(tmp) / "ranges.json"
        n_tensors = calibrate_ranges(prepared, nodes, calib, cache)
        quantize_static(str(prepared), str(dst), None, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes,
                        per_channel=True, reduce_range=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        extra_options={"MatMulConstBOnly": True},
                        calibration_cache_path=str(cache))
    return {"nodes": len(nodes), "calibrated_tensors": n_tensors,
            "calibration_images": len(calib),
            "seconds": round(time.perf_counter() - t0, 1), "bytes": dst.stat().st_size}


def _call(queue, fn, args):
    queue.put(fn(*args))


def in_fresh_process(fn, *args):
    """fn(*args) in a spawned process, so that quantising and calibrating return all their
    memory before the timed sessions open."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_call, args=(queue, fn, args))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"static quantisation failed (exit code {proc.exitcode}; -9: out of memory)")
    return queue.get()


def session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def label_set(logits, boxes, token_labels, labels, thr) -> list[str]:
    from sdrun.stages.detect import gdino_detections

    _, _, found = gdino_detections(logits, boxes, token_labels, len(labels), thr)
    return sorted({labels[int(i)] for i in found})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True, help="an fp32 bundle with gdino")
    ap.add_argument("--calib", type=int, default=4, help="synthetic calibration images")
    ap.add_argument("--eval-synth", type=int, default=4, help="synthetic pairs for agreement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    from sdexport.quantize import quantize_graph
    from sdrun.apps.check import compare, match_slots
    from sdrun.apps.synth import make_pair, pair_rng
    from sdrun.bundle.bundle import Bundle
    from sdrun.stages.preprocess import gdino_pixels

    b = Bundle.load(args.bundle)
    gd = b.model("gdino")
    fp32 = b.root / gd["graphs"]["model"]["file"]
    text = {k: b.array(gd[f"{k}_file"]).astype(np.int64)
            for k in ("input_ids", "attention_mask", "token_type_ids")}
    token_labels, labels = b.array(gd["token_labels_file"]), b.vocabulary
    thr = b.params["gdino_box_thr"]

    def feeds_for(images):
        pixels, mask = gdino_pixels(images, gd["preprocess"])
        return {"pixel_values": pixels, "pixel_mask": mask,
                **{k: np.repeat(v, len(images), 0) for k, v in text.items()}}

    calib = [feeds_for([make_pair(pair_rng(1000, i), size=(480, 640))[i % 2]])
             for i in range(args.calib)]
    golden = np.load(b.root / gd["golden_file"])
    g_in = {k.split("__")[-1]: golden[k] for k in golden.files if k.startswith("image__model__in__")}
    g_out = {k.split("__")[-1]: golden[k] for k in golden.files if k.startswith("image__model__out__")}

    report = {"benchmark": "int8_static", "bundle": str(args.bundle), "machine": machine(),
              "threads": THREADS, "variants": {}}
    with tempfile.TemporaryDirectory(dir=args.bundle.parent, prefix=".int8-static-") as tmp:
        paths = {"fp32": fp32, "dynamic": Path(tmp) / "dynamic.onnx",
                 "static": Path(tmp) / "static.onnx"}
        print("[dynamic] quantising ...", flush=True)
        report["variants"]["dynamic"] = {"quantization": quantize_graph(fp32, paths["dynamic"])}
        print("[static] quantising ...", flush=True)
        report["variants"]["static"] = {"quantization": in_fresh_process(
            quantize_static_graph, fp32, paths["static"], calib)}
        report["variants"]["fp32"] = {"quantization": None}
        sessions = {k: session(p) for k, p in paths.items()}
        names = [i.name for i in sessions["fp32"].get_inputs()]
        feed = {k: g_in[k] for k in names}
        times = {k: [] for k in sessions}
        for s in sessions.values():
            s.run(None, feed)  # warm-up
        for _ in range(args.repeats):
            for k, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, feed)
                times[k].append(time.perf_counter() - t0)
        for k, s in sessions.items():
            run = dict(zip(["logits", "pred_boxes"], s.run(None, feed)))
            run, moved = match_slots(run, g_out, ["logits", "pred_boxes"])
            v = report["variants"][k]
            v["s_per_view"] = median(times[k])
            v["times"] = times[k]
            v["drift"] = {o: dict(zip(("max_abs", "rel_l2", "note"), compare(run[o], g_out[o])))
                          for o in ("logits", "pred_boxes")}
            v["slots_moved"] = moved

        images = [(f"{pid}/{side}", img) for pid, a, bb in make_pairs(2 + args.eval_synth)
                  for side, img in (("a", a), ("b", bb))]
        agree = {k: 0 for k in sessions}
        per_image = []
        for name, img in images:
            f = feeds_for([img])
            sets = {}
            for k, s in sessions.items():
                lo, bo = s.run(None, {i.name: f[i.name] for i in s.get_inputs()})
                sets[k] = label_set(lo[0], bo[0], token_labels, labels, thr)
            per_image.append({"image": name, **sets})
            for k in sessions:
                agree[k] += sets[k] == sets["fp32"]
        report["label_sets"] = per_image
        for k in sessions:
            report["variants"][k]["label_sets_equal_fp32"] = f"{agree[k]}/{len(images)}"
            real = [r for r in per_image if r["image"].startswith("real")]
            report["variants"][k]["real_equal_fp32"] = (
                f"{sum(r[k] == r['fp32'] for r in real)}/{len(real)}")

    v = report["variants"]
    rows = []
    for k in ("fp32", "dynamic", "static"):
        d = v[k]["drift"]
        q = v[k]["quantization"] or {}
        rows.append([k, f"{v[k]['s_per_view']:.2f}", f"{v['fp32']['s_per_view'] / v[k]['s_per_view']:.2f}x",
                     f"{d['logits']['rel_l2']:.4f}", f"{d['pred_boxes']['rel_l2']:.4f}",
                     v[k]["real_equal_fp32"], v[k]["label_sets_equal_fp32"],
                     f"{(q.get('int8_bytes') or q.get('bytes') or fp32.stat().st_size) / 1e6:.0f}"])
    m = report["machine"]
    md = (f"### Grounding DINO int8: static (QDQ) vs dynamic quantisation ({args.bundle.name})\n\n"
          f"{m.get('cpu')}, {THREADS} threads, {m.get('date')}. One 800x800 view (batch 1), "
          f"median of {args.repeats} interleaved runs. Static: {v['static']['quantization']['nodes']} "
          f"backbone/encoder weight MatMuls in QDQ, MinMax calibration on {args.calib} synthetic "
          "images. Drift: relative L2 against the PyTorch fp32 golden outputs after slot "
          "matching. Label sets: labels found at the bundle's gdino_box_thr, per image, equal "
          "to fp32's.\n\n"
          + md_table(["variant", "s/view", "vs fp32", "logits rel-L2", "boxes rel-L2",
                      "real images = fp32", "all images = fp32", "MB"], rows, "lrrrrrrr") + "\n")
    write_outputs(args.out_dir, f"int8_static_{args.bundle.name}", report, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
