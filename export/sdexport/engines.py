"""`sdexport engines`: a TensorRT engine for every graph of a bundle, on the GPU it runs on.

For each graph: parse the bundle's ONNX file with TensorRT's ONNX parser, one
optimisation profile over the batch axis (1, typical, max; every other axis as
in the bundle), build, then run the bundle's golden check on the engine. In fp16
a failing check rebuilds the engine with more layers pinned to fp32:

    stage "none"                      nothing pinned
    stage "normalization+sampling"    LayerNorm/InstanceNorm (TensorRT normalization layers
                                      and layers in *norm* scopes, ReduceL2), GridSample and
                                      the layers feeding it, deformable-attention scopes
    stage "wide"                      + every Softmax, Reduce and encoder layer
    stage "all"                       the whole graph in fp32 (no FP16 flag)

With TensorRT 10 (weak typing) pinning is `layer.precision = float32`,
`set_output_type(i, float32)` and OBEY_PRECISION_CONSTRAINTS; TensorRT 11 removed
those, so there the ONNX graph itself is converted to fp16 with the pinned nodes
kept in fp32 (onnxruntime's float16 converter) and built strongly typed.

Engines go to `trt/<key>/<model>_<graph>.engine` with the key `sm90-trt10.16.1-fp16`
(see sdrun.backends.trt); the manifest's `engines` section records the profiles, what was
pinned, the check and the ONNX file's sha256, and `files` lists every engine with
its sha256. The manifest is rewritten atomically after every graph, so an
interrupted run keeps the engines already built. Engines of other keys (other
GPUs or TensorRT versions) are kept; this key's engines are rebuilt when missing,
stale (their ONNX changed), built for another batch size, or with `force`.
"""
from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from sdrun.apps.check import check_graph, golden_cases
from sdrun.backends.trt import (
    ENGINE_TOLERANCE,
    DeviceContext,
    TrtModel,
    cuda_api,
    engine_file,
    engine_key,
    gpu_info,
    import_tensorrt,
)
from sdrun.bundle.bundle import MANIFEST, Bundle, sha256_file
from sdrun.errors import SpotdiffError
from sdrun.files import atomic_write

logger = logging.getLogger(__name__)

# Batch axis per graph, in items per image pair: detectors see 4 views per pair
# (a, flip(a), b, flip(b)), the Siamese ViT one pair; CLIP every kept crop of a
# batch, up to CLIP_MAX per call; OWL-ViT's text side one prompt list. A batch above
# an engine's max (or the memory budget) is run in chunks by sdrun.
PER_PAIR = {("owlvit", "image"): 4, ("gdino", "model"): 4, ("siamese", "pair"): 1}
CLIP_MAX, CLIP_OPT = 64, 16
DEFAULT_MAX_BATCH = 8

STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("none", ()),
    ("normalization+sampling", ("normalization", "grid_sample", "deformable")),
    ("wide", ("normalization", "grid_sample", "deformable", "softmax", "reduce", "encoder")),
    ("all", ("all",)),
]
NAME_RULES = {
    "normalization": re.compile(r"(?i)(layer_?norm|layernorm|normalization|/ln_?\w*/|/norm\d*/|"
                                r"/norm/|reducel2)"),
    "deformable": re.compile(r"(?i)(deformable|encoder_attn|sampling_offsets|ms_?deform)"),
    "encoder": re.compile(r"(?i)(/encoder/|/transformer/|/blocks/)"),
}
KIND_RULES = {"normalization": {"normalization"}, "grid_sample": {"grid_sample"},
              "softmax": {"softmax"}, "reduce": {"reduce"}}
# Layer kinds never pinned: they compute no floating point (or are just data).
UNPINNABLE = {"constant", "shape", "cast", "identity", "assertion", "condition", "loop",
              "iterator", "recurrence", "trip_limit", "loop_output", "conditional_input",
              "conditional_output", "fill", "non_zero", "parametric_relu"}
# ONNX op types -> the kind of TensorRT layer they become (for the strongly typed path).
ONNX_KINDS = {"LayerNormalization": "normalization", "InstanceNormalization": "normalization",
              "GroupNormalization": "normalization", "GridSample": "grid_sample",
              "Softmax": "softmax", "ReduceMean": "reduce", "ReduceSum": "reduce",
              "ReduceL2": "reduce", "ReduceMax": "reduce", "ReduceMin": "reduce",
              "Constant": "constant", "Shape": "shape", "Cast": "cast", "Identity": "identity"}


