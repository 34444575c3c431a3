"""A Triton Inference Server model repository from a bundle (`sdrun triton`).

    REPO/
      owlvit_image/config.pbtxt  1/model.onnx         one model per graph the pipeline runs
      gdino_model/  siamese_pair/  clip_visual/        (model "<model>_<graph>")
      spotdiff/config.pbtxt  1/model.py  1/bundle/     the pipeline (python backend, BLS)
      README.md  repository.json

Graph models come in one of two forms (`GRAPH_FORMS`):
- "onnxruntime": `platform: "onnxruntime_onnx"` (Triton's onnxruntime backend, on a GPU
  server), with onnxruntime's TensorRT accelerator in fp16 where the bundle's own fp16
  TensorRT engine of that graph passed its golden check, fp32 elsewhere; with
  `engines=KEY`, the bundle's engines of that key as `tensorrt_plan` models instead;
- "python": python-backend models that run the graph with sdrun's own backends
  (`sdrun.apps.triton_models.GraphModel`): for servers without the onnxruntime backend.

`spotdiff` is a python-backend model (`triton_models.SpotdiffModel`) that runs sdrun's
stages and calls the graph models through BLS, so Triton batches each graph across
requests. Its `1/bundle/` is the bundle without its graphs and golden files: the manifest
there says which repository model runs each graph and that file's sha256, and the source
bundle's content id; the model refuses to load when a file does not match.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..bundle.bundle import MANIFEST, Bundle
from ..errors import SpotdiffError
from ..files import atomic_write, check_output_folder, is_inside, replace_folder
from ..models import adapter_class

log = logging.getLogger(__name__)

GRAPH_FORMS = ("onnxruntime", "python")
PIPELINE_MODEL = "spotdiff"
BUNDLE_DIR = "bundle"  # the spotdiff model's copy of the bundle, in its version folder
RECORD = "repository.json"  # every file `sdrun triton` wrote, for a later run to replace
TRITON_SECTION = "triton"  # the derived manifest's record of the repository's graph models
VERSION = "1"

TRITON_DTYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64",
    "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}
# the BLS model's tensors: (name, dims, optional)
PIPELINE_INPUTS = (("image_a", [1], False), ("image_b", [1], False),
                   ("params", [1], True), ("pair_id", [1], True))
PIPELINE_OUTPUTS = (("result", [1]),)


class TritonRepositoryError(SpotdiffError):
    """A model repository cannot be written (or loaded) as asked."""


@dataclass(frozen=True)
class RepositoryOptions:
    graphs: str = "onnxruntime"  # GRAPH_FORMS
    max_batch: int = 32  # largest batch Triton forms for a graph model (views, pairs or crops)
    max_batch_pairs: int = 8  # largest batch of pairs the spotdiff model takes at once
    queue_delay_us: int = 5000  # dynamic batching: how long a request waits for others
    graph_instances: int = 1  # instances of each graph model (per GPU for onnxruntime)
    pipeline_instances: int = 1  # spotdiff model processes
    engines: str | None = None  # a bundle engine key: tensorrt_plan models from its engines
    ort_tensorrt: bool = True  # onnxruntime form: the TensorRT accelerator on

    def check(self) -> None:
        if self.graphs not in GRAPH_FORMS:
            raise TritonRepositoryError(f"graphs={self.graphs!r}: choose one of {', '.join(GRAPH_FORMS)}")
        for name in ("max_batch", "max_batch_pairs", "graph_instances", "pipeline_instances"):
            if getattr(self, name) < 1:
                raise TritonRepositoryError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.queue_delay_us < 0:
            raise TritonRepositoryError(f"queue_delay_us must be >= 0, not {self.queue_delay_us}")
        if self.engines is not None and self.graphs != "onnxruntime":
            raise TritonRepositoryError("engines (tensorrt_plan models) go with graphs='onnxruntime'")


def model_name(model: str, graph: str) -> str:
    """The repository model that runs one bundle graph."""
    return f"{model}_{graph}"


def served_graphs(bundle: Bundle) -> list[tuple[str, str]]:
    """(model, graph) of every graph the pipeline opens, in the manifest's order."""
    return [(name, graph) for name in bundle.models for graph in adapter_class(bundle, name).graphs]


