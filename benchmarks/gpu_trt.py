"""Measurements for benchmarks/gpu_trt.sh (issue 6), one subcommand per stage, each writing
one JSON file as soon as it is done:

    env       GPU, driver, versions; which backends import (tensorrt, cuda-python, CuPy,
              onnxruntime CUDA, torch CUDA)
    matmul    the GPU's measured bf16 matrix rate (torch.matmul, 8192^3, CUDA events)
    latency   per-pair latency, batch 1 and 8 pairs: TensorRT fp16 engines, onnxruntime CUDA,
              PyTorch eager fp32 and fp16 autocast (model forward, numpy in -> numpy out, as
              sdrun calls them), plus sdrun end to end for TensorRT and onnxruntime CUDA
    tflops    OWL-ViT and CLIP image encoders at batch 32 on TensorRT fp16 (and torch):
              FLOPs from torch's FlopCounterMode / time, against the matmul rate
    agree     label sets of sdrun on TensorRT fp16 vs an fp32 reference (onnxruntime CUDA,
              else TensorRT fp32 engines) on synthetic pairs

Run from the repository root with PYTHONPATH=runtime:export (no install needed).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

# items on the batch axis per image pair, as sdrun's pipeline calls the graphs
PER_PAIR = {("owlvit", "image"): 4, ("gdino", "model"): 4, ("siamese", "pair"): 1,
            ("clip", "visual"): 8}  # CLIP: about 8 kept crops per pair (both images)
GRAPHS = list(PER_PAIR)


def write(path: str, obj) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, p)
    print(f"wrote {p}", flush=True)


def timed(fn, min_s: float = 1.0, max_iter: int = 30, warmup: int = 3) -> dict:
    """Median wall time of fn() (which must synchronise) after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    t_end = time.perf_counter() + min_s
    while len(times) < 5 or (time.perf_counter() < t_end and len(times) < max_iter):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "n": len(times)}


