"""Shared pieces of the benchmark scripts: fair-threading environment, the machine, the
pairs, the contenders, stage timing, statistics and the output files.

Import this module FIRST in a benchmark script (before numpy/torch/onnxruntime): it sets
`OMP_WAIT_POLICY=PASSIVE` and the thread counts, which OpenMP reads once, at start-up.
"""
from __future__ import annotations

import os

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
# OpenMP (PyTorch's intra-op pool) spin-waits after each parallel region by default; on
# shared cores that steals time from everything else (FACTS.md: up to 12x slower).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
os.environ.setdefault("MKL_NUM_THREADS", str(THREADS))
os.environ.setdefault("OPENBLAS_NUM_THREADS", str(THREADS))
os.environ.setdefault("SDRUN_THREADS", str(THREADS))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import contextlib
import functools
import json
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REAL_PAIRS = ROOT.parent / "shared" / "data" / "octwave" / "pairs"
REAL_IDS = ("31795", "35333")
RESULTS = ROOT / "benchmarks" / "results"

FAIRNESS_NOTE = (f"{THREADS} threads for every contender (torch.set_num_threads({THREADS}); "
                 f"onnxruntime intra_op_num_threads={THREADS} with session.intra_op.allow_spinning=0); "
                 "OMP_WAIT_POLICY=PASSIVE set before torch is imported; contenders interleaved "
                 "(A B C A B C ...) after a warm-up pair, on the same pairs.")