# ---- config.pbtxt ------------------------------------------------------------------------
def tensor_config(entry: dict, batched: bool, where: str) -> dict:
    """One input/output of a graph entry as Triton declares it: the batch axis left out when
    Triton batches; a named (dynamic) axis is -1; a tensor that is only the batch axis is
    dims [1] reshaped to [] (Triton's way to batch scalars)."""
    dtype = TRITON_DTYPES.get(entry.get("dtype", ""))
    if dtype is None:
        raise TritonRepositoryError(f"{where}: dtype {entry.get('dtype')!r} has no Triton type "
                                    f"(known: {', '.join(TRITON_DTYPES)})")
    shape = list(entry["shape"])
    dims = [d if isinstance(d, int) else -1 for d in (shape[1:] if batched else shape)]
    out: dict[str, Any] = {"name": entry["name"], "data_type": dtype}
    if batched and not dims:
        out.update(dims=[1], reshape={"shape": []})
    else:
        out["dims"] = dims
    return out


def batchable(entry: dict) -> bool:
    """Whether every input and output of a graph starts with a named (batch) axis."""
    return all(t["shape"] and not isinstance(t["shape"][0], int) for t in entry["inputs"] + entry["outputs"])


ENUM_FIELDS = {"data_type", "kind"}  # written bare: TYPE_FP32, KIND_GPU


def _fields(config: dict, indent: str = "") -> Iterable[str]:
    """protobuf text lines of a message given as a dict: a list of dicts is a repeated
    message, a list of numbers a packed repeated field."""
    for key, v in config.items():
        if isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            yield f"{key}: [ {', '.join(str(x) for x in v)} ]"
            continue
        for x in v if isinstance(v, list) else [v]:
            if isinstance(x, dict):
                inner = indent + "  "
                yield f"{key} {{\n" + "".join(f"{inner}{line}\n" for line in _fields(x, inner)) + indent + "}"
            elif isinstance(x, bool):
                yield f"{key}: {'true' if x else 'false'}"
            elif isinstance(x, (int, float)) or key in ENUM_FIELDS:
                yield f"{key}: {x}"
            else:
                yield f"{key}: {json.dumps(str(x))}"


def to_pbtxt(config: dict) -> str:
    """A model config (dict) in protobuf text format; `parameters` maps names to strings
    (Triton's map<string, ModelParameter>)."""
    config = dict(config)
    params = config.pop("parameters", None) or {}
    lines = list(_fields(config))
    lines += [f"parameters {{ key: {json.dumps(k)} value: {{ string_value: {json.dumps(str(v))} }} }}"
              for k, v in params.items()]
    return "\n".join(lines) + "\n"


def fp16_safe(bundle: Bundle, model: str, graph: str) -> bool:
    """Whether one of the bundle's fp16 TensorRT engines of this graph is usable (passed its
    golden check, built from this graph): the bundle's record that fp16 keeps its answers."""
    from ..backends.trt import engine_problem, engines_section

    return any(section.get("precision") == "fp16" and (entry := section.get("graphs", {}).get(f"{model}/{graph}"))
               and engine_problem(bundle, entry) is None for section in engines_section(bundle).values())


def engine_entry(bundle: Bundle, key: str, model: str, graph: str) -> dict | None:
    """The usable engine of a graph under an engine key, or None (absent, failed, stale)."""
    from ..backends.trt import engine_problem, engines_section

    section = engines_section(bundle).get(key)
    if section is None:
        have = ", ".join(sorted(engines_section(bundle))) or "none"
        raise TritonRepositoryError(f"{bundle.root}: no engines under {key!r} (the bundle has: {have}); "
                                    "build them with `sdexport engines` on the target GPU")
    entry = section.get("graphs", {}).get(f"{model}/{graph}")
    return entry if entry and engine_problem(bundle, entry) is None else None


