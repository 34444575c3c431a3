"""The bundle: its folder and manifest (`bundle`), remembered file digests (`digests`),
its parameters (`params`) and its label vocabulary (`vocab`)."""
from .bundle import (
    MANIFEST,
    SCHEMA_VERSION,
    Bundle,
    resolve_inside,
    sha256_file,
    write_params,
)

__all__ = ["MANIFEST", "SCHEMA_VERSION", "Bundle", "resolve_inside", "sha256_file", "write_params"]
