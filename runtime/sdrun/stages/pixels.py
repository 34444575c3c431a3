"""Box edges to pixel indices."""
from __future__ import annotations

from typing import overload

import numpy as np

# Box edges often sit exactly on whole pixels (clipped to the image border, or on the
# detector's patch grid), where float noise of 1e-5 px decides between two rows under
# plain int(). Edges within this distance below a whole pixel count as on it.
EDGE_SNAP_PX = 1e-3


@overload
def pixel_floor(x: float, lo: int = 0, hi: int | None = None) -> int: ...
@overload
def pixel_floor(x: np.ndarray, lo: int = 0, hi: int | None = None) -> np.ndarray: ...


def pixel_floor(x: float | np.ndarray, lo: int = 0, hi: int | None = None) -> int | np.ndarray:
    """floor(x + EDGE_SNAP_PX), clipped to [lo, hi]; works on scalars and arrays."""
    v = np.floor(np.asarray(x, np.float64) + EDGE_SNAP_PX)
    v = np.clip(v, lo, hi if hi is not None else np.inf).astype(np.int64)
    return int(v) if v.ndim == 0 else v