def graph_config(bundle: Bundle, model: str, graph: str, opts: RepositoryOptions,
                 engine: dict | None) -> dict:
    """config.pbtxt (as a dict) of one graph model."""
    entry = bundle.model(model)["graphs"][graph]
    where = f"{bundle.root / MANIFEST}: {model}/{graph}"
    batched = batchable(entry)
    max_batch = opts.max_batch
    if engine is not None and batched:  # an engine takes no more than its profile's largest batch
        biggest = [p["max"][0] for p in (engine.get("profiles") or {}).values() if p.get("max")]
        if biggest:
            max_batch = min(max_batch, *biggest)
    config: dict[str, Any] = {"name": model_name(model, graph)}
    if opts.graphs == "python":
        config["backend"] = "python"
    else:
        config["platform"] = "tensorrt_plan" if engine is not None else "onnxruntime_onnx"
    config["max_batch_size"] = max_batch if batched else 0
    config["input"] = [tensor_config(t, batched, where) for t in entry["inputs"]]
    config["output"] = [tensor_config(t, batched, where) for t in entry["outputs"]]
    if batched:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": opts.queue_delay_us}
    kind = "KIND_CPU" if opts.graphs == "python" else "KIND_GPU"
    config["instance_group"] = [{"count": opts.graph_instances, "kind": kind}]
    if opts.graphs == "onnxruntime" and engine is None and opts.ort_tensorrt:
        precision = "FP16" if fp16_safe(bundle, model, graph) else "FP32"
        config["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [
            {"name": "tensorrt", "parameters": [{"key": "precision_mode", "value": precision}]}]}}
    params = {"spotdiff_graph": f"{model}/{graph}", "spotdiff_file": _graph_file_name(engine),
              "spotdiff_sha256": _graph_sha256(bundle, entry, engine)}
    if opts.graphs == "python":
        # sdrun's provider for the graph ("cuda" on a GPU server); the graph models of the
        # server share its memory budget
        params.update(provider="cpu", graphs_served=str(len(served_graphs(bundle))))
    config["parameters"] = params
    return config


def pipeline_config(opts: RepositoryOptions, content_id: str) -> dict:
    """config.pbtxt (as a dict) of the spotdiff (BLS) model."""
    return {
        "name": PIPELINE_MODEL, "backend": "python", "max_batch_size": opts.max_batch_pairs,
        "input": [{"name": n, "data_type": "TYPE_STRING", "dims": d, **({"optional": True} if o else {})}
                  for n, d, o in PIPELINE_INPUTS],
        "output": [{"name": n, "data_type": "TYPE_STRING", "dims": d} for n, d in PIPELINE_OUTPUTS],
        "dynamic_batching": {"max_queue_delay_microseconds": opts.queue_delay_us},
        "instance_group": [{"count": opts.pipeline_instances, "kind": "KIND_CPU"}],
        "parameters": {"spotdiff_content_id": content_id},
    }


def _graph_file_name(engine: dict | None) -> str:
    return "model.plan" if engine is not None else "model.onnx"


def _graph_sha256(bundle: Bundle, entry: dict, engine: dict | None) -> str:
    rel = engine["file"] if engine is not None else entry["file"]
    return bundle.manifest["files"][rel]["sha256"]


# ---- the derived bundle of the spotdiff model ---------------------------------------------
def derived_manifest(bundle: Bundle, graph_models: dict[tuple[str, str], dict]) -> tuple[dict, list[str]]:
    """(manifest, files to copy) of the spotdiff model's bundle: the source manifest without
    graph files, golden files and engines; each served graph entry names its repository
    model and file instead of a file of its own."""
    m = json.loads(json.dumps(bundle.manifest))
    dropped: set[str] = set()
    for name, model in m["models"].items():
        if "golden_file" in model:
            dropped.add(model.pop("golden_file"))
        for graph in list(model.get("graphs", {})):
            entry = model["graphs"][graph]
            dropped.add(entry.pop("file"))
            for k in [k for k in entry if k.endswith("_file")]:
                dropped.add(entry.pop(k))
            if (name, graph) in graph_models:
                entry["triton_model"] = graph_models[(name, graph)]["model"]
            else:  # a graph the pipeline does not run (a text encoder)
                del model["graphs"][graph]
    m.pop("engines", None)
    m.pop("openvino", None)  # the policy of `--provider openvino`, which a Triton repository does not use
    # engines, and graphs no model entry names as a file (Grounding DINO's text graph)
    dropped.update(rel for rel in m["files"] if rel.startswith("trt/") or rel.endswith(".onnx"))
    m["files"] = {rel: meta for rel, meta in m["files"].items() if rel not in dropped}
    m[TRITON_SECTION] = {
        "source_bundle": str(Path(bundle.root).resolve()),
        "source_content_id": bundle.content_id,
        "graphs": {f"{mo}/{g}": info for (mo, g), info in graph_models.items()},
    }
    return m, sorted(m["files"])


