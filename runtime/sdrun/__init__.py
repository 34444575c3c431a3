"""spotdiff runtime: runs a spot-the-difference bundle without PyTorch.

    from sdrun import Pipeline
    pipe = Pipeline.load("engines/tiny")
    result = pipe.diff("a.png", "b.png")
"""
__version__ = "0.1.0"

from .bundle import Bundle  # noqa: E402
from .errors import BundleError, ProviderError, SpotdiffError  # noqa: E402
from .pipeline import PairResult, Pipeline  # noqa: E402

__all__ = ["Bundle", "BundleError", "PairResult", "Pipeline", "ProviderError", "SpotdiffError",
           "__version__"]
