"""The python-backend models of a repository written by `sdrun triton` (they run inside
Triton's python backend; `triton_python_backend_utils` exists only there, so it is imported
when a model initialises: the tests hand in a fake one).

- `GraphModel`: one graph of the bundle, run with sdrun's onnxruntime backend. Triton's
  dynamic batcher hands it several requests at once; their inputs run as one call (split
  to fit the memory budget; a graph whose answers depend on the batch runs one input per
  call on CPU, as in `sdrun diff`).
- `SpotdiffModel`: the pipeline. Its graphs are `TritonGraph`s, which call the graph models
  through BLS, so Triton batches each graph across the requests of every spotdiff
  instance. Each request carries one or more pairs of encoded images (`image_a`,
  `image_b`), optionally `params` (JSON, the per-request parameters `sdrun serve` takes)
  and `pair_id`; the answer is each pair's JSON as `sdrun run` writes it.

Both refuse to load when a file is not the one the repository was written with (sha256).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..backends.interface import runs_on_cpu
from ..backends.memory import BudgetedModel, GraphCost, MemoryBudget
from ..backends.session import OnnxModel
from ..bundle.bundle import MANIFEST, Bundle, resolve_inside
from ..bundle.digests import DigestCache
from ..errors import BundleError, SpotdiffError
from ..pipeline import PairResult, Pipeline
from ..stages.images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from .batcher import diff_pairs, request_params
from .triton_repo import BUNDLE_DIR, PIPELINE_MODEL, TRITON_SECTION

log = logging.getLogger(__name__)


class TritonCallError(SpotdiffError):
    """A graph model answered a BLS request with an error."""


def triton_utils() -> Any:
    """Triton's `triton_python_backend_utils` (only inside the python backend)."""
    import triton_python_backend_utils as pb_utils

    return pb_utils


def check_tensor_exchange(pb: Any) -> None:
    """SpotdiffError when this python backend hands numpy arrays over wrongly. Measured with
    Triton 2.51's stub (a pybind11 older than numpy 2) under numpy 2: an input [1, 2, 3]
    reads back as [1, 1, 1] and BYTES inputs crash the stub, quietly wrong answers at best.
    A tensor made through DLPack and read with `as_numpy` shows it. Under numpy 1 there is
    nothing to check (and that stub cannot take numpy 1's DLPack capsules: it breaks)."""
    if int(np.__version__.split(".")[0]) < 2:
        return
    probe = np.arange(1, 7, dtype=np.float32).reshape(2, 3)
    try:
        back = pb.Tensor.from_dlpack("probe", probe).as_numpy()
    except Exception:
        return
    if back.shape != probe.shape or not np.array_equal(back, probe):
        raise SpotdiffError(
            f"this Triton python backend corrupts numpy {np.__version__} arrays (it read "
            f"{back.ravel().tolist()} for {probe.ravel().tolist()}): its stub predates numpy 2. Run it "
            "in an environment with numpy < 2 (sdrun works with both), or use a newer Triton")


def config_parameters(config: dict) -> dict[str, str]:
    """A model config's `parameters` as plain strings."""
    return {k: str(v.get("string_value", "")) for k, v in (config.get("parameters") or {}).items()}


def check_file(path: Path, sha256: str, what: str, digests: DigestCache | None = None) -> None:
    """BundleError unless `path` exists and has this sha256 (remembered digests from
    `digests`, or a cache of this call's own)."""
    if not path.is_file():
        raise BundleError(f"{path}: missing ({what})")
    cache = digests or DigestCache()
    try:
        found = cache.sha256(path)
    finally:
        if digests is None:
            cache.save()
    if found != sha256:
        raise BundleError(f"{path}: sha256 {found[:12]}... is not the {sha256[:12]}... this repository "
                          f"was written with ({what}); write the repository again with `sdrun triton`")


def _request_feeds(pb: Any, request: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
    feeds = {}
    for name in names:
        tensor = pb.get_input_tensor_by_name(request, name)
        if tensor is not None:
            feeds[name] = tensor.as_numpy()
    return feeds


def _error_response(pb: Any, message: str) -> Any:
    return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(message))


