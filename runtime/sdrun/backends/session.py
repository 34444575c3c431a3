"""Runnable graphs behind one interface: `run(feeds) -> dict`, `input_names`, `output_names`.

Providers: "cpu" (onnxruntime CPU), "cuda" (onnxruntime CUDA), "tensorrt" (the
bundle's native TensorRT engines for this GPU, `sdrun.backends.trt`; "tensorrt:fp16" /
"tensorrt:fp32" pick a precision), "openvino" (OpenVINO's CPU plugin, f32 or bf16:
`sdrun.backends.openvino_backend`). A GPU provider that is absent is an error,
never a silent CPU run.
"""
from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BundleError, ProviderError, SpotdiffError
from .cpu import default_threads, int8_clipping_warning
from .interface import ALL_PROVIDERS, ORT_PROVIDERS, Model, runs_on_cpu
from .memory import BudgetedModel, GraphCost, MemoryBudget

if TYPE_CHECKING:
    from ..bundle.bundle import Bundle

# What onnxruntime does with the memory of a call's activations once the call is over
# (measured on the full-size bundle: benchmarks/results/graph_memory*.md):
#   "arena"     onnxruntime's default: its CPU arena keeps the largest call's memory for good
#   "shrink"    the arena, shrunk back at the end of every run
#   "no-arena"  no arena: every tensor from malloc, freed after the run
ARENA_MODES = ("arena", "shrink", "no-arena")
DEFAULT_ARENA = "shrink"


class OnnxModel:
    """An ONNX graph in an onnxruntime session; `run` takes and returns dicts of arrays.

    Sessions are thread-safe for `run` in onnxruntime; creation is lazy and locked.
    """

    check_tolerance: float | None = None  # the bundle's own tolerance applies

    def __init__(self, path: str | Path, provider: str = "cpu", threads: int | None = None,
                 device: int = 0, arena: str | None = None):
        self.path = Path(path)
        self.arena = arena or os.environ.get("SDRUN_ORT_ARENA") or DEFAULT_ARENA
        if self.arena not in ARENA_MODES:
            raise ProviderError(f"arena mode {self.arena!r}: choose one of {', '.join(ARENA_MODES)}")
        self._run_options: Any = None  # onnxruntime's RunOptions, for the "shrink" arena
        if provider not in ORT_PROVIDERS:
            raise ProviderError(f"unknown provider {provider!r} for onnxruntime; choose one of "
                                f"{', '.join(ORT_PROVIDERS)}")
        self.provider = provider
        self.device = device
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ProviderError(f"threads={threads!r}: give a whole number of at least 1 (None: one per core)")
        self.threads = default_threads() if threads is None else threads
        self._session = None
        self._lock = threading.Lock()
        if provider != "cpu":
            require_ort_provider(provider)  # fail now, not at the first run

    def open(self) -> "OnnxModel":
        """Create the onnxruntime session now (it is created at the first use otherwise)."""
        self.session  # noqa: B018
        return self

    @property
    def session(self) -> Any:  # onnxruntime.InferenceSession
        if self._session is None:
            with self._lock:
                if self._session is None:
                    self._session = self._create()
        return self._session

    def _create(self):
        import onnxruntime as ort

        wanted = require_ort_provider(self.provider)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        # No spin-waiting: on shared cores it steals time from everything else.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Flush denormals to zero. Swin's shifted-window attention adds -100 to masked
        # logits, softmax turns them into exp(-100) ~ 4e-44 (a float32 denormal), and x86
        # arithmetic on denormals is many times slower: Grounding DINO's backbone ran 1.4x
        # slower (one MatMul 20x) with them. Values below 1.2e-38 change no output we
        # check (its golden outputs came out bit-identical).
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")
        opts.log_severity_level = 3
        if self.arena == "no-arena":
            opts.enable_cpu_mem_arena = False
        elif self.arena == "shrink":
            device = "cpu:0" if self.provider == "cpu" else f"cpu:0;gpu:{self.device}"
            self._run_options = ort.RunOptions()
            self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", device)
        providers: list = [wanted]
        if self.provider == "cuda":
            # fp32 means fp32: no TF32 matrix products (they break the 1e-5 golden check).
            providers = [(wanted, {"device_id": self.device, "use_tf32": 0})]
        try:
            if self.provider == "cpu":  # optimised graphs cached across processes
                from .ortcache import create_session

                session = create_session(ort, self.path, opts, providers)
            else:
                session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except SpotdiffError:
            raise
        except Exception as e:  # onnxruntime's InvalidProtobuf, Fail, ... derive from Exception
            detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise BundleError(f"{self.path}: onnxruntime cannot load this graph "
                              f"({type(e).__name__}: {detail[:300]}); rebuild the bundle "
                              "with `sdexport build`") from None
        if wanted not in session.get_providers():
            # onnxruntime quietly drops a provider whose libraries fail to load.
            raise ProviderError(
                f"{self.path}: onnxruntime could not start {wanted} (it runs with "
                f"{', '.join(session.get_providers())}); check the CUDA/cuDNN libraries "
                "onnxruntime-gpu needs")
        return session

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self.output_names
        outs = self.session.run(names, {k: feeds[k] for k in self.input_names}, self._run_options)
        return dict(zip(names, outs))


