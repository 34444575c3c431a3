"""Write a bundle: files, golden samples and the manifest with sha256 of every file."""
from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np

from sdrun.bundle.bundle import MANIFEST, SCHEMA_VERSION, sha256_file


class BundleWriter:
    """Writes plain files (no temp file and rename): `sdexport build` writes into a staging
    folder that is moved into place whole when finished (`sdrun.files.replace_folder`)."""

    def __init__(self, root: str | Path, overwrite: bool = True):
        self.root = Path(root)
        if self.root.exists() and any(self.root.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{self.root} exists and is not empty")
            if not (self.root / MANIFEST).exists() and not (self.root / "source").exists():
                raise FileExistsError(
                    f"{self.root} is not empty and does not look like a bundle; refusing to overwrite")
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.files: list[str] = []
        self.source_dirs: list[str] = []

    def path(self, rel: str) -> Path:
        """Where to write `rel`; the file is listed in the manifest."""
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if rel not in self.files:
            self.files.append(rel)
        return p

    def source_dir(self, model: str) -> Path:
        """`source/<model>/`: the PyTorch weights a random bundle was exported from."""
        rel = f"source/{model}"
        (self.root / rel).mkdir(parents=True, exist_ok=True)
        if rel not in self.source_dirs:
            self.source_dirs.append(rel)
        return self.root / rel

    def save_npy(self, rel: str, arr: np.ndarray) -> str:
        np.save(self.path(rel), np.ascontiguousarray(arr), allow_pickle=False)
        return rel

    def save_json(self, rel: str, obj) -> str:
        self.path(rel).write_text(json.dumps(obj, indent=2) + "\n")
        return rel

    def finalize(self, manifest: dict) -> Path:
        files = {}
        for rel in self.files:
            p = self.root / rel
            files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        # PyTorch source weights are hashed for provenance; the runtime never reads them.
        source_files = {}
        for rel_dir in self.source_dirs:
            for p in sorted((self.root / rel_dir).rglob("*")):
                if p.is_file():
                    source_files[p.relative_to(self.root).as_posix()] = {
                        "sha256": sha256_file(p), "bytes": p.stat().st_size}
        full = {"schema_version": SCHEMA_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "tools": tool_versions(), **manifest, "files": files, "source_files": source_files}
        out = self.root / MANIFEST
        out.write_text(json.dumps(full, indent=2) + "\n")
        return out


class GoldenRecorder:
    """Inputs and outputs of PyTorch runs, saved as one `.npz` per model."""

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}

    def add(self, case: str, graph: str, inputs: dict, outputs: dict):
        for kind, d in (("in", inputs), ("out", outputs)):
            for name, arr in d.items():
                self.arrays[f"{case}__{graph}__{kind}__{name}"] = np.ascontiguousarray(arr)

    def save(self, writer: BundleWriter, rel: str) -> str:
        np.savez_compressed(writer.path(rel), **self.arrays)
        return rel


def tool_versions() -> dict:
    import importlib.metadata as md

    from sdrun.version import version

    out = {"python": platform.python_version(), "spotdiff": version()}
    for dist in ("torch", "transformers", "timm", "open-clip-torch", "onnx",
                 "onnxruntime", "numpy", "pillow", "torchvision"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out
