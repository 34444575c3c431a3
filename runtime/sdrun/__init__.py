"""spotdiff runtime: runs a spot-the-difference bundle without PyTorch."""
__version__ = "0.1.0"

from .bundle import Bundle  # noqa: E402
from .errors import BundleError, ProviderError, SpotdiffError  # noqa: E402

__all__ = ["Bundle", "BundleError", "ProviderError", "SpotdiffError", "__version__"]
