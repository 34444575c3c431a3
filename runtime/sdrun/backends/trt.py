"""TensorRT engines of a bundle: keys, lookup, and a session that runs one.

An engine only runs on the GPU architecture and TensorRT version it was built
with, so a bundle keeps engines under a key of both plus the precision:
`sm90-trt10.16.1-fp16`. Files are `trt/<key>/<model>_<graph>.engine`, listed in
the manifest's `files` (sha256) and described in its `engines` section:

    "engines": {"sm90-trt10.16.1-fp16": {
        "gpu": "sm90", "gpu_name": "NVIDIA H200", "tensorrt": "10.16.1.11",
        "precision": "fp16", "tolerance": {"rel_l2": 0.01}, "built": "...",
        "graphs": {"owlvit/image": {
            "file": "trt/sm90-trt10.16.1-fp16/owlvit_image.engine",
            "onnx_file": "owlvit/image.onnx", "onnx_sha256": "...", "max_batch_pairs": 8,
            "profiles": {"pixel_values": {"min": [1, 3, 768, 768], "opt": [4, ...], "max": [32, ...]}},
            "typing": "weak", "stage": "normalization+sampling",
            "pinned_fp32": ["normalization"], "pinned_layers": 25, "pinned_counts": {...},
            "pinned_file": "trt/<key>/owlvit_image.pinned.json",
            "check": {"ok": true, "max_rel_l2": 0.0012, "tolerance": 0.01, "outputs": {...}}}}}}

A graph whose engine failed its golden check at every pinning stage has an entry
with "failed" and no "file"; it is never used.

Nothing here imports tensorrt, cuda-python or CuPy at module level: `import sdrun`
and CPU runs work without them. `TrtModel` has the interface of `OnnxModel`
(`run(feeds) -> dict`, `input_names`, `output_names`); device buffers come from
cuda-python (or CuPy), never torch; host staging buffers are pinned; all engines
of one pipeline share one CUDA stream.
"""
from __future__ import annotations

import ctypes
import re
import threading
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..errors import BundleError, ProviderError
from .interface import ALL_PROVIDERS, Model
from .memory import run_in_chunks

if TYPE_CHECKING:
    from ..bundle.bundle import Bundle

ENGINE_DIR = "trt"
PRECISIONS = ("fp16", "fp32")
# Golden-check tolerance (relative L2 against PyTorch fp32) of engines by precision.
ENGINE_TOLERANCE = {"fp16": 1e-2, "fp32": 1e-4}
KEY_RE = re.compile(r"^sm(?P<arch>\d+)-trt(?P<trt>\d+(?:\.\d+)*)-(?P<precision>fp16|fp32)$")
BUILD_HINT = "sdexport engines {bundle} --precision {precision}"


class EngineError(ProviderError):
    """No usable TensorRT engine for this GPU / TensorRT version / graph."""


class EngineFallbackWarning(UserWarning):
    """An engine did not match; the ONNX graph runs with onnxruntime CUDA instead."""


# ---- keys ------------------------------------------------------------------------
def trt_short_version(version: str) -> str:
    """`10.16.1.11` -> `10.16.1` (major.minor.patch: what engine compatibility follows)."""
    return ".".join(str(version).split(".")[:3])