class EngineBuildError(SpotdiffError):
    pass


@dataclass
class GraphResult:
    name: str
    status: str  # built | cached | failed
    stage: str = ""
    pinned: int = 0
    check: dict = field(default_factory=dict)
    seconds: float = 0.0


# ---- profiles ---------------------------------------------------------------------------
def batch_range(bundle: Bundle, model: str, graph: str, max_batch: int) -> tuple[int, int, int]:
    """(min, opt, max) of the batch axis for one graph, `max_batch` pairs per call."""
    if (model, graph) in PER_PAIR:
        k = PER_PAIR[(model, graph)]
        return 1, k, k * max_batch
    if (model, graph) == ("clip", "visual"):
        return 1, CLIP_OPT, CLIP_MAX
    if (model, graph) == ("owlvit", "text"):
        entry = bundle.model("owlvit")
        n = int(bundle.array(entry["query_embeds_file"]).shape[0]) if "query_embeds_file" in entry else 16
        return 1, n, n
    return 1, max_batch, max_batch


def plan_profiles(bundle: Bundle, model: str, graph: str, inputs: dict[str, tuple],
                  max_batch: int) -> dict[str, dict[str, list[int]]]:
    """min/opt/max shapes of each network input: the batch axis (axis 0) from
    `batch_range`, any other dynamic axis fixed to what the golden inputs have."""
    lo, opt, hi = batch_range(bundle, model, graph, max_batch)
    golden = golden_cases(bundle.arrays(bundle.model(model)["golden_file"]))
    seen = {}
    for (_, g), io in golden.items():
        if g == graph:
            for name, arr in io["in"].items():
                seen.setdefault(name, set()).add(tuple(arr.shape[1:]))
    out = {}
    for name, shape in inputs.items():
        shape = list(shape)
        rest = shape[1:]
        if any(d < 0 for d in rest):
            known = seen.get(name, set())
            if len(known) != 1:
                raise EngineBuildError(
                    f"{model}/{graph}: input {name} has dynamic non-batch axes {shape} and the "
                    f"golden inputs do not fix them ({sorted(known) or 'none'})")
            rest = [g if d < 0 else d for d, g in zip(rest, next(iter(known)))]
        if shape and shape[0] < 0:
            out[name] = {"min": [lo, *rest], "opt": [opt, *rest], "max": [hi, *rest]}
        else:
            out[name] = {"min": [*shape[:1], *rest], "opt": [*shape[:1], *rest],
                         "max": [*shape[:1], *rest]}
    return out


# ---- pinning ----------------------------------------------------------------------------
def layer_kind(layer) -> str:
    return str(getattr(layer.type, "name", layer.type)).lower()


def match_rule(name: str, kind: str, rules: tuple[str, ...]) -> str | None:
    """The first pinning rule that selects a layer (or ONNX node) of this name and kind."""
    for rule in rules:
        if rule == "all" or kind in KIND_RULES.get(rule, ()):
            return rule
        rx = NAME_RULES.get(rule)
        if rx is not None and rx.search(name or ""):
            return rule
    return None


def pin_network(trt, network, rules: tuple[str, ...]) -> dict[str, str]:
    """Pin the layers the rules select to fp32 (weak typing): {layer name: rule}."""
    if not rules:
        return {}
    floats = {trt.float32, trt.float16}
    producers = {}
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    for layer in layers:
        for j in range(layer.num_outputs):
            producers[layer.get_output(j).name] = layer
    chosen: dict[str, tuple] = {}
    for layer in layers:
        kind = layer_kind(layer)
        rule = match_rule(layer.name, kind, rules)
        if rule:
            chosen.setdefault(layer.name, (layer, rule))
            if kind == "grid_sample" and "grid_sample" in rules:
                for j in range(layer.num_inputs):  # the sampling grid and the values
                    t = layer.get_input(j)
                    src = producers.get(t.name) if t is not None else None
                    if src is not None:
                        chosen.setdefault(src.name, (src, "grid_sample"))
    pinned = {}
    for name, (layer, rule) in chosen.items():
        if layer_kind(layer) in UNPINNABLE:
            continue
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not outs or any(o.dtype not in floats for o in outs):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned[name] = rule
    return dict(sorted(pinned.items()))


