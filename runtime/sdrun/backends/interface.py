"""The one interface every runnable graph has, whatever runs it (onnxruntime's
`session.OnnxModel`, TensorRT's `trt.TrtModel`, OpenVINO's
`openvino_backend.OpenVinoModel`), and the provider names.

`session` and `trt` both implement it; neither imports the other's models
(`session.open_graph` chooses, and hands `trt.open_engine` the ONNX fallback)."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

ORT_PROVIDERS = {  # sdrun's name -> onnxruntime's
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
}
# every provider sdrun knows (the one list: --provider's choices, open_graph's check)
ALL_PROVIDERS = ("cpu", "cuda", "tensorrt", "tensorrt:fp16", "tensorrt:fp32",
                 "openvino", "openvino:f32", "openvino:bf16")


def runs_on_cpu(provider: str) -> bool:
    """Whether a provider computes on the CPU (its memory is the host's)."""
    return provider == "cpu" or provider.startswith("openvino")


@runtime_checkable
class Model(Protocol):
    """A graph that runs: named arrays in, named arrays out."""

    @property
    def check_tolerance(self) -> float | None:
        """The rel-L2 its golden check allows (None: the bundle's)."""
        ...

    @property
    def input_names(self) -> list[str]: ...

    @property
    def output_names(self) -> list[str]: ...

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def open(self) -> "Model":
        """Load the graph now (every backend loads at the first use otherwise); returns it."""
        ...
