"""One class that runs an exported graph: onnxruntime behind a small interface."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from .errors import ProviderError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
}


def default_threads() -> int:
    env = os.environ.get("SDRUN_THREADS")
    return int(env) if env else 0  # 0: onnxruntime picks (one per physical core)


class OnnxModel:
    """An ONNX graph in an onnxruntime session; `run` takes and returns dicts of arrays.

    Sessions are thread-safe for `run` in onnxruntime; creation is lazy and locked.
    """

    def __init__(self, path: str | Path, provider: str = "cpu", threads: int | None = None):
        self.path = Path(path)
        if provider not in PROVIDERS:
            raise ProviderError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
        self.provider = provider
        self.threads = default_threads() if threads is None else threads
        self._session = None
        self._lock = threading.Lock()

    @property
    def session(self):
        if self._session is None:
            with self._lock:
                if self._session is None:
                    self._session = self._create()
        return self._session

    def _create(self):
        import onnxruntime as ort

        wanted = PROVIDERS[self.provider]
        if wanted not in ort.get_available_providers():
            raise ProviderError(
                f"provider {self.provider!r} ({wanted}) is not available in this onnxruntime "
                f"(available: {', '.join(ort.get_available_providers())})")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        # No spin-waiting: on shared cores it steals time from everything else.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        return ort.InferenceSession(str(self.path), sess_options=opts, providers=[wanted])

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self.output_names
        outs = self.session.run(names, {k: feeds[k] for k in self.input_names})
        return dict(zip(names, outs))


def open_graph(bundle, model: str, graph: str, provider: str = "cpu",
               threads: int | None = None) -> OnnxModel:
    """The runnable form of one graph of a bundle for this provider."""
    return OnnxModel(bundle.path(bundle.model(model)["graphs"][graph]["file"]), provider, threads)