def engine_key(arch: str, trt_version: str, precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    arch = arch if arch.startswith("sm") else f"sm{arch}"
    return f"{arch}-trt{trt_short_version(trt_version)}-{precision}"


def parse_key(key: str) -> tuple[str, str, str]:
    """`sm90-trt10.9.0-fp16` -> ("sm90", "10.9.0", "fp16")."""
    m = KEY_RE.match(key)
    if not m:
        raise ValueError(f"{key!r} is not an engine key (expected e.g. sm90-trt10.9.0-fp16)")
    return f"sm{m['arch']}", m["trt"], m["precision"]


def engine_file(key: str, model: str, graph: str) -> str:
    return f"{ENGINE_DIR}/{key}/{model}_{graph}.engine"


# ---- optional imports --------------------------------------------------------------
def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as e:
        raise ProviderError(
            "TensorRT engines (provider 'tensorrt', sdexport engines) need NVIDIA TensorRT's "
            f"Python package, which does not import ({e}): pip install tensorrt-cu13 "
            "(or tensorrt-cu12, matching your CUDA) cuda-python") from None
    return tensorrt


# ---- the CUDA layer: device memory, pinned host memory, streams -----------------------
class CudaApi:
    """The few CUDA runtime calls the engines need; one implementation per library."""

    library = "?"

    def device_count(self) -> int: raise NotImplementedError
    def capability(self, device: int) -> tuple[int, int]: raise NotImplementedError
    def device_name(self, device: int) -> str: raise NotImplementedError
    def set_device(self, device: int) -> None: ...
    def malloc(self, nbytes: int) -> int: raise NotImplementedError
    def free(self, ptr: int) -> None: ...
    def host_alloc(self, nbytes: int) -> tuple[Any, np.ndarray]: raise NotImplementedError  # (handle, uint8 view)
    def host_free(self, handle: Any) -> None: ...
    def stream_create(self) -> Any: ...
    def stream_handle(self, stream: Any) -> int: raise NotImplementedError
    def stream_destroy(self, stream: Any) -> None: ...
    def stream_sync(self, stream: Any) -> None: ...
    def htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None: ...
    def dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None: ...


class CudaPythonApi(CudaApi):
    """NVIDIA's cuda-python (`cuda.bindings.runtime`; `cuda.cudart` in older releases)."""

    library = "cuda-python"

    def __init__(self):
        try:
            from cuda.bindings import runtime as rt
        except ImportError:
            from cuda import cudart as rt
        self.rt = rt

    def _call(self, what, result):
        if isinstance(result, tuple):
            err, rest = result[0], result[1:]
        else:
            err, rest = result, ()
        if int(err) != 0:
            name = getattr(err, "name", str(err))
            raise ProviderError(f"CUDA {what} failed: {name}")
        return rest[0] if len(rest) == 1 else rest

    def device_count(self) -> int:
        return int(self._call("cudaGetDeviceCount", self.rt.cudaGetDeviceCount()))

    def capability(self, device: int) -> tuple[int, int]:
        p = self._call("cudaGetDeviceProperties", self.rt.cudaGetDeviceProperties(device))
        return int(p.major), int(p.minor)

    def device_name(self, device: int) -> str:
        p = self._call("cudaGetDeviceProperties", self.rt.cudaGetDeviceProperties(device))
        name = p.name
        if isinstance(name, (bytes, bytearray)):
            name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
        return str(name)

    def set_device(self, device: int) -> None:
        self._call("cudaSetDevice", self.rt.cudaSetDevice(device))

    def malloc(self, nbytes: int) -> int:
        return int(self._call("cudaMalloc", self.rt.cudaMalloc(max(int(nbytes), 1))))

    def free(self, ptr: int) -> None:
        self._call("cudaFree", self.rt.cudaFree(ptr))

    def host_alloc(self, nbytes: int) -> tuple[Any, np.ndarray]:
        nbytes = max(int(nbytes), 1)
        ptr = int(self._call("cudaMallocHost", self.rt.cudaMallocHost(nbytes)))
        view = np.ctypeslib.as_array((ctypes.c_ubyte * nbytes).from_address(ptr))
        return ptr, view

    def host_free(self, handle: Any) -> None:
        self._call("cudaFreeHost", self.rt.cudaFreeHost(handle))

    def stream_create(self) -> Any:
        return self._call("cudaStreamCreate", self.rt.cudaStreamCreate())

    def stream_handle(self, stream: Any) -> int:
        return int(stream)

    def stream_destroy(self, stream: Any) -> None:
        self._call("cudaStreamDestroy", self.rt.cudaStreamDestroy(stream))

    def stream_sync(self, stream: Any) -> None:
        self._call("cudaStreamSynchronize", self.rt.cudaStreamSynchronize(stream))

    def htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call("cudaMemcpyAsync (host to device)",
                   self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, stream))

    def dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call("cudaMemcpyAsync (device to host)",
                   self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, stream))


