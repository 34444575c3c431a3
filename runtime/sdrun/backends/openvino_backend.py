"""OpenVINO's CPU plugin as a backend: the bundle's ONNX graphs as they are, in f32 or bf16.

onnxruntime's CPU provider has no bf16 path on x86 (its bf16 GEMM is ARM-only, AMX serves
only int8), so on CPUs with `avx512_bf16` (AMD Zen 4) or AMX (Xeon since Sapphire Rapids)
the bf16 units sit idle under it. OpenVINO (pip `openvino`, the `openvino` extra) reads ONNX
directly and runs it in bf16 there; its CPU plugin runs on AMD too.

Providers: "openvino:f32", "openvino:bf16", and "openvino": the bundle's measured per-graph
policy (`sdrun precision`, the manifest's "openvino" section) on a CPU with bf16, all-bf16
where the bundle has no policy, and f32 on a CPU without bf16. Traps:

- OpenVINO silently runs bf16 by default on bf16 CPUs, so the precision hint is always
  set explicitly, both ways.
- On a CPU without bf16 the bf16 hint is ignored (OpenVINO runs f32): `openvino:bf16`
  there gives f32 answers at f32 speed, with a warning.

Shapes stay as the ONNX graph declares them (a dynamic batch stays dynamic) with one
exception: a graph the pipeline calls with one input at a time (its outputs depend on the
batch: Grounding DINO, `GraphCost.batch_invariant`) is compiled for batch 1. OpenVINO's CPU
division is within 1 ulp, not exact (49.5 / 50 gives 0.98999995); with a dynamic batch,
Grounding DINO's proposal grid is divided at run time and its proposals at exactly 0.99
pass the model's `< 0.99` validity test, so a few query slots hold other boxes. With the
batch fixed, that grid is a constant that OpenVINO folds exactly, and the outputs are
PyTorch's (1e-6). Larger calls to such a model run one row at a time.

Compiled models are cached on disk through OpenVINO's own model cache (`CACHE_DIR`, which
maps the blob rather than reading it) in one folder per key: graph sha256, OpenVINO
version, precision and f32-kept parts, CPU flags (`<cache folder>/ov-compiled/`);
`SPOTDIFF_GRAPH_CACHE=0` turns it off as it does onnxruntime's.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import logging
import os
import threading
import warnings
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from ..errors import BundleError, ProviderError
from .cpu import cpu_flags, default_threads
from .memory import GraphCost, run_in_chunks
from .ortcache import cpu_signature
from .ortcache import enabled as cache_enabled

if TYPE_CHECKING:
    from ..bundle.bundle import Bundle

log = logging.getLogger(__name__)

PRECISIONS = ("f32", "bf16")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CACHE_SUBDIR = "ov-compiled"
# Golden-check tolerance (rel. L2 against PyTorch fp32) by precision. f32: OpenVINO fuses and
# orders sums differently from onnxruntime (measured up to 3e-6 on the bundles here); bf16
# keeps 8 bits of mantissa: the measurement on Zen 4 was up to 0.014 for OWL-ViT's
# outputs; a measured policy records each graph's own (`sdrun precision`).
TOLERANCE = {"f32": 1e-4, "bf16": 5e-2}

# The parts of a graph that a policy may keep in f32 while the rest runs bf16: substrings of
# OpenVINO's node names, which are the ONNX exporter's, named after the PyTorch module path
# ("/model/model/backbone/..." for ops, "model.model.backbone...." for weights). The
# encoder's part includes the two-stage query selection (enc_output, encoder_output_*).
PARTS: dict[str, dict[str, tuple[str, ...]]] = {
    "gdino": {
        "backbone": ("/model/model/backbone/", "/model/model/input_proj_vision", "/model/model/position_embedding",
                     "model.model.backbone.", "model.model.input_proj_vision"),
        "encoder": ("/model/model/encoder/", "/model/model/enc_output", "/model/model/encoder_output",
                    "model.model.encoder.", "model.model.enc_output", "model.model.encoder_output"),
        "decoder": ("/model/model/decoder/", "model.model.decoder."),
        "heads": ("/model/class_embed", "/model/bbox_embed", "model.class_embed", "model.bbox_embed"),
    },
}


def has_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU has native bf16 arithmetic OpenVINO uses (avx512_bf16 or AMX)."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in BF16_FLAGS)


def default_precision(flags: frozenset[str] | None = None) -> str:
    return "bf16" if has_bf16(flags) else "f32"


def parse_provider(provider: str) -> str | None:
    """"openvino" -> None (the bundle's policy), "openvino:bf16" -> "bf16"; ProviderError else."""
    name, _, precision = provider.partition(":")
    if name != "openvino" or (precision and precision not in PRECISIONS):
        raise ProviderError(f"unknown provider {provider!r}; OpenVINO's are openvino, "
                            f"{', '.join('openvino:' + p for p in PRECISIONS)}")
    return precision or None


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise ProviderError("provider 'openvino' needs OpenVINO: pip install 'spotdiff[openvino]' "
                            "(or pip install openvino)") from None
    return openvino


@lru_cache(maxsize=1)
def core() -> Any:
    """One OpenVINO Core per process (it owns the plugins and their thread pools)."""
    return import_openvino().Core()


def ov_version() -> str:
    return str(import_openvino().__version__).split("-")[0]


# ---- the precision policy -------------------------------------------------------------------
# A graph's precision is "f32", "bf16", or {part: precision} (bf16 with some parts kept f32).


def bundle_policy(bundle: Bundle) -> dict[str, Any]:
    """The measured policy recorded in a bundle: {"model/graph": precision}; {} if none."""
    section = bundle.manifest.get("openvino")
    return dict(section.get("policy", {})) if isinstance(section, dict) else {}


def graph_precision(bundle: Bundle, model: str, graph: str, requested: str | dict[str, str] | None,
                    flags: frozenset[str] | None = None) -> str | dict[str, str]:
    """The precision one graph runs at for `requested` ("f32", "bf16", {part: precision} or
    None: the policy)."""
    if requested is not None:
        return requested
    if not has_bf16(flags):
        return "f32"
    policy = bundle_policy(bundle)
    if not policy:
        return "bf16"
    return policy.get(f"{model}/{graph}", "f32")  # a graph the policy did not measure stays f32


def kept_f32(model: str, precision: str | dict[str, str]) -> tuple[str, tuple[str, ...]]:
    """(hint, name substrings kept in f32) for a graph precision."""
    if isinstance(precision, str):
        if precision not in PRECISIONS:
            raise BundleError(f"OpenVINO precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        return precision, ()
    parts = PARTS.get(model, {})
    unknown = sorted(set(precision) - set(parts))
    if unknown:
        raise BundleError(f"OpenVINO policy for {model}: unknown part(s) {', '.join(unknown)}; "
                          f"its parts are {', '.join(parts) or 'none'}")
    if all(p == "f32" for p in precision.values()) and len(precision) == len(parts):
        return "f32", ()
    keep = tuple(s for part, p in sorted(precision.items()) if p == "f32" for s in parts[part])
    return "bf16", keep


def describe(precision: str | dict[str, str]) -> str:
    if isinstance(precision, str):
        return precision
    return "bf16 (f32: " + (", ".join(sorted(k for k, v in precision.items() if v == "f32")) or "none") + ")"


def graph_tolerance(bundle: Bundle, model: str, graph: str, precision: str | dict[str, str]) -> float:
    """The rel-L2 a graph's golden check allows at this precision: the policy's measured one
    when the bundle records it, else the precision's default."""
    if precision == "f32":
        return TOLERANCE["f32"]
    section = bundle.manifest.get("openvino")
    recorded = section.get("tolerance", {}).get(f"{model}/{graph}") if isinstance(section, dict) else None
    return float(recorded) if recorded is not None else TOLERANCE["bf16"]


# ---- compiled models ------------------------------------------------------------------------
def cache_key(graph_sha256: str, version: str, hint: str, keep: tuple[str, ...], static_batch: bool = False) -> str:
    kept = f"-keep{hashlib.sha256('|'.join(keep).encode()).hexdigest()[:8]}" if keep else ""
    batch = "-b1" if static_batch else ""
    return f"{graph_sha256[:32]}-ov{version}-{hint}{kept}{batch}-cpu{cpu_signature()}"


def compile_config(hint: str, threads: int, cache: Path | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": hint,  # explicit both ways: bf16 CPUs default to bf16
        "EXECUTION_MODE_HINT": "ACCURACY" if hint == "f32" else "PERFORMANCE",
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "INFERENCE_NUM_THREADS": threads,  # 0: OpenVINO picks (one per physical core)
        "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,  # never int8 activations behind our back
        # no CPU_DENORMALS_OPTIMIZATION (onnxruntime's denormals-as-zero, see session.py): in
        # OpenVINO 2026.4, set on a process's first compile, it broke shape inference of
        # every later dynamic-shape call ("Broadcast ... Value -1 not in range")
    }
    if cache is not None:
        config["CACHE_DIR"] = str(cache)
    return config


@lru_cache(maxsize=1)
def _libm() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    except OSError:
        return None


@contextmanager
def default_float_env() -> Iterator[None]:
    """The calling thread's floating-point environment at its defaults for the duration.

    onnxruntime's denormals-as-zero (`session.OnnxModel`) sets the DAZ/FTZ bits of the thread
    that creates a session, and OpenVINO's shape inference, which runs in the calling thread,
    then fails ("Broadcast ... Value -1 not in range") on dynamic shapes. A process holding
    both (`sdrun precision`, tests) restores the defaults around every OpenVINO call and
    puts back what it found after."""
    libm = _libm()
    if libm is None:
        yield
        return
    saved = ctypes.create_string_buffer(64)  # fenv_t is 28-32 bytes on x86-64 and aarch64 glibc
    libm.fegetenv(saved)
    libm.fesetenv(ctypes.c_void_p(-1))  # FE_DFL_ENV
    try:
        yield
    finally:
        libm.fesetenv(saved)


def mark_f32(ov_model: Any, keep: tuple[str, ...]) -> int:
    """Keep every node whose name contains one of `keep` in f32 (OpenVINO's
    disable_fp16_compression runtime attribute, which the CPU plugin honours for bf16 too);
    returns how many nodes were marked."""
    marked = 0
    for node in ov_model.get_ops():
        name = node.get_friendly_name()
        if any(s in name for s in keep):
            node.get_rt_info()["disable_fp16_compression_0"] = ""
            marked += 1
    return marked


class OpenVinoModel:
    """An ONNX graph compiled by OpenVINO's CPU plugin; `run` takes and returns dicts of arrays.

    Compilation is lazy and locked; each thread gets its own infer request (a compiled
    model is shared, a request is not thread-safe)."""


    def __init__(self, path: str | Path, precision: str | dict[str, str] = "f32", threads: int | None = None,
                 model: str = "", tolerance: float | None = None, sha256: str | None = None,
                 declared: Sequence[str] = (), static_batch: bool = False):
        """`declared`: the graph's input and output names (the manifest's), to name its ports.
        `static_batch`: compile for batch 1 (module docstring)."""
        self.path = Path(path)
        self.static_batch = static_batch
        self.declared = tuple(declared)
        self.model = model
        self.precision = precision
        self.hint, self.keep = kept_f32(model, precision)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ProviderError(f"threads={threads!r}: give a whole number of at least 1 (None: one per core)")
        self.threads = default_threads() if threads is None else threads
        self.check_tolerance = tolerance
        self.sha256 = sha256
        self._compiled: Any = None
        self._names: list[str] = []
        self._inputs: list[str] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        import_openvino()  # fail now, not at the first run
        if self.hint == "bf16" and not has_bf16():
            warnings.warn(f"{self.path.name}: this CPU has no bf16 arithmetic (avx512_bf16 or AMX); "
                          "OpenVINO runs it in f32", RuntimeWarning, stacklevel=2)

    @property
    def provider(self) -> str:
        return f"openvino:{describe(self.precision)}"

    def open(self) -> "OpenVinoModel":
        self.compiled  # noqa: B018
        return self

    def cache_folder(self) -> Path | None:
        if not cache_enabled():
            return None
        from ..bundle.digests import DigestCache, cache_dir

        sha = self.sha256
        if sha is None:  # a graph outside a bundle: hashed once, remembered like a bundle's files
            digests = DigestCache()
            sha = digests.sha256(self.path)
            digests.save()
        folder = cache_dir() / CACHE_SUBDIR / cache_key(sha, ov_version(), self.hint, self.keep, self.static_batch)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:  # the cache cannot be written: never an error
            return None
        return folder

    @property
    def compiled(self) -> Any:
        if self._compiled is None:
            with self._lock:
                if self._compiled is None:
                    with default_float_env():
                        self._compiled = self._compile()
        return self._compiled

    def _compile(self) -> Any:
        folder = self.cache_folder()
        config = compile_config(self.hint, self.threads, folder)
        try:
            # from a path: with a cached blob OpenVINO hashes the file and maps the blob, it
            # does not build the graph in memory
            source = self._source(folder) if folder is not None else None
            try:
                compiled = core().compile_model(str(source) if source else self._graph(), "CPU", config)
            except Exception as e:
                if source is None or source == self.path:
                    raise
                # a damaged IR in the cache must never stop a run: drop it, use the graph
                warnings.warn(f"{source}: cached graph unusable ({type(e).__name__}); using {self.path}",
                              RuntimeWarning, stacklevel=2)
                for f in (source, source.with_suffix(".bin")):
                    f.unlink(missing_ok=True)
                compiled = core().compile_model(self._graph(), "CPU", compile_config(self.hint, self.threads, None))
        except Exception as e:  # OpenVINO raises RuntimeError/Exception subclasses of its own
            detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise BundleError(f"{self.path}: OpenVINO cannot compile this graph "
                              f"({type(e).__name__}: {detail[:300]}); run it with --provider cpu") from None
        self._inputs = [port_name(p, self.declared) for p in compiled.inputs]
        self._names = [port_name(p, self.declared) for p in compiled.outputs]
        return compiled

    def _graph(self) -> Any:
        """The graph as OpenVINO compiles it: batch fixed to 1 and parts kept in f32 as asked."""
        ov_model = core().read_model(str(self.path))
        if self.static_batch:
            ov_model.reshape({p.get_any_name(): [1, *list(p.get_partial_shape())[1:]] for p in ov_model.inputs})
        if self.keep:
            n = mark_f32(ov_model, self.keep)
            log.info("%s: %d nodes kept in f32 (%s)", self.path.name, n, describe(self.precision))
        return ov_model

    def _source(self, folder: Path) -> Path | None:
        """The file to compile: the bundle's graph, or (batch fixed or parts marked) that graph
        as OpenVINO IR saved once in the cache folder, so that later starts compile from a
        path too (a warm start of Grounding DINO: 2 s instead of 7). None: the IR could not
        be saved, compile from memory."""
        if not (self.keep or self.static_batch):
            return self.path
        xml, bin_ = folder / "graph.xml", folder / "graph.bin"
        if not (xml.is_file() and bin_.is_file()):
            ov = import_openvino()
            tmp = folder / f".graph-{os.getpid()}-{threading.get_ident()}.xml"
            try:
                ov.save_model(self._graph(), str(tmp), compress_to_fp16=False)
                os.replace(tmp.with_suffix(".bin"), bin_)  # the weights first: an .xml is never without them
                os.replace(tmp, xml)
            except OSError:  # a cache that cannot be written: compile from memory this once
                for t in (tmp, tmp.with_suffix(".bin")):
                    t.unlink(missing_ok=True)
                return None
        return xml

    @property
    def input_names(self) -> list[str]:
        self.compiled  # noqa: B018
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        self.compiled  # noqa: B018
        return list(self._names)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.compiled  # noqa: B018  (names the inputs)
        if self.static_batch:  # compiled for batch 1: a larger call runs row by row
            return run_in_chunks(self._run_once, feeds, self._inputs, 1)
        return self._run_once(feeds)

    def _run_once(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        compiled = self.compiled
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = compiled.create_infer_request()
        with default_float_env():
            request.infer({k: np.ascontiguousarray(feeds[k]) for k in self._inputs})
        # the request's output tensors are reused by its next call: copy them out
        return {n: np.array(request.get_output_tensor(i).data, copy=True) for i, n in enumerate(self._names)}


def port_name(port: Any, declared: Sequence[str] = ()) -> str:
    """The ONNX name of an OpenVINO port. A port carries every tensor name merged into it
    (an input cast at once also answers to '/vision_model/Cast_output_0'): the one the
    graph declares, else the one that is not an exporter's internal '/...' name."""
    names = sorted(port.get_names())
    for n in names:
        if n in declared:
            return n
    outer = [n for n in names if not n.startswith("/")]
    return (outer or names or [port.get_any_name()])[0]


def open_openvino(bundle: Bundle, model: str, graph: str, requested: str | dict[str, str] | None,
                  threads: int | None) -> OpenVinoModel:
    """One graph of a bundle under OpenVINO at `requested` precision (None: the policy's),
    compiled as the pipeline runs it (batch 1 where its outputs depend on the batch)."""
    entry = bundle.model(model)["graphs"][graph]
    if entry.get("precision") == "int8":
        raise ProviderError(f"{model}/{graph} is an int8 graph (onnxruntime's dynamic quantisation); "
                            "OpenVINO runs the fp32 bundle: use --provider cpu for int8 bundles")
    precision = graph_precision(bundle, model, graph, requested)
    meta = bundle.manifest["files"].get(entry["file"], {})
    return OpenVinoModel(bundle.path(entry["file"]), precision, threads, model=model,
                         tolerance=graph_tolerance(bundle, model, graph, precision),
                         sha256=meta.get("sha256"),
                         declared=[io["name"] for io in entry.get("inputs", []) + entry.get("outputs", [])],
                         static_batch=not GraphCost.of(model, entry).batch_invariant)
