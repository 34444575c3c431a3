"""A fake `tensorrt` and a fake `cuda.bindings.runtime` for CPU tests.

Enough of both APIs for sdrun.backends.trt and sdexport.engines: Logger, Builder,
NetworkDefinitionCreationFlag, OnnxParser (layers made from the ONNX nodes),
BuilderFlag, IBuilderConfig, optimisation profiles, layer precision setters,
build_serialized_network (bytes: a JSON header + the ONNX graph), Runtime,
ICudaEngine, IExecutionContext; cudaMalloc & co over a dict of bytearrays,
pinned host memory from ctypes buffers.

The fake "engine" runs the ONNX graph with onnxruntime CPU, so golden checks on
engines are meaningful. Its fp16 is modelled: outputs rounded through float16,
and if any layer of a type in `FP16_UNSAFE` runs in fp16 (not pinned to fp32 with
OBEY_PRECISION_CONSTRAINTS, or left fp16 in a strongly typed graph), every output
is off by 10% (as a LayerNorm overflow would make it). An engine only loads with
the same fake TensorRT version and on the same fake GPU architecture.

    install(monkeypatch, arch=(9, 0), version="10.9.0.34")   # in a test
    STATE.arch = (8, 6)                                       # "another GPU"
"""
from __future__ import annotations

import ctypes
import enum
import hashlib
import itertools
import json
import struct
import sys
import types

import numpy as np

__version__ = "10.9.0.34"
MAGIC = b"FAKETRT1"
FP16_UNSAFE = {"NORMALIZATION"}


class _State:
    def __init__(self):
        self.reset()

    def reset(self, arch=(9, 0), device_count=1, name="Fake H200"):
        self.arch, self.device_count, self.name = arch, device_count, name
        self.fail_always = False          # every engine misses the golden check
        self.builds: list[dict] = []      # headers of every build_serialized_network call
        self.executions: list[dict] = []  # input shapes of every execute_async_v3
        self.streams = 0
        self.device: dict[int, bytearray] = {}
        self.host: dict[int, ctypes.Array] = {}
        self.parsed: list[bytes] = []     # ONNX bytes each parser saw


STATE = _State()


# ---- enums -------------------------------------------------------------------------------
class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    INT64 = 8


float32, float16, int8, int32, int64 = (DataType.FLOAT, DataType.HALF, DataType.INT8,
                                         DataType.INT32, DataType.INT64)
_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
       DataType.INT32: np.int32, DataType.BOOL: np.bool_, DataType.INT64: np.int64}
_ONNX_DT = {1: DataType.FLOAT, 10: DataType.HALF, 3: DataType.INT8, 6: DataType.INT32,
            7: DataType.INT64, 9: DataType.BOOL}


def nptype(dt):
    return _NP[dt]


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class LayerType(enum.Enum):
    CONVOLUTION = 0
    ACTIVATION = 1
    ELEMENTWISE = 2
    UNARY = 3
    REDUCE = 4
    SOFTMAX = 5
    MATRIX_MULTIPLY = 6
    SHUFFLE = 7
    CONSTANT = 8
    SHAPE = 9
    GATHER = 10
    SLICE = 11
    CONCATENATION = 12
    NORMALIZATION = 13
    GRID_SAMPLE = 14
    CAST = 15
    IDENTITY = 16
    SELECT = 17
    TOPK = 18
    RESIZE = 19
    PLUGIN = 20


_OP_LAYER = {
    "Conv": "CONVOLUTION", "Relu": "ACTIVATION", "Sigmoid": "ACTIVATION", "Elu": "ACTIVATION",
    "Clip": "ACTIVATION", "Add": "ELEMENTWISE", "Sub": "ELEMENTWISE", "Mul": "ELEMENTWISE",
    "Div": "ELEMENTWISE", "Pow": "ELEMENTWISE", "Equal": "ELEMENTWISE", "Sqrt": "UNARY",
    "Erf": "UNARY", "Exp": "UNARY", "Abs": "UNARY", "Log": "UNARY", "Cos": "UNARY",
    "Sin": "UNARY", "ReduceMean": "REDUCE", "ReduceSum": "REDUCE", "ReduceL2": "REDUCE",
    "ReduceMax": "REDUCE", "ReduceMin": "REDUCE", "Softmax": "SOFTMAX", "MatMul": "MATRIX_MULTIPLY",
    "Gemm": "MATRIX_MULTIPLY", "Reshape": "SHUFFLE", "Transpose": "SHUFFLE", "Squeeze": "SHUFFLE",
    "Unsqueeze": "SHUFFLE", "Flatten": "SHUFFLE", "Constant": "CONSTANT", "Shape": "SHAPE",
    "Gather": "GATHER", "Slice": "SLICE", "Concat": "CONCATENATION",
    "LayerNormalization": "NORMALIZATION", "InstanceNormalization": "NORMALIZATION",
    "GridSample": "GRID_SAMPLE", "Cast": "CAST", "Identity": "IDENTITY", "Where": "SELECT",
    "TopK": "TOPK", "Resize": "RESIZE",
}


