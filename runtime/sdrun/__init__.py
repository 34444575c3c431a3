"""spotdiff runtime: runs a spot-the-difference bundle without PyTorch.

    from sdrun import Pipeline
    pipe = Pipeline.load("engines/tiny")
    result = pipe.diff("a.png", "b.png")

The names below are imported on first use, so `import sdrun` (and `sdrun --help`) stay
fast; numpy, OpenCV, onnxruntime and scipy load only when a command needs them.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Bundle": ".bundle",
    "BundleError": ".errors",
    "ProviderError": ".errors",
    "SpotdiffError": ".errors",
    "PairResult": ".pipeline",
    "Pipeline": ".pipeline",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