class CupyApi(CudaApi):
    """CuPy's CUDA runtime wrappers (used when cuda-python is absent)."""

    library = "cupy"

    def __init__(self):
        import cupy

        self.cp = cupy
        self.rt = cupy.cuda.runtime

    def device_count(self) -> int:
        return int(self.rt.getDeviceCount())

    def capability(self, device: int) -> tuple[int, int]:
        p = self.rt.getDeviceProperties(device)
        return int(p["major"]), int(p["minor"])

    def device_name(self, device: int) -> str:
        name = self.rt.getDeviceProperties(device)["name"]
        return name.decode(errors="replace") if isinstance(name, bytes) else str(name)

    def set_device(self, device: int) -> None:
        self.rt.setDevice(device)

    def malloc(self, nbytes: int) -> int:
        return int(self.rt.malloc(max(int(nbytes), 1)))

    def free(self, ptr: int) -> None:
        self.rt.free(ptr)

    def host_alloc(self, nbytes: int) -> tuple[Any, np.ndarray]:
        nbytes = max(int(nbytes), 1)
        mem = self.cp.cuda.alloc_pinned_memory(nbytes)
        return mem, np.frombuffer(mem, np.uint8, nbytes)

    def host_free(self, handle: Any) -> None:
        pass  # freed when the PinnedMemoryPointer is dropped

    def stream_create(self) -> Any:
        return self.cp.cuda.Stream(non_blocking=True)

    def stream_handle(self, stream: Any) -> int:
        return int(stream.ptr)

    def stream_destroy(self, stream: Any) -> None:
        pass

    def stream_sync(self, stream: Any) -> None:
        stream.synchronize()

    def htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        self.rt.memcpyAsync(dst, src.ctypes.data, src.nbytes, self.rt.memcpyHostToDevice, stream.ptr)

    def dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        self.rt.memcpyAsync(dst.ctypes.data, src, dst.nbytes, self.rt.memcpyDeviceToHost, stream.ptr)


def cuda_api() -> CudaApi:
    """cuda-python if importable, else CuPy; ProviderError naming what to install."""
    errors = []
    for cls in (CudaPythonApi, CupyApi):
        try:
            return cls()
        except ImportError as e:
            errors.append(f"{cls.library}: {e}")
    raise ProviderError("provider 'tensorrt' needs cuda-python or CuPy for device memory, and "
                        f"neither imports ({'; '.join(errors)}): pip install cuda-python")


@dataclass(frozen=True)
class GpuInfo:
    device: int
    arch: str  # sm90
    name: str
    library: str


def gpu_info(api: CudaApi | None = None, device: int = 0) -> GpuInfo:
    """The CUDA device engines are built for / run on; ProviderError if there is none."""
    api = api or cuda_api()
    try:
        n = api.device_count()
    except ProviderError as e:
        raise ProviderError(f"no usable CUDA device ({e}); provider 'tensorrt' needs an NVIDIA "
                            "GPU with a working driver") from None
    if n <= device:
        raise ProviderError(f"no CUDA device {device} ({n} found); provider 'tensorrt' needs an "
                            "NVIDIA GPU")
    major, minor = api.capability(device)
    return GpuInfo(device, f"sm{major}{minor}", api.device_name(device), api.library)


def current_key(precision: str, device: int = 0, api: CudaApi | None = None) -> str:
    trt = import_tensorrt()
    return engine_key(gpu_info(api, device).arch, trt.__version__, precision)