class BuilderFlag:  # a plain class, so a test can delete FP16 to play TensorRT 11
    FP16 = "FP16"
    TF32 = "TF32"
    OBEY_PRECISION_CONSTRAINTS = "OBEY_PRECISION_CONSTRAINTS"
    PREFER_PRECISION_CONSTRAINTS = "PREFER_PRECISION_CONSTRAINTS"


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, min_severity=WARNING):
        self.min_severity = min_severity


# ---- network -----------------------------------------------------------------------------
class ITensor:
    def __init__(self, name, dtype=DataType.FLOAT, shape=()):
        self.name, self.dtype, self.shape = name, dtype, tuple(shape)


class ILayer:
    def __init__(self, name, type_, inputs, outputs):
        self.name, self.type = name, type_
        self._inputs, self._outputs = inputs, outputs
        self._precision = DataType.FLOAT
        self.precision_is_set = False
        self.output_types = {}

    @property
    def precision(self):
        return self._precision

    @precision.setter
    def precision(self, dt):
        self._precision, self.precision_is_set = dt, True

    @property
    def num_inputs(self):
        return len(self._inputs)

    @property
    def num_outputs(self):
        return len(self._outputs)

    def get_input(self, i):
        return self._inputs[i]

    def get_output(self, i):
        return self._outputs[i]

    def set_output_type(self, i, dt):
        self.output_types[i] = dt


class INetworkDefinition:
    def __init__(self, flags):
        self.flags = flags
        self.layers, self.inputs, self.outputs, self.onnx = [], [], [], None

    @property
    def num_layers(self):
        return len(self.layers)

    def get_layer(self, i):
        return self.layers[i]

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, i):
        return self.inputs[i]


class OnnxParser:
    def __init__(self, network, logger):
        self.network, self.errors = network, []

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, i):
        return self.errors[i]

    def parse_from_file(self, path):
        with open(path, "rb") as f:
            return self.parse(f.read())

    def parse(self, data):
        import onnx

        data = bytes(data)
        STATE.parsed.append(data)
        model = onnx.load_from_string(data)
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:
            inferred = model
        g = inferred.graph
        types_ = {vi.name: vi.type.tensor_type.elem_type
                  for vi in itertools.chain(g.value_info, g.input, g.output)}
        for init in g.initializer:
            types_.setdefault(init.name, init.data_type)
        inits = {i.name for i in g.initializer}
        net = self.network
        tensors = {}

        def tensor(name):
            if name not in tensors:
                tensors[name] = ITensor(name, _ONNX_DT.get(types_.get(name, 1), DataType.FLOAT))
            return tensors[name]

        for vi in g.input:
            if vi.name in inits:
                continue
            dims = [d.dim_value if d.HasField("dim_value") else -1
                    for d in vi.type.tensor_type.shape.dim]
            t = tensor(vi.name)
            t.shape = tuple(dims)
            net.inputs.append(t)
        for node in g.node:
            kind = LayerType[_OP_LAYER.get(node.op_type, "PLUGIN")]
            net.layers.append(ILayer(node.name, kind, [tensor(i) if i else None for i in node.input],
                                     [tensor(o) for o in node.output]))
        net.outputs = [o.name for o in g.output]
        net.onnx = data
        return True


class IOptimizationProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, min, opt, max):  # TensorRT's argument names
        self.shapes[name] = [list(min), list(opt), list(max)]


class IBuilderConfig:
    def __init__(self):
        self.flags, self.profiles, self.pools = set(), [], {}
        self.builder_optimization_level = 3

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.flags.discard(flag)

    def get_flag(self, flag):
        return flag in self.flags

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def create_timing_cache(self, data):
        return {"data": bytes(data)}

    def set_timing_cache(self, cache, ignore_mismatch):
        self.timing_cache = cache
        return True

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1