# ---- the machine ---------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> dict:
    from sdrun.backends.cpu import cpu_info, int8_kernel, isa_summary

    cpu = cpu_info().get("model") or platform.processor() or platform.machine()
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    info = {"cpu": cpu, "isa": isa_summary(), "int8_kernel": int8_kernel(),
            "cpus": os.cpu_count(), "memory_gib": mem, "threads": THREADS,
            "python": platform.python_version(), "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}
    import importlib.metadata as md

    for dist in ("onnxruntime", "onnxruntime-gpu", "torch", "transformers", "numpy"):
        try:
            info[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


# ---- the pairs -----------------------------------------------------------------------------

def make_pairs(n: int, seed: int = 0, real: bool = True) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The two real pairs first (when ../shared/data is there), then synthetic 224x224 pairs."""
    from sdrun.apps.synth import make_pair, pair_rng
    from sdrun.stages.images import load_image

    pairs = []
    if real:
        for pid in REAL_IDS:
            a, b = REAL_PAIRS / f"{pid}_1.png", REAL_PAIRS / f"{pid}_2.png"
            if len(pairs) < n and a.is_file() and b.is_file():
                pairs.append((f"real-{pid}", load_image(a), load_image(b)))
    i = 0
    while len(pairs) < n:
        a, b, _, _ = make_pair(pair_rng(seed, i), size=(224, 224))
        pairs.append((f"synth-{seed}-{i}", a, b))
        i += 1
    return pairs


# ---- stage timing --------------------------------------------------------------------------

class StageTimer:
    """Exclusive wall time per stage: a stage's time excludes the stages nested inside it.

    `with timer.stage("CLIP"): ...` or functions wrapped with `timer.wrap(fn, "CLIP")`.
    Only records while `timer.recording()` is active."""

    def __init__(self):
        self.times: dict[str, float] | None = None
        self.calls: dict[str, int] = {}
        self._stack: list[list] = []  # [name, start, child_time]

    @contextlib.contextmanager
    def recording(self):
        self.times, self.calls, self._stack = {}, {}, []
        try:
            yield self.times
        finally:
            self.times_done, self.times = self.times, None

    @contextlib.contextmanager
    def stage(self, name: str):
        if self.times is None:
            yield
            return
        frame = [name, time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            total = time.perf_counter() - frame[1]
            if self.times is not None:
                self.times[name] = self.times.get(name, 0.0) + total - frame[2]
                self.calls[name] = self.calls.get(name, 0) + 1
            if self._stack:
                self._stack[-1][2] += total

    def wrap(self, fn, name: str):
        if getattr(fn, "_stage_wrapped", None) is self:
            return fn

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with self.stage(name):
                return fn(*args, **kwargs)

        wrapper._stage_wrapped = self
        return wrapper


TIMER = StageTimer()

# sdrun's model-free stages, by module function (the pipeline calls them through their
# modules, so wrapping the module attribute times them; names that a restructured
# pipeline no longer has are skipped).
SDRUN_FUNCTIONS = {
    "sdrun.stages.preprocess": {"preprocess": ["owlvit_pixels", "gdino_pixels", "siamese_pixels",
                                        "clip_crops", "hflip"]},
    "sdrun.stages.detect": {"decode": ["owlvit_detections", "gdino_detections", "unflip"]},
    "sdrun.stages.fusion": {"WBF": ["weighted_boxes_fusion"]},
    "sdrun.pipeline": {"WBF": ["weighted_boxes_fusion"], "matching": ["match_objects"]},
    "sdrun.stages.heatmap": {"heat fusion": ["upsample_heat", "hot_share", "fuse_scores", "change_score"]},
    "sdrun.stages.matching": {"matching": ["match_objects"]},
}
MODEL_STAGES = {"owlvit": "OWL-ViT", "gdino": "Grounding DINO", "siamese": "Siamese",
                "clip": "CLIP"}  # the bundle's model name -> its stage
STAGE_ORDER = ["preprocess", "OWL-ViT", "Grounding DINO", "decode", "WBF", "Siamese",
               "heat fusion", "CLIP", "matching", "other"]


def instrument_sdrun_modules(timer: StageTimer = TIMER) -> None:
    import importlib

    for modname, stages in SDRUN_FUNCTIONS.items():
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        for stage, names in stages.items():
            for name in names:
                fn = getattr(mod, name, None)
                if callable(fn):
                    setattr(mod, name, timer.wrap(fn, stage))


def instrument_pipeline(pipe, timer: StageTimer = TIMER) -> None:
    """Time every onnxruntime model call of an sdrun Pipeline under its model's stage."""
    for name, stage in MODEL_STAGES.items():
        adapter = pipe.models.get(name)
        if adapter is not None:
            adapter.graph.run = timer.wrap(adapter.graph.run, stage)


def instrument_reference(ref, timer: StageTimer = TIMER) -> None:
    """Time the seed-style reference's stages from outside: model forwards, its per-image
    detector functions (their exclusive time: HF processors and post-processing) and CLIP."""
    import ensemble_boxes

    ref.owl.forward = timer.wrap(ref.owl.forward, "OWL-ViT")
    if ref.gd is not None:
        ref.gd.forward = timer.wrap(ref.gd.forward, "Grounding DINO")
    ref.siamese.forward = timer.wrap(ref.siamese.forward, "Siamese")
    ref.clip.encode_image = timer.wrap(ref.clip.encode_image, "CLIP")
    for name in ("owlvit", "gdino", "heat", "clip_embed"):
        setattr(ref, name, timer.wrap(getattr(ref, name), "preprocess"))
    for name in ("upsample", "hot_share"):
        setattr(ref, name, timer.wrap(getattr(ref, name), "heat fusion"))
    ensemble_boxes.weighted_boxes_fusion = timer.wrap(ensemble_boxes.weighted_boxes_fusion, "WBF")


# ---- contenders ----------------------------------------------------------------------------

def answer_of(result, labels: list[str]) -> dict:
    """A contender's answer for one pair in one form: label sets, kept objects per image
    (box in pixels, label index, detector score, fused score), change logit."""
    if isinstance(result, dict):  # the PyTorch pipelines
        objects = []
        for k in (0, 1):
            for box, label, s, f in zip(result["boxes"][k], result["labels"][k],
                                        result["scores"][k], result["fused"][k]):
                objects.append({"image": k + 1, "label": int(label),
                                "box": [round(float(v), 3) for v in box],
                                "score": round(float(s), 6), "fused": round(float(f), 6)})
        return {"added": list(result["added"]), "removed": list(result["removed"]),
                "changed": list(result["changed"]), "objects": objects,
                "change_logit": float(result["change_logit"])}
    objects = [{"image": o["image"], "label": labels.index(o["label"]), "box": o["box"],
                "score": o["score"], "fused": o["fused_score"]} for o in result.objects]
    return {"added": list(result.added), "removed": list(result.removed),
            "changed": list(result.changed), "objects": objects,
            "change_logit": float(result.change_logit)}


def clip_calls(answer: dict, per_candidate_pair: bool) -> int:
    """How many crops CLIP embedded for this answer: every kept object once (sdrun, the
    optimised pipeline), or both crops of every same-label candidate pair (the seed)."""
    objs = answer["objects"]
    if not per_candidate_pair:
        return len(objs)
    la = [o["label"] for o in objs if o["image"] == 1]
    lb = [o["label"] for o in objs if o["image"] == 2]
    return 2 * sum(1 for x in la for y in lb if x == y)


class Contender:
    def __init__(self, name: str, run, describe: str, labels: list[str]):
        self.name, self._run, self.describe, self.labels = name, run, describe, labels

    def run(self, a, b) -> dict:
        return answer_of(self._run(a, b), self.labels)


CONTENDERS = ("reference", "torch", "sdrun-fp32", "sdrun-int8", "sdrun-ov32", "sdrun-bf16")
DESCRIBE = {
    "reference": "seed-style PyTorch reference (per image; prompts re-encoded per OWL-ViT call; "
                 "ensemble-boxes; CLIP on both crops of every candidate pair)",
    "torch": "optimised PyTorch (prompt embeddings once, fused TTA batch per detector, one "
             "Siamese call, one CLIP batch, inference_mode, sdrun's numpy post-processing)",
    "sdrun-fp32": "sdrun, onnxruntime, fp32 graphs",
    "sdrun-int8": "sdrun, onnxruntime, int8 graphs (dynamic quantisation)",
    "sdrun-ov32": "sdrun, OpenVINO f32 (--provider openvino:f32), fp32 graphs",
    "sdrun-bf16": "sdrun, OpenVINO bf16 (--provider openvino:bf16), fp32 graphs; f32 on a CPU "
                  "without avx512_bf16/AMX",
}
# sdrun contenders: (bundle: "fp32" or "int8", provider on a CPU run)
SDRUN_CONTENDERS = {"sdrun-fp32": ("fp32", "cpu"), "sdrun-int8": ("int8", "cpu"),
                    "sdrun-ov32": ("fp32", "openvino:f32"), "sdrun-bf16": ("fp32", "openvino:bf16")}


def load_contenders(bundle: Path, int8: Path | None, which, timer: StageTimer = TIMER,
                    provider: str = "cpu", params: dict | None = None) -> tuple[list[Contender], dict]:
    """The contenders named in `which` (all with the same pipeline `params` overrides) and how
    long each took to load (s)."""
    loads, out = {}, []
    ref = None
    if "reference" in which or "torch" in which:
        import torch

        torch.set_num_threads(THREADS)
        from sdexport.reference import ReferencePipeline

        t0 = time.perf_counter()
        ref = ReferencePipeline(bundle, params=params)
        if provider == "cuda":
            ref.to("cuda")
        loads["reference"] = time.perf_counter() - t0
    if "torch" in which:
        from sdexport.reference_fast import FastPipeline

        t0 = time.perf_counter()
        fast = FastPipeline(share=ref, timer=timer)  # the same model objects, no second copy
        loads["torch"] = time.perf_counter() - t0
        out.append(Contender("torch", fast.diff, DESCRIBE["torch"], ref.labels))
    if "reference" in which:
        instrument_reference(ref, timer)
        out.append(Contender("reference", ref.diff, DESCRIBE["reference"], ref.labels))
    instrument_sdrun_modules(timer)
    from sdrun.pipeline import Pipeline

    for name, (kind, cpu_provider) in SDRUN_CONTENDERS.items():
        path = bundle if kind == "fp32" else int8
        if name not in which or path is None:
            continue
        if provider != "cpu" and cpu_provider != "cpu":
            raise SystemExit(f"{name} runs on the CPU (OpenVINO); leave it out of a --provider {provider} run")
        t0 = time.perf_counter()
        pipe = Pipeline.load(path, provider=provider if cpu_provider == "cpu" else cpu_provider,
                             threads=THREADS, params=params).open_sessions()
        loads[name] = time.perf_counter() - t0
        instrument_pipeline(pipe, timer)
        out.append(Contender(name, pipe.diff, DESCRIBE[name], list(pipe.labels)))
    order = {n: i for i, n in enumerate(which)}
    out.sort(key=lambda c: order[c.name])
    return out, loads


def parse_params(items: list[str] | None) -> dict:
    """--param KEY=VALUE (repeatable) -> checked values, as `sdrun --param` reads them."""
    from sdrun.bundle.params import ParamError, parse_overrides

    try:
        return parse_overrides(items or [])
    except ParamError as e:
        raise SystemExit(str(e)) from None


PARAM_HELP = ("pipeline parameter override for every contender, KEY=VALUE (repeatable), e.g. "
              "det_thr=0.999: random-weight bundles keep hundreds of objects per image at the "
              "default 0.25, and the seed reference runs CLIP on every same-label candidate pair")


def int8_bundle_for(bundle: Path, spec: str, log=print) -> Path | None:
    """--int8: a path, 'none', or 'auto' (`<bundle>-int8`, quantised from the bundle now
    if it is not there)."""
    if spec == "none":
        return None
    if spec != "auto":
        return Path(spec)
    path = bundle.parent / f"{bundle.name}-int8"
    if not (path / "manifest.json").is_file():
        from sdexport.quantize import quantize_bundle

        log(f"[int8] quantising {bundle} -> {path} (once) ...")
        quantize_bundle(bundle, path, log=lambda s: log("  " + s))
    return path


# ---- statistics ----------------------------------------------------------------------------

def summary(values) -> dict:
    v = np.asarray(list(values), np.float64)
    if not v.size:
        return {"n": 0}
    q1, q3 = np.percentile(v, [25, 75])
    return {"n": int(v.size), "median": float(np.median(v)), "min": float(v.min()),
            "max": float(v.max()), "q1": float(q1), "q3": float(q3), "mean": float(v.mean())}


def median(values):
    values = list(values)
    return statistics.median(values) if values else float("nan")


def fmt_s(x: float) -> str:
    if x != x:  # nan
        return "-"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 0.1:
        return f"{x:.2f}"
    return f"{x * 1000:.1f} ms"


# ---- output --------------------------------------------------------------------------------

def write_outputs(out_dir: Path, name: str, report: dict, markdown: str, plot=None) -> None:
    """`<name>.json`, `<name>.md` and (when plot is given) `<name>.png`; then print the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    (out_dir / f"{name}.md").write_text(markdown.rstrip() + "\n")
    if plot is not None:
        try:
            plot(out_dir / f"{name}.png")
        except Exception as e:  # a chart must not lose the numbers
            print(f"warning: no chart ({type(e).__name__}: {e})", file=sys.stderr)


def add_common_args(ap, pairs: int = 3, contenders: str | None = None) -> None:
    """The options every pipeline benchmark shares: the bundle, the pairs, the contenders,
    parameter overrides, the provider and where the results go."""
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--pairs", type=int, default=pairs, help="pairs (the 2 real ones first)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--synthetic-only", action="store_true", help="leave the 2 real pairs out")
    ap.add_argument("--contenders", default=contenders or ",".join(CONTENDERS))
    ap.add_argument("--int8", default="auto", help="int8 bundle: a path, 'auto' "
                    "(<bundle>-int8, made once if missing) or 'none'")
    ap.add_argument("--param", action="append", metavar="KEY=VALUE", help=PARAM_HELP)
    ap.add_argument("--provider", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: sdrun with onnxruntime's CUDA provider, PyTorch on the GPU")
    ap.add_argument("--name", help="output name (default <benchmark>_<bundle folder>)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)


def publish(args, benchmark: str, report: dict, markdown_fn, plot_fn=None) -> int:
    """Write `<name>.json/.md/.png` (name: --name or <benchmark>_<bundle folder>), print the
    table last; the exit status of a benchmark's main()."""
    md = markdown_fn(report)
    name = args.name or f"{benchmark}_{args.bundle.name}"
    write_outputs(args.out_dir, name, report, md, (lambda p: plot_fn(report, p)) if plot_fn else None)
    print(md)
    return 0


def save_partial(out_dir: Path, name: str, report: dict) -> None:
    """Raw numbers so far (a crash loses little)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def md_table(header: list[str], rows: list[list], align: str | None = None) -> str:
    align = align or ("l" + "r" * (len(header) - 1))
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def bundle_label(bundle: Path) -> str:
    try:
        m = json.loads((bundle / "manifest.json").read_text())
        models = "+".join(m["models"])
        return f"{bundle.name} ({models})"
    except (OSError, ValueError, KeyError):
        return bundle.name