# ---- one stream per pipeline ------------------------------------------------------------
class DeviceContext:
    """The CUDA API, device and stream that a group of engines (one pipeline) share."""

    def __init__(self, api: CudaApi | None = None, device: int = 0):
        self.api = api or cuda_api()
        self.device = device
        self.api.set_device(device)
        self.stream = self.api.stream_create()
        self.handle = self.api.stream_handle(self.stream)

    def __del__(self):
        try:
            self.api.stream_destroy(self.stream)
        except Exception:  # interpreter shutdown, context gone
            pass


_contexts: "weakref.WeakKeyDictionary[Any, DeviceContext]" = weakref.WeakKeyDictionary()
_contexts_lock = threading.Lock()


def device_context(group: object | None = None, device: int = 0) -> DeviceContext:
    """The shared context of `group` (e.g. a Pipeline): one CUDA stream per group."""
    if group is None:
        return DeviceContext(device=device)
    with _contexts_lock:
        ctx = _contexts.get(group)
        if ctx is None:
            ctx = _contexts[group] = DeviceContext(device=device)
        return ctx


# ---- the session -----------------------------------------------------------------------
class _Buffer:
    """A device buffer and its pinned host twin, grown on demand."""

    def __init__(self, api: CudaApi):
        self.api, self.nbytes = api, 0
        self.dptr: Any = None  # the device pointer (an int) once `ensure` ran
        self.host_handle: Any = None
        self.host: Any = None  # the pinned uint8 np.ndarray once `ensure` ran

    def ensure(self, nbytes: int):
        if nbytes <= self.nbytes:
            return
        self.release()
        self.dptr = self.api.malloc(nbytes)
        self.host_handle, self.host = self.api.host_alloc(nbytes)
        self.nbytes = nbytes

    def view(self, dtype, shape) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        return self.host[:n].view(dtype).reshape(shape)

    def release(self):
        if self.dptr is not None:
            self.api.free(self.dptr)
            self.api.host_free(self.host_handle)
        self.nbytes, self.dptr, self.host_handle, self.host = 0, None, None, None


