"""A stand-in for Triton's python backend, to test `sdrun.apps.triton_models` in this process.

`FakeServer(repo)` reads every model of a repository written by `sdrun triton --graphs
python` (config.pbtxt parsed with Triton's own model-config protobuf, handed over as JSON
the way the backend does), initialises its TritonPythonModel, and answers requests;
BLS requests (`InferenceRequest.exec`) go to the server's models. As Triton does, it
refuses a request larger than the model's max_batch_size or missing a required input.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np


class TritonError:
    def __init__(self, message: str):
        self._message = message

    def message(self) -> str:
        return self._message


class Tensor:
    def __init__(self, name: str, array: np.ndarray):
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    @classmethod
    def from_dlpack(cls, name: str, obj) -> "Tensor":
        return cls(name, np.from_dlpack(obj))


class InferenceResponse:
    def __init__(self, output_tensors=(), error: TritonError | None = None):
        self.output_tensors = list(output_tensors)
        self._error = error

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


class Request:
    """What a model's execute() receives."""

    def __init__(self, inputs: list[Tensor]):
        self.inputs = inputs


def get_input_tensor_by_name(request: Request, name: str):
    return next((t for t in request.inputs if t.name() == name), None)


def get_output_tensor_by_name(response: InferenceResponse, name: str):
    return next((t for t in response.output_tensors if t.name() == name), None)


class FakeServer:
    def __init__(self, repo: Path, module: types.ModuleType):
        from google.protobuf import json_format, text_format
        from tritonclient.grpc import model_config_pb2

        self.module = module
        module.SERVER = self
        self.models, self.configs, self.calls = {}, {}, {}
        for folder in sorted(p for p in Path(repo).iterdir() if p.is_dir()):
            config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
            as_json = json_format.MessageToDict(config, preserving_proto_field_name=True)
            self.configs[config.name] = config
            spec = importlib.util.spec_from_file_location(f"fake_triton_model_{config.name}", folder / "1" / "model.py")
            code = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(code)
            model = code.TritonPythonModel()
            model.initialize({"model_config": json.dumps(as_json), "model_repository": str(folder),
                              "model_version": "1", "model_name": config.name})
            self.models[config.name] = model
            self.calls[config.name] = []

    def infer_many(self, model: str, requests: list[dict[str, np.ndarray]]) -> list[InferenceResponse]:
        """Several requests in one execute(), as Triton's dynamic batcher hands them over."""
        self.calls[model].append(sum(len(next(iter(r.values()))) for r in requests))
        return self.models[model].execute([Request([Tensor(k, v) for k, v in r.items()]) for r in requests])

    def infer(self, model: str, inputs: dict[str, np.ndarray]) -> InferenceResponse:
        config = self.configs[model]
        required = {i.name for i in config.input if not i.optional}
        if missing := required - set(inputs):
            return InferenceResponse(error=TritonError(f"{model}: missing required input(s) {sorted(missing)}"))
        if extra := set(inputs) - {i.name for i in config.input}:
            return InferenceResponse(error=TritonError(f"{model}: unexpected input(s) {sorted(extra)}"))
        batch = len(next(iter(inputs.values())))
        if config.max_batch_size and batch > config.max_batch_size:
            return InferenceResponse(error=TritonError(
                f"{model}: batch size {batch} exceeds max_batch_size {config.max_batch_size}"))
        self.calls[model].append(batch)
        return self.models[model].execute([Request([Tensor(k, v) for k, v in inputs.items()])])[0]


class InferenceRequest:
    def __init__(self, model_name: str, inputs: list[Tensor], requested_output_names: list[str]):
        self.model_name, self.inputs, self.outputs = model_name, inputs, requested_output_names

    def exec(self) -> InferenceResponse:
        server = sys.modules["triton_python_backend_utils"].SERVER
        response = server.infer(self.model_name, {t.name(): t.as_numpy() for t in self.inputs})
        if not response.has_error():
            response.output_tensors = [t for t in response.output_tensors if t.name() in self.outputs]
        return response


def install(monkeypatch) -> types.ModuleType:
    """Put a fresh fake `triton_python_backend_utils` in sys.modules; returns it."""
    module = types.ModuleType("triton_python_backend_utils")
    for name in ("TritonError", "Tensor", "InferenceResponse", "InferenceRequest",
                 "get_input_tensor_by_name", "get_output_tensor_by_name"):
        setattr(module, name, globals()[name])
    module.SERVER = None
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", module)
    return module