def pinned_onnx_nodes(model, rules: tuple[str, ...]) -> dict[str, str]:
    """The ONNX nodes the rules select, {name: rule} (strong typing: kept in fp32 by the fp16
    conversion)."""
    out: dict[str, str] = {}
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        kind = ONNX_KINDS.get(node.op_type, node.op_type.lower())
        rule = match_rule(node.name, kind, rules)
        if kind in UNPINNABLE or not rule:
            continue
        out.setdefault(node.name, rule)
        if kind == "grid_sample" and "grid_sample" in rules:
            for i in node.input:
                src = producers.get(i)
                if src is not None and ONNX_KINDS.get(src.op_type) not in UNPINNABLE:
                    out.setdefault(src.name, "grid_sample")
    return dict(sorted(out.items()))


# ---- building one engine ------------------------------------------------------------------
def weakly_typed(trt) -> bool:
    return hasattr(trt.BuilderFlag, "FP16")


def _parse_onnx(trt, builder, logger, source: Path, onnx_path: Path, strongly_typed: bool = False):
    """(network, parser) of the graph file `source`; errors name `onnx_path`, the bundle's graph."""
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    # returned too: the parser owns weights the network points to, so keep it while the network is used
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{onnx_path}: TensorRT's ONNX parser failed: {errs}")
    return network, parser


def build_engine(trt, onnx_path: Path, profiles: dict, precision: str, rules: tuple[str, ...],
                 workspace_gb: float = 8.0, opt_level: int | None = None,
                 scratch: Path | None = None, timing: dict | None = None
                 ) -> tuple[bytes, dict[str, str], str]:
    """Serialized engine bytes, the layers pinned to fp32 ({name: rule}), the typing used."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    fp16 = precision == "fp16" and "all" not in rules
    weak = weakly_typed(trt)
    source, pinned, strongly_typed = onnx_path, {}, False
    if fp16 and not weak:
        source, pinned = _fp16_onnx(onnx_path, rules, scratch)
        strongly_typed = True
    network, parser = _parse_onnx(trt, builder, logger, source, onnx_path, strongly_typed)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if opt_level is not None:
        config.builder_optimization_level = opt_level
    if timing is not None and hasattr(config, "create_timing_cache"):
        # one timing cache for every build of a run: rebuilds with pinned layers and
        # graphs sharing layer shapes skip most kernel timing
        if timing.get("cache") is None:
            timing["cache"] = config.create_timing_cache(b"")
        config.set_timing_cache(timing["cache"], False)
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 layers stay fp32
    if fp16 and weak:
        config.set_flag(trt.BuilderFlag.FP16)
        pinned = pin_network(trt, network, rules)
        if pinned:
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    profile = builder.create_optimization_profile()
    for name, p in profiles.items():
        profile.set_shape(name, tuple(p["min"]), tuple(p["opt"]), tuple(p["max"]))
    config.add_optimization_profile(profile)
    data = builder.build_serialized_network(network, config)
    if data is None:
        raise EngineBuildError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    if "all" in rules and precision == "fp16":
        pinned = {"*": "all"}
    return bytes(memoryview(data)), pinned, ("weak" if weak else "strong")


def _fp16_onnx(onnx_path: Path, rules, scratch: Path | None) -> tuple[Path, dict[str, str]]:
    """TensorRT 11: the graph converted to fp16 with the pinned nodes kept in fp32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(onnx_path))
    blocked = pinned_onnx_nodes(model, rules)
    converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=list(blocked))
    out = Path(scratch or tempfile.mkdtemp()) / f"{onnx_path.stem}.fp16.onnx"
    onnx.save(converted, str(out))
    return out, blocked


def network_inputs(trt, onnx_path: Path) -> dict[str, tuple]:
    """Input names and shapes (-1: dynamic) as TensorRT's parser sees them."""
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network, parser = _parse_onnx(trt, builder, logger, onnx_path, onnx_path)
    return {network.get_input(i).name: tuple(network.get_input(i).shape)
            for i in range(network.num_inputs)}