def require_ort_provider(provider: str) -> str:
    """The onnxruntime provider name for `provider`; ProviderError naming what to install."""
    import onnxruntime as ort

    wanted = ORT_PROVIDERS[provider]
    available = ort.get_available_providers()
    if wanted not in available:
        hint = " (pip install onnxruntime-gpu, in place of onnxruntime)" if provider == "cuda" else ""
        raise ProviderError(
            f"provider {provider!r} needs onnxruntime's {wanted}, which this onnxruntime "
            f"{ort.__version__} does not have{hint}; available: {', '.join(available)}")
    return wanted


def open_graph(bundle: Bundle, model: str, graph: str, provider: str = "cpu",
               threads: int | None = None, *, allow_onnx_fallback: bool = False,
               group: object | None = None, budget: MemoryBudget | None = None) -> Model:
    """The runnable form of one graph of a bundle for this provider.

    "tensorrt" opens the bundle's engine for this GPU and TensorRT version (see
    `sdrun.backends.trt`); when there is none, it is an error unless `allow_onnx_fallback`,
    which runs the ONNX graph with onnxruntime CUDA on the same GPU (with a warning).
    Engines opened with the same `group` (e.g. one Pipeline) share one CUDA stream.
    With a `budget`, every call is split into chunks that fit it (`sdrun.backends.memory`);
    on CPU a graph whose outputs depend on their batch runs one input per call.
    """
    opened = _open_graph(bundle, model, graph, provider, threads, allow_onnx_fallback, group)
    if budget is None:
        return opened
    cost = GraphCost.of(model, bundle.model(model)["graphs"][graph])
    return BudgetedModel(opened, cost, budget, label=f"{model}/{graph}",
                         exact=runs_on_cpu(provider))


def _open_graph(bundle, model, graph, provider, threads, allow_onnx_fallback, group):
    if provider not in ALL_PROVIDERS:
        raise ProviderError(f"unknown provider {provider!r}; choose one of {', '.join(ALL_PROVIDERS)}")
    if provider.startswith("tensorrt"):
        from .trt import open_engine, parse_provider

        def onnx_on_gpu(device: int) -> Model:
            path = bundle.path(bundle.model(model)["graphs"][graph]["file"])
            return OnnxModel(path, "cuda", threads, device=device)

        return open_engine(bundle, model, graph, parse_provider(provider)[1], group=group,
                           fallback=onnx_on_gpu if allow_onnx_fallback else None)
    if provider.startswith("openvino"):
        from .openvino_backend import open_openvino
        from .openvino_backend import parse_provider as parse_openvino

        return open_openvino(bundle, model, graph, parse_openvino(provider), threads)
    entry = bundle.model(model)["graphs"][graph]
    if provider == "cpu":
        warning = int8_clipping_warning(entry, f"{model}/{graph}")
        if warning:
            warnings.warn(warning, RuntimeWarning, stacklevel=2)
    return OnnxModel(bundle.path(entry["file"]), provider, threads)