class TrtModel:
    """A serialized TensorRT engine with the interface of `OnnxModel`.

    Input shapes are set per call (dynamic batch within the engine's profile); a
    batch above the profile's maximum runs in chunks. One execution context per
    model, guarded by a lock; inputs and outputs go through pinned host buffers on
    the context's stream.
    """

    provider = "tensorrt"

    def __init__(self, path: str | Path, context: DeviceContext | None = None, *,
                 key: str | None = None, tolerance: float | None = None, label: str = ""):
        self.path = Path(path)
        self.key = key
        self.check_tolerance = tolerance
        self.label = label or self.path.name
        self._ctx = context
        self._lock, self._open_lock = threading.Lock(), threading.Lock()
        self.trt = import_tensorrt()
        self._engine: Any = None  # deserialised by `open`, at the first use (as onnxruntime's sessions)
        self._inputs: list[str] = []
        self._outputs: list[str] = []
        self._dtypes: dict[str, np.dtype] = {}
        self._max_batch: int | None = None
        self._context = None
        self._buffers: dict[str, _Buffer] = {}

    def open(self) -> "TrtModel":
        """Deserialise the engine now (EngineError when this TensorRT cannot load it)."""
        if self._engine is not None:
            return self
        with self._open_lock:
            if self._engine is None:
                e, trt = self._deserialize(), self.trt
                for i in range(e.num_io_tensors):
                    name = e.get_tensor_name(i)
                    self._dtypes[name] = np.dtype(trt.nptype(e.get_tensor_dtype(name)))
                    if e.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                        self._inputs.append(name)
                        shape = tuple(e.get_tensor_shape(name))
                        if shape and shape[0] == -1:
                            hi = tuple(e.get_tensor_profile_shape(name, 0)[2])[0]
                            self._max_batch = hi if self._max_batch is None else min(self._max_batch, hi)
                    else:
                        self._outputs.append(name)
                self._engine = e
        return self

    def _deserialize(self):
        trt = self.trt
        self._logger = trt.Logger(trt.Logger.ERROR)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise EngineError(f"{self.path}: TensorRT {trt.__version__} cannot load this engine "
                              "(built with another TensorRT version or for another GPU, or the "
                              "file is damaged)")
        return engine

    @property
    def input_names(self) -> list[str]:
        return list(self.open()._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self.open()._outputs)

    @property
    def max_batch(self) -> int | None:
        return self.open()._max_batch

    def _buffer(self, name: str, api: CudaApi) -> _Buffer:
        buf = self._buffers.get(name)
        if buf is None:
            buf = self._buffers[name] = _Buffer(api)
        return buf

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.open()
        missing = [n for n in self._inputs if n not in feeds]
        if missing:
            raise ValueError(f"{self.label}: missing input(s) {', '.join(missing)}")
        if self._max_batch is None:
            return self._run_once(feeds)
        return run_in_chunks(self._run_once, feeds, self._inputs, self._max_batch)

    def _run_once(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            if self._ctx is None:
                self._ctx = device_context()
            if self._context is None:
                self._context = self._engine.create_execution_context()
                if self._context is None:
                    raise EngineError(f"{self.label}: TensorRT could not create an execution "
                                      "context (out of GPU memory?)")
            api, stream, ctx = self._ctx.api, self._ctx.stream, self._context
            if self._ctx.device:
                api.set_device(self._ctx.device)  # the current device is per host thread
            for name in self._inputs:
                arr = np.ascontiguousarray(feeds[name], dtype=self._dtypes[name])
                if not ctx.set_input_shape(name, tuple(arr.shape)):
                    prof = self._engine.get_tensor_profile_shape(name, 0)
                    raise ValueError(f"{self.label}: input {name} of shape {arr.shape} is outside "
                                     f"the engine's profile (min {tuple(prof[0])}, max {tuple(prof[2])})")
                buf = self._buffer(name, api)
                buf.ensure(arr.nbytes)
                host = buf.view(arr.dtype, arr.shape)
                np.copyto(host, arr)
                api.htod_async(buf.dptr, host, stream)
                ctx.set_tensor_address(name, buf.dptr)
            shapes = {}
            for name in self._outputs:
                shape = tuple(ctx.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise EngineError(f"{self.label}: output {name} has data-dependent shape {shape}")
                shapes[name] = shape
                buf = self._buffer(name, api)
                buf.ensure(int(np.prod(shape, dtype=np.int64)) * self._dtypes[name].itemsize)
                ctx.set_tensor_address(name, buf.dptr)
            if not ctx.execute_async_v3(self._ctx.handle):
                raise EngineError(f"{self.label}: TensorRT execution failed")
            outs = {}
            for name in self._outputs:
                buf = self._buffers[name]
                host = buf.view(self._dtypes[name], shapes[name])
                api.dtoh_async(host, buf.dptr, stream)
                outs[name] = host
            api.stream_sync(stream)
            return {k: v.copy() for k, v in outs.items()}

    def close(self) -> None:
        with self._lock:
            for buf in self._buffers.values():
                buf.release()
            self._buffers.clear()
            self._context = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# ---- lookup in a bundle ---------------------------------------------------------------
def engines_section(bundle: Bundle) -> dict:
    return bundle.manifest.get("engines", {}) or {}


def _stale_reason(bundle, entry: dict) -> str | None:
    onnx_rel = entry.get("onnx_file")
    if onnx_rel and entry.get("onnx_sha256"):
        current = bundle.manifest["files"].get(onnx_rel, {}).get("sha256")
        if current != entry["onnx_sha256"]:
            return f"it was built from another version of {onnx_rel}"
    return None


def engine_problem(bundle: Bundle, entry: dict) -> str | None:
    """Why an engine entry of the bundle cannot be used (failed its golden check, or built
    from another version of its ONNX graph), or None when it can."""
    if not entry.get("file") or not entry.get("check", {}).get("ok", False):
        return "failed its golden check" + (f" ({entry['failed']})" if entry.get("failed") else "")
    stale = _stale_reason(bundle, entry)
    return f"is stale: {stale}" if stale else None


def find_engine(bundle: Bundle, model: str, graph: str, arch: str, trt_version: str,
                precision: str | None = None) -> tuple[str, dict]:
    """The (key, graph entry) of a usable engine for this GPU + TensorRT, preferring fp16
    (or only `precision`). Raises EngineError saying which keys the bundle has and why none fits."""
    section = engines_section(bundle)
    name = f"{model}/{graph}"
    order = [precision] if precision else list(PRECISIONS)
    wanted = [engine_key(arch, trt_version, p) for p in order]
    reasons = []
    for key in wanted:
        entry = section.get(key, {}).get("graphs", {}).get(name)
        if entry is None:
            continue
        problem = engine_problem(bundle, entry)
        if problem:
            reasons.append(f"{key}'s {name} engine {problem}")
            continue
        return key, entry
    have = ", ".join(f"{k} ({len(v.get('graphs', {}))} graphs)" for k, v in sorted(section.items()))
    why = "; ".join(reasons)
    raise EngineError(
        f"{bundle.root}: no usable TensorRT engine for {name} on this machine "
        f"(looked for {' or '.join(wanted)}; GPU {arch}, TensorRT {trt_version})"
        + (f": {why}" if why else "")
        + f". The bundle has engines for: {have or 'none'}. Build them here with "
        f"`{BUILD_HINT.format(bundle=bundle.root, precision=precision or 'fp16')}`, or allow "
        "running the ONNX graph with onnxruntime CUDA on this GPU (--allow-onnx-fallback; "
        "allow_onnx_fallback=True in Python).")


def parse_provider(provider: str) -> tuple[str, str | None]:
    """`tensorrt` / `tensorrt:fp16` -> ("tensorrt", None | "fp16")."""
    base, _, precision = provider.partition(":")
    if precision and (base != "tensorrt" or precision not in PRECISIONS):
        raise ProviderError(f"unknown provider {provider!r}; choose one of {', '.join(ALL_PROVIDERS)}")
    return base, precision or None


def open_engine(bundle: Bundle, model: str, graph: str, precision: str | None = None, *,
                group: object | None = None, fallback: Callable[[int], Model] | None = None) -> Model:
    """A TrtModel for this graph; when the bundle has no usable engine, an EngineError,
    or with `fallback` (device -> a Model of the ONNX graph on that GPU, which
    `session.open_graph` passes for --allow-onnx-fallback) that model and an
    EngineFallbackWarning. Never runs on the CPU."""
    trt = import_tensorrt()
    info = gpu_info(cuda_api())  # a clear error without a GPU, before any CUDA call
    ctx = device_context(group, info.device)
    try:
        key, entry = find_engine(bundle, model, graph, info.arch, trt.__version__, precision)
        try:
            path = bundle.path(entry["file"])
        except BundleError as e:
            raise EngineError(str(e)) from None
        tol = section_tolerance(engines_section(bundle)[key])
        engine = TrtModel(path, ctx, key=key, tolerance=tol, label=f"{model}/{graph} [{key}]")
        # opened at the first use, unless a fallback must be chosen now: only loading tells
        return engine.open() if fallback is not None else engine
    except EngineError as e:
        if fallback is None:
            raise
        try:
            model_on_gpu = fallback(info.device)
        except ProviderError as e2:
            raise ProviderError(f"{e}\nThe ONNX fallback is not possible either: {e2}") from None
        warnings.warn(f"{e} Falling back to onnxruntime CUDA for {model}/{graph} on "
                      f"{info.name} ({info.arch}).", EngineFallbackWarning, stacklevel=3)
        return model_on_gpu


def section_tolerance(section: dict) -> float:
    tol = section.get("tolerance", {}).get("rel_l2")
    return float(tol) if tol is not None else ENGINE_TOLERANCE[section.get("precision", "fp16")]