# ---- the manifest ------------------------------------------------------------------------
def write_manifest(root: Path, manifest: dict) -> None:
    """Atomically replace `root/manifest.json` (write, fsync, rename)."""
    atomic_write(root / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def _file_meta(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _drop_graph(manifest: dict, key: str, name: str) -> list[str]:
    """Remove one graph's engine entry and its files from the manifest; return the files."""
    entry = manifest.get("engines", {}).get(key, {}).get("graphs", {}).pop(name, None)
    if not entry:
        return []
    rels = [entry[k] for k in ("file", "pinned_file") if entry.get(k)]
    for rel in rels:
        manifest["files"].pop(rel, None)
    return rels


def _cached(bundle: Bundle, key: str, name: str, onnx_rel: str, max_batch: int) -> bool:
    entry = bundle.manifest.get("engines", {}).get(key, {}).get("graphs", {}).get(name)
    if not entry or not entry.get("file") or not entry.get("check", {}).get("ok"):
        return False
    files = bundle.manifest["files"]
    return (entry["file"] in files and entry.get("max_batch_pairs") == max_batch
            and entry.get("onnx_sha256") == files.get(onnx_rel, {}).get("sha256"))


def summarise_checks(checks) -> dict:
    checks = list(checks)
    worst = max((c.rel_l2 for c in checks), default=0.0)
    return {"ok": bool(checks) and all(c.ok for c in checks),
            "max_rel_l2": float(worst) if np.isfinite(worst) else "inf",
            "tolerance": checks[0].tolerance if checks else None,
            "outputs": {f"{c.case}/{c.output}": (float(c.rel_l2) if np.isfinite(c.rel_l2) else "inf")
                        for c in checks}}


# ---- the command ---------------------------------------------------------------------------
def build_engines(bundle_dir: str | Path, precision: str = "fp16",
                  max_batch: int = DEFAULT_MAX_BATCH, models: list[str] | None = None,
                  force: bool = False, workspace_gb: float = 8.0, opt_level: int | None = None,
                  log: Callable[[str], None] = logger.info) -> list[GraphResult]:
    """Build (or reuse) this GPU's engines for every graph of the bundle (or only `models`:
    model names or model/graph names); see the module doc."""
    root = Path(bundle_dir)
    bundle = Bundle.load(root)
    known = {n for m, e in bundle.models.items() for n in (m, *(f"{m}/{g}" for g in e["graphs"]))}
    unknown = sorted(set(models or ()) - known)
    if unknown:
        raise EngineBuildError(f"{root}: no model or graph {', '.join(unknown)} (it has: "
                               f"{', '.join(sorted(known))})")
    trt = import_tensorrt()
    api = cuda_api()
    gpu = gpu_info(api)
    key = engine_key(gpu.arch, trt.__version__, precision)
    tol = ENGINE_TOLERANCE[precision]
    ctx = DeviceContext(api, gpu.device)
    log(f"engines {key}: {gpu.name} ({gpu.arch}), TensorRT {trt.__version__}, {precision}, "
        f"up to {max_batch} pairs per call; golden check rel_l2 <= {tol:g}")

    manifest = json.loads((root / MANIFEST).read_text())
    section = manifest.setdefault("engines", {}).setdefault(key, {"graphs": {}})
    section.update({"gpu": gpu.arch, "gpu_name": gpu.name, "tensorrt": trt.__version__,
                    "precision": precision, "tolerance": {"rel_l2": tol},
                    "cuda_library": gpu.library})
    section.setdefault("graphs", {})
    timing: dict = {}
    results = []
    for model, mentry in bundle.models.items():
        for graph, gentry in mentry["graphs"].items():
            name = f"{model}/{graph}"
            if models and model not in models and name not in models:
                continue
            onnx_rel = gentry["file"]
            if not force and _cached(bundle, key, name, onnx_rel, max_batch):
                log(f"[{name}] cached ({engine_file(key, model, graph)})")
                results.append(GraphResult(name, "cached",
                                           check=section["graphs"][name].get("check", {})))
                continue
            res = _build_graph(trt, bundle, root, manifest, key, model, graph, precision, tol,
                               max_batch, ctx, workspace_gb, opt_level, log, timing)
            results.append(res)
    section = manifest["engines"][key]
    section["built"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_manifest(root, manifest)
    Bundle.load(root)  # every file, engines included, verifies
    return results


def _build_graph(trt, bundle, root, manifest, key, model, graph, precision, tol, max_batch,
                 ctx, workspace_gb, opt_level, log, timing=None) -> GraphResult:
    name = f"{model}/{graph}"
    onnx_rel = bundle.model(model)["graphs"][graph]["file"]
    onnx_path = bundle.path(onnx_rel)
    rel = engine_file(key, model, graph)
    final = root / rel
    final.parent.mkdir(parents=True, exist_ok=True)
    # Forget the old engine first: the manifest never names a file that is being replaced.
    old = _drop_graph(manifest, key, name)
    if old:
        write_manifest(root, manifest)
        for r in old:
            (root / r).unlink(missing_ok=True)
    profiles = plan_profiles(bundle, model, graph, network_inputs(trt, onnx_path), max_batch)
    stages = STAGES if precision == "fp16" else [("none", ())]
    t0 = time.perf_counter()
    summary, stage, pinned, typing, data = {}, "", {}, "", b""
    with tempfile.TemporaryDirectory(prefix="sdexport-trt-") as scratch:
        candidate = Path(scratch) / final.name  # checked here, then written into the bundle
        for stage, rules in stages:
            ts = time.perf_counter()
            data, pinned, typing = build_engine(trt, onnx_path, profiles, precision, rules,
                                                workspace_gb, opt_level, Path(scratch), timing)
            candidate.write_bytes(data)
            session = TrtModel(candidate, ctx, key=key, tolerance=tol, label=f"{name} [{key}]")
            try:
                summary = summarise_checks(check_graph(bundle, model, graph, session,
                                                       max(tol, _bundle_tol(bundle, model))))
            finally:
                session.close()
            log(f"[{name}] stage {stage}: {len(data) / 1e6:.1f} MB in "
                f"{time.perf_counter() - ts:.1f} s, {len(pinned)} layer(s) pinned to fp32, "
                f"max rel_l2 {summary['max_rel_l2']} -> {'ok' if summary['ok'] else 'FAIL'}")
            if summary["ok"]:
                break
    entry = {"onnx_file": onnx_rel, "onnx_sha256": manifest["files"][onnx_rel]["sha256"],
             "profiles": profiles, "max_batch_pairs": max_batch, "typing": typing,
             "stage": stage, "pinned_fp32": sorted(set(pinned.values())),
             "pinned_layers": len(pinned),
             "pinned_counts": {r: list(pinned.values()).count(r) for r in sorted(set(pinned.values()))},
             "check": summary,
             "seconds": round(time.perf_counter() - t0, 1)}
    graphs = manifest["engines"][key]["graphs"]
    if not summary.get("ok"):
        entry["failed"] = (f"golden check failed at every stage up to '{stage}' "
                           f"(max rel_l2 {summary.get('max_rel_l2')}, tolerance {tol:g})")
        graphs[name] = entry
        write_manifest(root, manifest)
        log(f"[{name}] FAILED: {entry['failed']}; no engine recorded")
        return GraphResult(name, "failed", stage, len(pinned), summary, entry["seconds"])
    atomic_write(final, data)
    entry["file"] = rel
    manifest["files"][rel] = _file_meta(final)
    if pinned:
        prel = rel[: -len(".engine")] + ".pinned.json"
        atomic_write(root / prel, json.dumps({"stage": stage, "layers": pinned}, indent=1) + "\n")
        entry["pinned_file"] = prel
        manifest["files"][prel] = _file_meta(root / prel)
    graphs[name] = entry
    write_manifest(root, manifest)
    if stage != "none":
        log(f"[{name}] fp16 needed stage '{stage}': pinned {', '.join(entry['pinned_fp32'])} "
            f"({len(pinned)} layers, listed in {entry.get('pinned_file', '-')})")
    return GraphResult(name, "built", stage, len(pinned), summary, entry["seconds"])


def _bundle_tol(bundle: Bundle, model: str) -> float:
    return float(bundle.model(model).get("tolerance", {}).get("rel_l2", 1e-5))