# ---- writing ----------------------------------------------------------------------------
PYTHON_MODEL_CODE = '''"""{what} (written by `sdrun triton`; runs in Triton's python backend)."""
from sdrun.apps.triton_models import {cls} as TritonPythonModel  # noqa: F401
'''


def recorded_files(folder: Path) -> list[str]:
    """What an earlier `sdrun triton` wrote in `folder` (its repository.json), for replacing."""
    try:
        record = json.loads((Path(folder) / RECORD).read_text(encoding="utf-8"))
        files = record["files"]
        return [str(f) for f in files] + [RECORD] if isinstance(files, list) else []
    except (OSError, ValueError, KeyError, TypeError):
        return []


def write_repository(bundle: Bundle, out: str | Path, opts: RepositoryOptions = RepositoryOptions(),
                     progress=None) -> dict:
    """Write the model repository of `bundle` to `out` (absent, empty, or written by an
    earlier run: replaced whole). Returns its record (what repository.json holds)."""
    opts.check()
    out = Path(out)
    check_output_folder(out, "--out", owned=recorded_files, inputs=[("the bundle", bundle.root)],
                        hint=" (a folder written by `sdrun triton` before is replaced)")
    if is_inside(out, Path(bundle.root)):
        raise TritonRepositoryError(f"--out {out} lies inside the bundle {bundle.root}; choose a folder outside it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        record = _write(bundle, tmp, opts, progress)
        replace_folder(tmp, out, owned=recorded_files, inputs=[("the bundle", bundle.root)])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _write(bundle: Bundle, root: Path, opts: RepositoryOptions, progress) -> dict:
    written: list[str] = []

    def text(rel: str, content: str) -> None:
        atomic_write(root / rel, content)
        written.append(rel)

    def copy(src: Path, rel: str) -> None:
        _copy(src, root / rel)
        written.append(rel)

    graph_models: dict[tuple[str, str], dict] = {}
    forms: dict[str, str] = {}
    for model, graph in served_graphs(bundle):
        entry = bundle.model(model)["graphs"][graph]
        engine = engine_entry(bundle, opts.engines, model, graph) if opts.engines else None
        name = model_name(model, graph)
        config = graph_config(bundle, model, graph, opts, engine)
        file_rel = f"{name}/{VERSION}/{_graph_file_name(engine)}"
        if progress is not None:
            progress(f"{name}: {config.get('platform') or 'python backend'}")
        copy(bundle.path(engine["file"] if engine is not None else entry["file"]), file_rel)
        text(f"{name}/config.pbtxt", to_pbtxt(config))
        if opts.graphs == "python":
            text(f"{name}/{VERSION}/model.py", PYTHON_MODEL_CODE.format(
                what=f"The graph {model}/{graph} of a spotdiff bundle", cls="GraphModel"))
            text(f"{name}/{VERSION}/graph.json", json.dumps({"model": model, "graph": graph, **entry}, indent=1))
        graph_models[(model, graph)] = {
            "model": name, "file": file_rel, "sha256": config["parameters"]["spotdiff_sha256"],
            "max_batch_size": config["max_batch_size"],
            "outputs": {t["name"]: len(t["shape"]) for t in entry["outputs"]}}
        forms[name] = config.get("platform") or "python"
    manifest, files = derived_manifest(bundle, graph_models)
    base = f"{PIPELINE_MODEL}/{VERSION}/{BUNDLE_DIR}"
    for rel in files:
        copy(bundle.path(rel), f"{base}/{rel}")
    text(f"{base}/{MANIFEST}", json.dumps(manifest, indent=1) + "\n")
    text(f"{PIPELINE_MODEL}/{VERSION}/model.py", PYTHON_MODEL_CODE.format(
        what="The spotdiff pipeline over the graph models of this repository", cls="SpotdiffModel"))
    text(f"{PIPELINE_MODEL}/config.pbtxt", to_pbtxt(pipeline_config(opts, bundle.content_id)))
    text("README.md", repository_readme(bundle, opts, forms))
    record = {"written_by": "sdrun triton", "source_bundle": str(Path(bundle.root).resolve()),
              "source_content_id": bundle.content_id, "graphs": opts.graphs, "engines": opts.engines,
              "models": {PIPELINE_MODEL: "python", **forms}, "files": sorted(written)}
    atomic_write(root / RECORD, json.dumps(record, indent=1) + "\n")
    return record


def repository_readme(bundle: Bundle, opts: RepositoryOptions, forms: dict[str, str]) -> str:
    models = "\n".join(f"| `{name}` | {form} |" for name, form in forms.items())
    gpu = opts.graphs == "onnxruntime"
    if not gpu:
        server = "Every model runs in the python backend, so any `tritonserver` with it will do."
    else:
        server = ("The graph models need a server with the onnxruntime backend"
                  + (" (and TensorRT's, for the `tensorrt_plan` models: an engine runs only with the "
                     "TensorRT version and GPU it was built for)" if opts.engines else "")
                  + ", e.g. NVIDIA's container `nvcr.io/nvidia/tritonserver:<yy.mm>-py3`.")
    return f"""# Triton model repository of a spotdiff bundle

Written by `sdrun triton` from `{bundle.root}` (content id `{bundle.content_id[:16]}`).

| model | runs as |
|---|---|
| `spotdiff` | python backend: the pipeline, calling the graph models below (BLS) |
{models}

## Start it

    tritonserver --model-repository "$PWD"

{server}

## The Python environment

The `spotdiff` model{"" if gpu else " and the graph models"} run in Triton's python backend and import
`sdrun` (spotdiff's runtime, no PyTorch). Either start `tritonserver` with a Python that
has it installed (its `bin/` first on `PATH`, its site-packages on `PYTHONPATH`; the
backend's stub must match that Python's version), or pack an environment and name it in
each python model's config.pbtxt:

    parameters {{ key: "EXECUTION_ENV_PATH" value: {{ string_value: "/path/to/spotdiff-env.tar.gz" }} }}

(`pip install spotdiff` in a conda environment, then `conda-pack`).

A python backend built before numpy 2 (Triton 2.51's, for one) hands numpy 2 arrays over
wrongly: the models check this at load and refuse; give that server `numpy<2` (sdrun runs
with numpy 1.24 and later).

## Ask it

```python
import json
import numpy as np
import tritonclient.http as httpclient

client = httpclient.InferenceServerClient("localhost:8000")
a, b = (np.array([[open(p, "rb").read()]], dtype=object) for p in ("a.png", "b.png"))
inputs = [httpclient.InferInput("image_a", [1, 1], "BYTES"), httpclient.InferInput("image_b", [1, 1], "BYTES")]
inputs[0].set_data_from_numpy(a)
inputs[1].set_data_from_numpy(b)
result = client.infer("spotdiff", inputs)
print(json.loads(result.as_numpy("result")[0, 0]))  # added, removed, changed, objects, ...
```

Optional inputs: `params` (JSON of per-request parameters, e.g. `{{"det_thr": 0.3}}`: the
post-model ones) and `pair_id`. A request may carry several pairs (a batch of
up to {opts.max_batch_pairs}); the answer has one JSON per pair, with `error` set for a pair whose
image cannot be read.

The `spotdiff` model checks at load that every graph file here is the one the bundle had
(sha256): a repository mixed from two bundles does not load.
"""