class GraphModel:
    """A bundle graph as a Triton python-backend model (`--graphs python`)."""

    def initialize(self, args: dict) -> None:
        check_tensor_exchange(triton_utils())
        config = json.loads(args["model_config"])
        params = config_parameters(config)
        folder = Path(args["model_repository"]) / str(args["model_version"])
        entry = json.loads((folder / "graph.json").read_text(encoding="utf-8"))
        self.label = f"{config['name']} ({entry['model']}/{entry['graph']})"
        path = resolve_inside(folder, params["spotdiff_file"])
        check_file(path, params["spotdiff_sha256"], f"the graph of {self.label}")
        provider = params.get("provider") or "cpu"
        graphs = int(params.get("graphs_served") or 1)
        whole = MemoryBudget.resolve(None, provider)
        # the graph models of one server share its memory
        budget = MemoryBudget(max(1, whole.total // graphs), f"1/{graphs} of {whole.source}")
        self.model = BudgetedModel(OnnxModel(path, provider), GraphCost.of(entry["model"], entry), budget,
                                   label=self.label, exact=runs_on_cpu(provider)).open()
        self.inputs = [t["name"] for t in entry["inputs"]]
        self.outputs = [t["name"] for t in entry["outputs"]]
        self.batched = int(config.get("max_batch_size", 0)) > 0
        log.info("%s: %s, %s", self.label, path, budget)

    def execute(self, requests: list) -> list:
        pb = triton_utils()
        feeds = [_request_feeds(pb, r, self.inputs) for r in requests]
        groups = self._groups(feeds)
        responses: list = [None] * len(requests)
        for members in groups:
            try:
                joined = {n: np.concatenate([feeds[k][n] for k in members]) for n in self.inputs}
                out = self.model.run(joined)
                sizes = [len(feeds[k][self.inputs[0]]) for k in members]
                cuts = np.cumsum(sizes)[:-1]
                parts = {n: np.split(np.asarray(out[n]), cuts) for n in self.outputs}
                for i, k in enumerate(members):
                    responses[k] = pb.InferenceResponse(output_tensors=[
                        pb.Tensor(n, np.ascontiguousarray(parts[n][i])) for n in self.outputs])
            except Exception as e:
                log.exception("%s failed", self.label)
                for k in members:
                    responses[k] = _error_response(pb, f"{self.label}: {type(e).__name__}: {e}")
        return responses

    def _groups(self, feeds: list[dict[str, np.ndarray]]) -> list[list[int]]:
        """Requests that can run as one call: batched graphs, same shapes past the batch axis."""
        if not self.batched:
            return [[k] for k in range(len(feeds))]
        groups: dict[tuple, list[int]] = {}
        for k, f in enumerate(feeds):
            if set(f) != set(self.inputs):
                groups[("incomplete", k)] = [k]
                continue
            groups.setdefault(tuple((n, f[n].shape[1:], f[n].dtype.str) for n in self.inputs), []).append(k)
        return list(groups.values())

    def finalize(self) -> None:
        del self.model  # the graph's session goes with the instance


class TritonGraph:
    """A graph run by another model of the same Triton server (BLS): the `Model` interface
    for the pipeline's adapters. Calls of more than the model's `max_batch_size` inputs are
    sent in parts."""

    check_tolerance: float | None = None

    def __init__(self, name: str, inputs: list[str], outputs: dict[str, int], max_batch: int):
        self.name = name
        self._inputs = inputs
        self._ranks = outputs  # output -> its rank in the graph (Triton adds [1] to scalars)
        self.max_batch = max_batch or None

    @property
    def input_names(self) -> list[str]:
        return self._inputs

    @property
    def output_names(self) -> list[str]:
        return list(self._ranks)

    def open(self) -> "TritonGraph":
        return self

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {k: v for k, v in feeds.items() if k in self._inputs}  # as onnxruntime takes them
        n = len(next(iter(feeds.values())))
        step = self.max_batch or max(n, 1)
        parts = [self._call({k: v[i:i + step] for k, v in feeds.items()}) for i in range(0, max(n, 1), step)]
        return {k: np.concatenate([p[k] for p in parts]) for k in self._ranks}

    def _call(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pb = triton_utils()
        request = pb.InferenceRequest(
            model_name=self.name, requested_output_names=self.output_names,
            inputs=[pb.Tensor(k, np.ascontiguousarray(v)) for k, v in feeds.items()])
        response = request.exec()
        if response.has_error():
            raise TritonCallError(f"Triton model {self.name}: {response.error().message()}")
        out = {}
        for name, rank in self._ranks.items():
            tensor = pb.get_output_tensor_by_name(response, name)
            if tensor is None:
                raise TritonCallError(f"Triton model {self.name} gave no {name!r}")
            arr = tensor.as_numpy()
            out[name] = arr.reshape(arr.shape[0]) if rank == 1 and arr.ndim == 2 else arr
        return out


def open_repository_bundle(model_folder: Path, version: str) -> Bundle:
    """The spotdiff model's bundle, every file checked, the repository's graph files too
    (when the repository is a local folder: Triton copies a cloud repository model by model)."""
    root = model_folder / version / BUNDLE_DIR
    bundle = Bundle.load(root)
    section = bundle.manifest.get(TRITON_SECTION)
    if not isinstance(section, dict) or not isinstance(section.get("graphs"), dict):
        raise BundleError(f"{root / MANIFEST}: no {TRITON_SECTION!r} section: not written by `sdrun triton`")
    repo = model_folder.parent
    digests = DigestCache()
    try:
        for graph, info in section["graphs"].items():
            if not (repo / info["model"]).is_dir():
                log.warning("%s: not beside %s, so its graph file is not checked here", info["model"], model_folder)
                continue
            check_file(resolve_inside(repo, info["file"]), info["sha256"],
                       f"{graph} of the bundle with content id {section.get('source_content_id', '?')[:16]}", digests)
    finally:
        digests.save()
    return bundle


class SpotdiffModel:
    """The pipeline as a Triton python-backend model over BLS graph models."""

    def initialize(self, args: dict) -> None:
        check_tensor_exchange(triton_utils())
        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"])
        self.bundle = open_repository_bundle(folder, str(args["model_version"]))
        section = self.bundle.manifest[TRITON_SECTION]
        wanted = config_parameters(config).get("spotdiff_content_id")
        if wanted and wanted != section.get("source_content_id"):
            raise BundleError(f"{folder / 'config.pbtxt'}: content id {wanted[:16]} is not its bundle's "
                              f"{str(section.get('source_content_id'))[:16]}")
        graphs = {tuple(k.split("/", 1)): v for k, v in section["graphs"].items()}

        def bls(model: str, graph: str) -> TritonGraph:
            info = graphs[(model, graph)]
            entry = self.bundle.model(model)["graphs"][graph]
            return TritonGraph(info["model"], [t["name"] for t in entry["inputs"]], info["outputs"],
                               int(info.get("max_batch_size") or 0))

        self.pipe = Pipeline(self.bundle, graph_opener=bls)
        self.max_pixels: int | None = DEFAULT_MAX_PIXELS
        log.info("%s: bundle %s (content id %s)", PIPELINE_MODEL, section.get("source_bundle"),
                 str(section.get("source_content_id"))[:16])

    def execute(self, requests: list) -> list:
        pb = triton_utils()
        pairs: list[tuple] = []  # (request, row, id, a, b, params) of pairs to compute
        answers: dict[tuple[int, int], dict] = {}
        responses: list = [None] * len(requests)
        rows: list[int] = []
        for k, request in enumerate(requests):
            try:
                feeds = _request_feeds(pb, request, ("image_a", "image_b", "params", "pair_id"))
                items = self._pairs(feeds)
            except (SpotdiffError, ValueError) as e:
                responses[k] = _error_response(pb, str(e))
                rows.append(0)
                continue
            rows.append(len(items))
            for row, (pair_id, a, b, params) in enumerate(items):
                try:
                    pairs.append((k, row, pair_id, self._image(a, "image_a", pair_id),
                                  self._image(b, "image_b", pair_id), params))
                except (ImageError, ValueError) as e:
                    answers[(k, row)] = PairResult(pair_id=pair_id, error=str(e)).to_json()
        results = diff_pairs(self.pipe, [(pid, a, b, p) for _, _, pid, a, b, p in pairs]) if pairs else []
        for (k, row, pair_id, *_), r in zip(pairs, results):
            if isinstance(r, BaseException):
                r = PairResult(pair_id=pair_id, error=f"{type(r).__name__}: {r}")
            answers[(k, row)] = r.to_json()
        for k, n in enumerate(rows):
            if responses[k] is not None:
                continue
            text = [[json.dumps(answers[(k, row)], sort_keys=True)] for row in range(n)]
            responses[k] = pb.InferenceResponse(output_tensors=[pb.Tensor("result", np.array(text, dtype=object))])
        return responses

    def _pairs(self, feeds: dict[str, np.ndarray]) -> list[tuple]:
        """(id, a bytes, b bytes, params) of each pair of one request."""
        for name in ("image_a", "image_b"):
            if name not in feeds:
                raise SpotdiffError(f"the request has no {name!r} input")
        a, b = (np.asarray(feeds[n], dtype=object).reshape(-1) for n in ("image_a", "image_b"))
        n = len(a)
        if len(b) != n:
            raise SpotdiffError(f"image_a has {n} pairs, image_b {len(b)}")
        ids = np.asarray(feeds["pair_id"], dtype=object).reshape(-1) if "pair_id" in feeds else [None] * n
        params = np.asarray(feeds["params"], dtype=object).reshape(-1) if "params" in feeds else [None] * n
        if len(ids) != n or len(params) != n:
            raise SpotdiffError(f"pair_id and params must have one row per pair ({n})")
        out = []
        for row in range(n):
            pair_id = _text(ids[row], "pair_id") if ids[row] is not None else None
            p = None
            if params[row] is not None and _text(params[row], "params").strip():
                try:
                    p = json.loads(_text(params[row], "params"))
                except json.JSONDecodeError as e:
                    raise SpotdiffError(f"params of pair {row}: not valid JSON ({e})") from None
            out.append((pair_id, a[row], b[row], request_params(p, self.pipe, f"params of pair {row}")))
        return out

    def _image(self, data: Any, name: str, pair_id: str | None) -> np.ndarray:
        if not isinstance(data, (bytes, bytearray)):
            raise ImageError(f"{name}: expected encoded image bytes, got {type(data).__name__}")
        return decode_image(bytes(data), f"{name} of pair {pair_id or '?'}", max_pixels=self.max_pixels)

    def finalize(self) -> None:
        del self.pipe


def _text(value: Any, what: str) -> str:
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise SpotdiffError(f"{what}: not UTF-8 text") from None
    return str(value)
