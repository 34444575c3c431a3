"""What every model exporter gets: the build settings and small shared helpers."""
from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

logger = logging.getLogger(__name__)

OPSET = 17


@dataclass
class BuildContext:
    vocabulary: list[str]
    prompt_templates: list[str]
    seed: int = 0
    opset: int = OPSET
    gdino_size: tuple[int, int] = (800, 800)  # (height, width)
    log: Callable[[str], None] = logger.info
    timings: dict[str, float] = field(default_factory=dict)

    def generator(self, offset: int) -> np.random.Generator:
        """A deterministic numpy generator per model (offset) for golden inputs."""
        return np.random.default_rng(self.seed * 1000 + offset)

    @contextlib.contextmanager
    def timed(self, what: str):
        t0 = time.perf_counter()
        self.log(f"  {what} ...")
        yield
        dt = time.perf_counter() - t0
        self.timings[what] = round(dt, 2)
        self.log(f"  {what}: {dt:.1f} s")


def seed_torch(seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def export_onnx(module: torch.nn.Module, args: tuple, path: Path, input_names: list[str],
                output_names: list[str], dynamic_axes: dict, opset: int = OPSET) -> dict:
    """Export with the TorchScript exporter (3-10x faster than dynamo here, same graphs'
    speed) into one self-contained file; return the graph's I/O description."""
    import warnings

    import onnx

    module.eval()
    # no_grad: tracing with autograd on keeps every activation (Grounding DINO base at
    # 800x800 then needs > 23 GB). nn.MultiheadAttention's inference fast path
    # (aten::_native_multi_head_attention) has no ONNX symbolic, so switch it off.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
            torch.onnx.export(module, args, str(path), input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic_axes,
                              opset_version=opset, do_constant_folding=True, dynamo=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(str(path))
    return {"inputs": _io(model.graph.input), "outputs": _io(model.graph.output)}


def _io(values) -> list[dict]:
    import onnx

    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                    "shape": shape})
    return out


def to_numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def jsonable(obj):
    """Processor/config attributes as plain JSON values (SizeDicts as dicts without Nones)."""
    def default(o):
        if hasattr(o, "item"):
            return o.item()
        if isinstance(o, (tuple, set)):
            return list(o)
        if hasattr(o, "__dataclass_fields__") or hasattr(o, "__dict__"):
            return {k: v for k, v in vars(o).items() if v is not None and not k.startswith("_")}
        return str(o)
    return json.loads(json.dumps(obj, default=default))


def image_like(height: int, width: int, seed: int) -> np.ndarray:
    """A deterministic image-like uint8 RGB array: smooth gradients, blocks and edges."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([
        120 + 80 * np.sin(xx / max(width, 1) * 3 + c) * np.cos(yy / max(height, 1) * 2 - c)
        for c in range(3)], -1)
    for _ in range(6):
        y0, x0 = rng.integers(0, height - 4), rng.integers(0, width - 4)
        h, w = rng.integers(4, max(5, height // 3)), rng.integers(4, max(5, width // 3))
        img[y0:y0 + h, x0:x0 + w] = rng.integers(0, 256, 3)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def pil_pass_order() -> str:
    """How this Pillow orders its two resize passes (the runtime must do the same):
    Pillow >= 13 may go vertical first ("pillow13"), older ones always go horizontal
    first ("hv")."""
    import PIL

    return "pillow13" if int(PIL.__version__.split(".")[0]) >= 13 else "hv"