class Builder:
    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags=0):
        return INetworkDefinition(flags)

    def create_builder_config(self):
        return IBuilderConfig()

    def create_optimization_profile(self):
        return IOptimizationProfile()

    def build_serialized_network(self, network, config):
        import onnx

        model = onnx.load_from_string(network.onnx)
        strong = not hasattr(BuilderFlag, "FP16")
        if strong:
            fp16 = any(i.data_type == 10 for i in model.graph.initializer)
            unsafe = [layer.name for layer in network.layers if layer.type.name in FP16_UNSAFE
                      and any(o.dtype == DataType.HALF for o in layer._outputs)]
            pinned = []
        else:
            fp16 = BuilderFlag.FP16 in config.flags
            obey = BuilderFlag.OBEY_PRECISION_CONSTRAINTS in config.flags
            pinned = [layer.name for layer in network.layers
                      if layer.precision_is_set and layer.precision == DataType.FLOAT]
            unsafe = [layer.name for layer in network.layers if fp16 and layer.type.name in FP16_UNSAFE
                      and not (obey and layer.name in set(pinned))]
        g = model.graph
        inits = {i.name for i in g.initializer}
        inputs = [[t.name, t.dtype.name, list(t.shape)] for t in network.inputs]
        outputs = []
        for vi in g.output:
            dims = [d.dim_value if d.HasField("dim_value") else -1
                    for d in vi.type.tensor_type.shape.dim]
            outputs.append([vi.name, _ONNX_DT[vi.type.tensor_type.elem_type].name, dims])
        header = {"version": __version__, "arch": list(STATE.arch), "fp16": fp16, "strong": strong,
                  "pinned": pinned, "unsafe_unpinned": unsafe,
                  "profiles": config.profiles[0].shapes if config.profiles else {},
                  "inputs": [i for i in inputs if i[0] not in inits], "outputs": outputs,
                  "flags": sorted(str(f) for f in config.flags)}
        STATE.builds.append(header)
        h = json.dumps(header).encode()
        return MAGIC + struct.pack("<I", len(h)) + h + network.onnx


# ---- runtime -----------------------------------------------------------------------------
class Runtime:
    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, data):
        data = bytes(data)
        if not data.startswith(MAGIC):
            return None
        n = struct.unpack("<I", data[8:12])[0]
        header = json.loads(data[12:12 + n])
        if header["version"] != __version__ or tuple(header["arch"]) != tuple(STATE.arch):
            return None  # real TensorRT logs an error and returns None
        return ICudaEngine(header, data[12 + n:])


_SESSIONS: dict[str, object] = {}


