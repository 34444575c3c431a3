"""spotdiff runtime: runs a spot-the-difference bundle without PyTorch.

    from sdrun import Pipeline
    pipe = Pipeline.load("engines/tiny")
    result = pipe.diff("a.png", "b.png")

The package is laid out by role; imports point one way (tests/test_layout.py):

    cli/       the command line             -> apps, pipeline, and below
    apps/      jobs on the pipeline (run, cache, tune, eval, score, check, synth, viz)
    pipeline   batches the model calls      -> backends, stages, bundle
    backends/  onnxruntime and TensorRT, memory budgets -> bundle
    stages/    numpy in, numpy out          -> nothing of spotdiff but errors
    bundle/    the folder, its manifest, parameters and vocabulary
    errors, files, csvfile, version         used by all

The names below (and `__version__`, read from the package metadata) are imported on first
use, so `import sdrun` (and `sdrun --help`) stay fast; numpy, OpenCV, onnxruntime and scipy
load only when a command needs them.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Bundle": ".bundle.bundle",
    "MemoryBudget": ".backends.memory",
    "BundleError": ".errors",
    "ParamError": ".bundle.params",
    "ProviderError": ".errors",
    "SpotdiffError": ".errors",
    "PairOutputs": ".pipeline",
    "PairResult": ".pipeline",
    "Pipeline": ".pipeline",
    "__version__": ".version",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
