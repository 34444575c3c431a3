"""onnxruntime sessions from a cache of optimised graphs, so that a restart is fast.

Creating a CPU session for a large graph spends most of its time in onnxruntime's graph
optimiser (Grounding DINO base: about 6.5 s of 7 here). The first time a graph is opened,
the optimised graph is also saved in onnxruntime's own format (`.ort`) under the user's
cache folder; later sessions load that file with the optimiser off (about 2.2 s).

The key is everything the optimised graph depends on: the source graph's sha256, the
onnxruntime version, the optimisation level and the CPU's instruction-set flags (the
layout optimisations pick kernels and block sizes for the CPU they run on). The file is
written to a temporary name and renamed, so a reader never sees half of it; a cached
file that onnxruntime cannot load is deleted and the source graph used instead.

Only the CPU provider is cached (a CUDA session's optimised graph holds fused CUDA nodes
that are not meant to be saved). `SPOTDIFF_GRAPH_CACHE=0` turns the cache off; it lives
in `<cache folder>/ort-graphs/` (see `sdrun.bundle.digests.cache_dir`) and may be deleted at
any time.
"""
from __future__ import annotations

import hashlib
import os
import platform
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..bundle.digests import DigestCache, cache_dir
from ..files import atomic_path
from .cpu import cpu_info

SUBDIR = "ort-graphs"


def enabled() -> bool:
    return os.environ.get("SPOTDIFF_GRAPH_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


@lru_cache(maxsize=1)
def cpu_signature() -> str:
    """A short hash of the CPU's architecture and instruction-set flags."""
    return hashlib.sha256(f"{platform.machine()}|{cpu_info().get('flags', '')}".encode()).hexdigest()[:12]


def cache_key(graph_sha256: str, ort_version: str, level: int) -> str:
    return f"{graph_sha256[:32]}-ort{ort_version}-O{level}-cpu{cpu_signature()}"


def cached_graph_path(graph: Path, ort_version: str, level: int, digests: DigestCache | None = None) -> Path:
    digest = (digests or DigestCache()).sha256(graph)
    return cache_dir() / SUBDIR / f"{cache_key(digest, ort_version, level)}.ort"


def create_session(ort: Any, graph: Path, opts: Any, providers: list) -> Any:
    """An onnxruntime InferenceSession of `graph` (CPU provider), through the cache."""
    level = int(opts.graph_optimization_level)
    if not enabled() or level == int(ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        return ort.InferenceSession(str(graph), sess_options=opts, providers=providers)
    digests = DigestCache()
    cached = cached_graph_path(graph, ort.__version__, level, digests)
    digests.save()
    if cached.is_file():
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(str(cached), sess_options=opts, providers=providers)
        except Exception as e:  # a bad cache entry must never stop a run
            warnings.warn(f"{cached}: cached optimised graph unusable ({type(e).__name__}: {e}); "
                          f"using {graph}", RuntimeWarning, stacklevel=2)
            try:
                cached.unlink()
            except OSError:
                pass
            opts.graph_optimization_level = ort.GraphOptimizationLevel(level)
    session = None
    try:
        # onnxruntime saves the optimised graph while it makes the session; the format
        # follows the file's extension
        with atomic_path(cached, suffix=".tmp.ort") as tmp:
            opts.optimized_model_filepath = str(tmp)
            session = ort.InferenceSession(str(graph), sess_options=opts, providers=providers)
            if tmp.stat().st_size == 0:  # nothing saved: no empty file in the cache
                raise FileNotFoundError(f"{tmp}: no optimised graph saved")
    except OSError:  # the cache cannot be written: never an error
        if session is None:
            opts.optimized_model_filepath = ""
            session = ort.InferenceSession(str(graph), sess_options=opts, providers=providers)
    return session