def _upcast(onnx_bytes: bytes) -> bytes:
    """A strongly typed fp16 graph back in fp32, for onnxruntime CPU to run."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load_from_string(onnx_bytes)
    g = m.graph
    for i, init in enumerate(list(g.initializer)):
        if init.data_type == 10:
            g.initializer[i].CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(init).astype(np.float32), init.name))
    for node in g.node:
        for a in node.attribute:
            if a.name == "to" and a.i == 10:
                a.i = 1
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == 10:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32),
                                                     a.t.name))
    for vi in itertools.chain(g.value_info, g.input, g.output):
        if vi.type.tensor_type.elem_type == 10:
            vi.type.tensor_type.elem_type = 1
    return m.SerializeToString()


def _session(onnx_bytes: bytes, strong: bool):
    import onnxruntime as ort

    key = hashlib.sha256(onnx_bytes).hexdigest()
    if key not in _SESSIONS:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        data = _upcast(onnx_bytes) if strong else onnx_bytes
        _SESSIONS[key] = ort.InferenceSession(data, sess_options=opts,
                                              providers=["CPUExecutionProvider"])
    return _SESSIONS[key]


class ICudaEngine:
    def __init__(self, header, onnx_bytes):
        self.header, self.onnx = header, onnx_bytes
        self._io = [(n, TensorIOMode.INPUT, DataType[d], s) for n, d, s in header["inputs"]]
        self._io += [(n, TensorIOMode.OUTPUT, DataType[d], s) for n, d, s in header["outputs"]]
        self._by_name = {n: (m, d, s) for n, m, d, s in self._io}

    @property
    def num_io_tensors(self):
        return len(self._io)

    @property
    def num_optimization_profiles(self):
        return 1

    def get_tensor_name(self, i):
        return self._io[i][0]

    def get_tensor_mode(self, name):
        return self._by_name[name][0]

    def get_tensor_dtype(self, name):
        return self._by_name[name][1]

    def get_tensor_shape(self, name):
        return tuple(self._by_name[name][2])

    def get_tensor_profile_shape(self, name, profile_index):
        p = self.header["profiles"][name]
        return [tuple(p[0]), tuple(p[1]), tuple(p[2])]

    def create_execution_context(self):
        return IExecutionContext(self)


class IExecutionContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses = engine, {}, {}
        self._out_shapes = {}

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
        shape = tuple(shape)
        if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
            return False
        self.shapes[name] = shape
        return True

    def _inputs(self):
        return [(n, d) for n, m, d, _ in self.engine._io if m == TensorIOMode.INPUT]

    def get_tensor_shape(self, name):
        mode = self.engine.get_tensor_mode(name)
        if mode == TensorIOMode.INPUT:
            return self.shapes.get(name, self.engine.get_tensor_shape(name))
        key = tuple(self.shapes.get(n) for n, _ in self._inputs())
        if key not in self._out_shapes:  # run once on zeros to learn the output shapes
            sess = _session(self.engine.onnx, self.engine.header["strong"])
            feeds = {n: np.zeros(self.shapes[n], _NP[d]) for n, d in self._inputs()}
            outs = sess.run(None, feeds)
            self._out_shapes[key] = {o.name: tuple(v.shape) for o, v in zip(sess.get_outputs(), outs)}
        return self._out_shapes[key][name]

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = int(ptr)
        return True

    def execute_async_v3(self, stream_handle):
        h = self.engine.header
        feeds = {}
        for n, d in self._inputs():
            shape, dt = self.shapes[n], np.dtype(_NP[d])
            nbytes = int(np.prod(shape)) * dt.itemsize
            feeds[n] = np.frombuffer(bytes(STATE.device[self.addresses[n]][:nbytes]), dt).reshape(shape)
        STATE.executions.append({n: a.shape for n, a in feeds.items()})
        sess = _session(self.engine.onnx, h["strong"])
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        for name, arr in outs.items():
            if arr.dtype == np.float32:
                if h["fp16"]:
                    arr = arr.astype(np.float16).astype(np.float32)
                    if h["unsafe_unpinned"]:
                        arr = arr * np.float32(1.1)
                if STATE.fail_always:
                    arr = arr * np.float32(1.5) + np.float32(0.5)
            arr = np.ascontiguousarray(arr, dtype=_NP[self.engine.get_tensor_dtype(name)])
            STATE.device[self.addresses[name]][:arr.nbytes] = arr.tobytes()
        return True


# ---- the fake CUDA runtime (cuda.bindings.runtime) ---------------------------------------------
class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorNoDevice = 100


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class _Stream(int):
    pass


class _Props:
    def __init__(self):
        self.major, self.minor = STATE.arch
        self.name = STATE.name.encode() + b"\0" * 8


_next_ptr = itertools.count(1)
OK = cudaError_t.cudaSuccess


def cudaGetDeviceCount():
    if STATE.device_count == 0:
        return cudaError_t.cudaErrorNoDevice, None
    return OK, STATE.device_count


def cudaGetDeviceProperties(device):
    if device >= STATE.device_count:
        return cudaError_t.cudaErrorInvalidValue, None
    return OK, _Props()


def cudaSetDevice(device):
    return (OK,) if device < STATE.device_count else (cudaError_t.cudaErrorInvalidValue,)


def cudaMalloc(nbytes):
    ptr = (0x7F00 << 32) + next(_next_ptr) * (1 << 24)
    STATE.device[ptr] = bytearray(int(nbytes))
    return OK, ptr


def cudaFree(ptr):
    STATE.device.pop(int(ptr))
    return (OK,)


def cudaMallocHost(nbytes):
    buf = (ctypes.c_ubyte * int(nbytes))()
    addr = ctypes.addressof(buf)
    STATE.host[addr] = buf
    return OK, addr


def cudaFreeHost(ptr):
    STATE.host.pop(int(ptr))
    return (OK,)


def cudaStreamCreate():
    STATE.streams += 1
    return OK, _Stream(0x5000 + STATE.streams)


def cudaStreamDestroy(stream):
    return (OK,)


def cudaStreamSynchronize(stream):
    return (OK,)


def cudaMemcpyAsync(dst, src, count, kind, stream):
    dst, src, count = int(dst), int(src), int(count)
    if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
        assert src in STATE.host or True
        STATE.device[dst][:count] = ctypes.string_at(src, count)
    elif kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:
        ctypes.memmove(dst, bytes(STATE.device[src][:count]), count)
    else:
        return (cudaError_t.cudaErrorInvalidValue,)
    return (OK,)


# ---- installing ---------------------------------------------------------------------------
def cuda_modules() -> dict[str, types.ModuleType]:
    runtime = types.ModuleType("cuda.bindings.runtime")
    for name in ("cudaError_t", "cudaMemcpyKind", "cudaGetDeviceCount", "cudaGetDeviceProperties",
                 "cudaSetDevice", "cudaMalloc", "cudaFree", "cudaMallocHost", "cudaFreeHost",
                 "cudaStreamCreate", "cudaStreamDestroy", "cudaStreamSynchronize",
                 "cudaMemcpyAsync"):
        setattr(runtime, name, globals()[name])
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = runtime
    cuda = types.ModuleType("cuda")
    cuda.bindings = bindings
    return {"cuda": cuda, "cuda.bindings": bindings, "cuda.bindings.runtime": runtime}


def install(monkeypatch, arch=(9, 0), version="10.9.0.34", cuda=True):
    """Put this fake TensorRT (and, with `cuda`, the fake CUDA runtime) in sys.modules."""
    STATE.reset(arch=arch)
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "__version__", version)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    if cuda:
        for name, mod in cuda_modules().items():
            monkeypatch.setitem(sys.modules, name, mod)
    else:
        for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart", "cupy"):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "cupy", None)
    return module