# ---- env ------------------------------------------------------------------------------------
def cmd_env(a):
    out = {"python": platform.python_version(), "machine": platform.machine()}
    for mod in ("numpy", "onnxruntime", "onnx", "torch", "transformers", "timm", "open_clip",
                "tensorrt", "cupy"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
        except Exception as e:
            out[mod] = f"absent ({type(e).__name__}: {str(e)[:120]})"
    try:
        import importlib.metadata as md

        from cuda.bindings import runtime  # noqa: F401
        out["cuda-bindings"] = md.version("cuda-bindings")
    except Exception as e:
        out["cuda-bindings"] = f"absent ({e})"
    try:
        import onnxruntime as ort

        out["onnxruntime_providers"] = ort.get_available_providers()
    except Exception:
        pass
    try:
        import torch

        out["torch_cuda"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            out["gpu"] = {"name": p.name, "sm": f"sm{p.major}{p.minor}",
                          "memory_gb": round(p.total_memory / 2**30, 1),
                          "multiprocessors": p.multi_processor_count}
            out["torch_cuda_version"] = torch.version.cuda
            out["torch_allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
            out["torch_allow_tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    except Exception as e:
        out["torch_cuda"] = f"error {e}"
    try:
        from sdrun.backends.trt import current_key

        out["engine_key_fp16"] = current_key("fp16")
    except Exception as e:
        out["engine_key_fp16"] = f"unavailable: {e}"
    write(a.out, out)


# ---- matmul ---------------------------------------------------------------------------------
def cmd_matmul(a):
    import torch

    n = a.n
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        x @ y
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(a.iters):
        x @ y
    end.record()
    torch.cuda.synchronize()
    s = start.elapsed_time(end) / 1e3 / a.iters
    write(a.out, {"n": n, "dtype": "bfloat16", "seconds_per_matmul": s,
                  "tflops": 2 * n ** 3 / s / 1e12})


# ---- models and inputs --------------------------------------------------------------------------
def load_bundle(path):
    from sdrun.bundle.bundle import Bundle

    return Bundle.load(path, verify=False)


def graph_inputs(bundle, model, graph, n, seed=0):
    """Random float inputs of batch n shaped as the manifest says; ids/masks as sdrun feeds them."""
    rng = np.random.default_rng(seed)
    entry = bundle.model(model)
    feeds = {}
    for i in entry["graphs"][graph]["inputs"]:
        shape = [n] + [d for d in i["shape"][1:]]
        if i["dtype"].startswith("float"):
            feeds[i["name"]] = rng.standard_normal(shape, dtype=np.float32)
        elif i["name"] == "pixel_mask":
            feeds[i["name"]] = np.ones(shape, np.int64)
        else:  # the prompt's token arrays
            feeds[i["name"]] = np.repeat(bundle.array(entry[f"{i['name']}_file"]).astype(np.int64), n, 0)
    return feeds


def torch_module(root: Path, model: str):
    """The exported graph's PyTorch module, loaded from the random bundle's source/ folder."""
    from sdexport.context import BuildContext
    from sdexport.sources import Source

    m = json.loads((root / "manifest.json").read_text())
    ctx = BuildContext(vocabulary=m["vocabulary"], prompt_templates=m["prompt_templates"],
                       log=lambda s: None)
    src = Source(model, "local", str(root / "source" / model))
    if model == "owlvit":
        from sdexport.models import owlvit

        return owlvit.ImageGraph(owlvit.load_torch(src, ctx)[0]).eval()
    if model == "gdino":
        from sdexport.models import gdino

        return gdino.Detector(gdino.load_torch(src, ctx)[0]).eval()
    if model == "siamese":
        from sdexport.models import siamese

        return siamese.PairGraph(siamese.load_torch(src, ctx)[0]).eval()
    from sdexport.models import clip

    return clip.VisualGraph(clip.load_torch(src, ctx)[0]).eval()


class TorchRunner:
    """numpy in -> numpy out through a CUDA module, fp32 or fp16 autocast (as sdrun's sessions)."""

    def __init__(self, module, names, autocast: bool):
        import torch

        self.torch, self.module, self.names, self.autocast = torch, module.cuda(), names, autocast

    def run(self, feeds):
        torch = self.torch
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=self.autocast):
            args = [torch.from_numpy(feeds[k]).cuda(non_blocking=True) for k in self.names]
            out = self.module(*args)
        out = out if isinstance(out, (tuple, list)) else (out,)
        res = [o.float().cpu().numpy() for o in out]
        torch.cuda.synchronize()
        return res


def sessions(bundle, root, backend, model, graph):
    from sdrun.backends.session import open_graph

    if backend == "trt-fp16":
        return open_graph(bundle, model, graph, provider="tensorrt:fp16")
    if backend == "trt-fp32":
        return open_graph(bundle, model, graph, provider="tensorrt:fp32")
    if backend == "ort-cuda":
        return open_graph(bundle, model, graph, provider="cuda")
    names = [i["name"] for i in bundle.model(model)["graphs"][graph]["inputs"]]
    return TorchRunner(torch_module(root, model), names, autocast=backend == "torch-fp16")


# ---- latency ---------------------------------------------------------------------------------
def cmd_latency(a):
    root = Path(a.bundle)
    bundle = load_bundle(root)
    res = {"bundle": str(root), "per_pair": PER_PAIR_JSON(), "graphs": {}, "errors": {},
           "end_to_end": {}}
    graphs = [(m, g) for m, g in GRAPHS if bundle.has(m)]
    for backend in a.backends:
        for model, graph in graphs:
            name = f"{model}/{graph}"
            try:
                sess = sessions(bundle, root, backend, model, graph)
            except Exception as e:
                res["errors"][f"{backend} {name}"] = f"{type(e).__name__}: {str(e)[:300]}"
                continue
            for pairs in a.pairs:
                n = PER_PAIR[(model, graph)] * pairs
                feeds = graph_inputs(bundle, model, graph, n)
                try:
                    t = timed(lambda s=sess, f=feeds: s.run(f), min_s=a.min_s)
                except Exception as e:
                    res["errors"][f"{backend} {name} x{pairs}"] = f"{type(e).__name__}: {str(e)[:300]}"
                    continue
                res["graphs"].setdefault(backend, {}).setdefault(name, {})[str(pairs)] = {
                    **t, "batch": n, "per_pair_ms": t["median_ms"] / pairs}
                print(f"{backend:10} {name:14} {pairs} pair(s): {t['median_ms']:.2f} ms", flush=True)
            del sess
            write(a.out, res)
    # model time per pair, summed over the graphs each backend ran
    res["forward_per_pair_ms"] = {
        b: {p: sum(g[p]["per_pair_ms"] for g in gs.values() if p in g) for p in map(str, a.pairs)}
        for b, gs in res["graphs"].items()}
    write(a.out, res)
    # sdrun end to end (preprocessing, TTA, WBF, heatmaps, CLIP crops, matching included)
    if a.e2e_pairs:
        from sdrun import Pipeline
        from sdrun.apps.synth import write_synthetic_pairs

        data = Path(a.work) / "e2e_pairs"
        write_synthetic_pairs(data, a.e2e_pairs, seed=1)
        pairs = _any_pairs(data)
        for backend, provider in (("trt-fp16", "tensorrt:fp16"), ("ort-cuda", "cuda")):
            try:
                pipe = Pipeline.load(bundle, provider=provider)
            except Exception as e:
                res["errors"][f"e2e {backend}"] = f"{type(e).__name__}: {str(e)[:300]}"
                continue
            for bp in a.pairs:
                list(pipe.run(pairs[:bp], batch_pairs=bp))  # warm-up
                t0 = time.perf_counter()
                list(pipe.run(pairs, batch_pairs=bp))
                dt = time.perf_counter() - t0
                res["end_to_end"].setdefault(backend, {})[str(bp)] = 1e3 * dt / len(pairs)
                print(f"e2e {backend} batch {bp}: {1e3 * dt / len(pairs):.1f} ms/pair", flush=True)
            write(a.out, res)
        # PyTorch eager end to end, estimated: its model time + sdrun's non-model time
        fwd = res["forward_per_pair_ms"]
        e2e = res["end_to_end"]
        if "trt-fp16" in e2e and "trt-fp16" in fwd:
            for b in ("torch-fp32", "torch-fp16"):
                if b in fwd:
                    res["end_to_end"][f"{b} (estimated)"] = {
                        p: fwd[b][p] + max(e2e["trt-fp16"][p] - fwd["trt-fp16"][p], 0.0)
                        for p in e2e["trt-fp16"]}
    speed = {}
    for kind, table in (("forward", res["forward_per_pair_ms"]), ("end_to_end", res["end_to_end"])):
        base = table.get("torch-fp32") or table.get("torch-fp32 (estimated)")
        trt = table.get("trt-fp16")
        if base and trt:
            speed[kind] = {p: base[p] / trt[p] for p in trt if p in base and trt[p] > 0}
    res["speedup_trt_fp16_vs_torch_fp32"] = speed
    res["target"] = "TensorRT fp16 end to end >= 4x PyTorch eager fp32"
    write(a.out, res)


def _any_pairs(data):
    from sdrun.apps.dataset import list_pairs

    return [(p.pair_id, p.a, p.b) for p in list_pairs(data)]


def PER_PAIR_JSON():
    return {f"{m}/{g}": k for (m, g), k in PER_PAIR.items()}


# ---- tflops ------------------------------------------------------------------------------------
def cmd_tflops(a):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    root = Path(a.bundle)
    bundle = load_bundle(root)
    peak = json.loads(Path(a.matmul).read_text())["tflops"] if a.matmul else None
    res = {"batch": a.batch, "matmul_bf16_tflops": peak, "encoders": {}, "errors": {},
           "target": ">= 50% of the measured bf16 matrix rate at batch >= 32"}
    for model, graph in (("owlvit", "image"), ("clip", "visual")):
        name = f"{model}/{graph}"
        feeds = graph_inputs(bundle, model, graph, a.batch)
        names = [i["name"] for i in bundle.model(model)["graphs"][graph]["inputs"]]
        try:
            module = torch_module(root, model).cuda()
            with torch.no_grad(), FlopCounterMode(display=False) as fc:
                module(*[torch.from_numpy(feeds[k]).cuda() for k in names])
            flops = fc.get_total_flops()
        except Exception as e:
            res["errors"][name] = f"flop count: {type(e).__name__}: {str(e)[:300]}"
            continue
        entry = {"gflops_per_batch": flops / 1e9, "backends": {}}
        for backend in a.backends:
            try:
                sess = (TorchRunner(module, names, backend == "torch-fp16")
                        if backend.startswith("torch") else sessions(bundle, root, backend, model, graph))
                t = timed(lambda s=sess, f=feeds: s.run(f), min_s=a.min_s)
                # engine-only time: device-resident inputs would remove the copies; report both
                tf = flops / (t["median_ms"] / 1e3) / 1e12
                entry["backends"][backend] = {**t, "tflops": tf,
                                              "share_of_matmul_rate": (tf / peak) if peak else None}
                print(f"{name} {backend}: {t['median_ms']:.2f} ms, {tf:.1f} TFLOP/s", flush=True)
            except Exception as e:
                entry["backends"][backend] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        res["encoders"][name] = entry
        write(a.out, res)
    write(a.out, res)


# ---- agreement --------------------------------------------------------------------------------
def cmd_agree(a):
    from sdrun import Pipeline
    from sdrun.apps.synth import write_synthetic_pairs

    bundle = load_bundle(a.bundle)
    data = Path(a.work) / "agree_pairs"
    write_synthetic_pairs(data, a.pairs, seed=2)
    pairs = _any_pairs(data)
    res = {"pairs": len(pairs), "errors": {}}
    labels = {}
    for provider in ["tensorrt:fp16"] + a.ref:
        try:
            pipe = Pipeline.load(bundle, provider=provider)
            labels[provider] = [(tuple(r.added), tuple(r.removed), tuple(r.changed))
                                for r in pipe.run(pairs, batch_pairs=8)]
        except Exception as e:
            res["errors"][provider] = f"{type(e).__name__}: {str(e)[:300]}"
        if provider != "tensorrt:fp16" and provider in labels:
            res["reference"] = provider
            break
    if "reference" in res and "tensorrt:fp16" in labels:
        same = sum(x == y for x, y in zip(labels["tensorrt:fp16"], labels[res["reference"]]))
        res["identical"] = same
        res["identical_share"] = same / max(len(pairs), 1)
        res["target"] = (">= 99% of pairs identical to PyTorch fp32 (reference: fp32 graphs, "
                         "which `sdrun check` ties to PyTorch within 1e-5)")
    write(a.out, res)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("env")
    s.add_argument("--out", required=True)
    s = sub.add_parser("matmul")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=8192)
    s.add_argument("--iters", type=int, default=10)
    s = sub.add_parser("latency")
    s.add_argument("bundle")
    s.add_argument("--out", required=True)
    s.add_argument("--work", default="/tmp/gpu_trt")
    s.add_argument("--pairs", type=int, nargs="+", default=[1, 8])
    s.add_argument("--backends", nargs="+",
                   default=["trt-fp16", "ort-cuda", "torch-fp32", "torch-fp16"])
    s.add_argument("--e2e-pairs", type=int, default=16)
    s.add_argument("--min-s", type=float, default=0.5)
    s = sub.add_parser("tflops")
    s.add_argument("bundle")
    s.add_argument("--out", required=True)
    s.add_argument("--matmul")
    s.add_argument("--batch", type=int, default=32)
    s.add_argument("--backends", nargs="+", default=["trt-fp16", "torch-fp16"])
    s.add_argument("--min-s", type=float, default=0.5)
    s = sub.add_parser("agree")
    s.add_argument("bundle")
    s.add_argument("--out", required=True)
    s.add_argument("--work", default="/tmp/gpu_trt")
    s.add_argument("--pairs", type=int, default=64)
    s.add_argument("--ref", nargs="+", default=["cuda", "tensorrt:fp32"])
    a = p.parse_args(argv)
    try:
        {"env": cmd_env, "matmul": cmd_matmul, "latency": cmd_latency, "tflops": cmd_tflops,
         "agree": cmd_agree}[a.cmd](a)
    except Exception:
        traceback.print_exc()
        if getattr(a, "out", None):
            write(a.out + ".error.json", {"error": traceback.format_exc()[-3000:]})
        sys.exit(1)


if __name__ == "__main__":
    main()
