"""The bundle: a folder with `manifest.json` and the files it names.

Loading validates it: the schema version, that every named file lies inside the
folder, exists and has the recorded sha256 (hashed once, then remembered while the file's
stat signature is unchanged: see `digests`). Arrays are `.npy`/`.npz` read with
`allow_pickle=False`; there are no pickles in a bundle.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BundleError
from ..files import atomic_write
from .digests import DigestCache, sha256_file  # noqa: F401  (sha256_file: used by sdexport)
from .params import check_combination
from .params import validate as validate_params

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def resolve_inside(root: Path, rel: str) -> Path:
    """`root/rel`, refusing absolute paths and anything that leaves `root`."""
    if not isinstance(rel, str) or not rel:
        raise BundleError(f"{root / MANIFEST}: invalid file name {rel!r}")
    if Path(rel).is_absolute():
        raise BundleError(f"{root / MANIFEST}: file {rel!r} is an absolute path; "
                          "files must lie inside the bundle folder")
    root_real = root.resolve()
    path = (root / rel).resolve()
    if path != root_real and root_real not in path.parents:
        raise BundleError(f"{root / MANIFEST}: file {rel!r} resolves to {path}, "
                          "outside the bundle folder")
    return path


def golden_cases(golden: dict[str, np.ndarray]) -> dict[tuple[str, str], dict[str, dict]]:
    """A golden `.npz` file's arrays, keyed `{case}__{graph}__{in|out}__{name}`, as
    {(case, graph): {"in": {name: array}, "out": {name: array}}}."""
    cases: dict[tuple[str, str], dict[str, dict]] = {}
    for key, arr in golden.items():
        case, graph, kind, name = key.split("__", 3)
        cases.setdefault((case, graph), {"in": {}, "out": {}})[kind][name] = arr
    return cases


@dataclass
class Bundle:
    root: Path
    manifest: dict[str, Any]
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, root: str | Path, verify: bool = True) -> "Bundle":
        root = Path(root)
        mpath = root / MANIFEST
        if not root.is_dir():
            raise BundleError(f"{root}: not a bundle folder (it does not exist or is not a folder)")
        if not mpath.is_file():
            raise BundleError(f"{mpath}: missing; build a bundle with `sdexport build`")
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{mpath}: not valid JSON ({e})") from None
        if not isinstance(manifest, dict):
            raise BundleError(f"{mpath}: expected a JSON object")
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"{mpath}: unknown schema_version {version!r}; this sdrun reads "
                f"version {SCHEMA_VERSION}. Rebuild the bundle or use a matching sdrun.")
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            raise BundleError(f"{mpath}: no 'files' table")
        bundle = cls(root=root, manifest=manifest)
        digests = DigestCache() if verify else None
        try:
            for rel, meta in files.items():
                path = resolve_inside(root, rel)
                if not path.is_file():
                    raise BundleError(f"{root / rel}: missing (named in {mpath})")
                if digests is None:
                    continue
                expected = meta.get("sha256") if isinstance(meta, dict) else None
                hashed_before = digests.hashed
                digest = digests.sha256(path)
                if digest != expected and digests.hashed == hashed_before:
                    # a remembered digest never condemns a file: hash it again
                    digests.forget(path)
                    digest = digests.sha256(path)
                if digest != expected:
                    raise BundleError(
                        f"{root / rel}: sha256 {digest[:12]}... does not match the manifest's "
                        f"{str(expected)[:12]}...: the file was altered or corrupted")
        finally:
            if digests is not None:
                digests.save()
        # every file a model entry names must be listed (and so verified)
        for rel in bundle._named_files(manifest.get("models", {})):
            if rel not in files:
                raise BundleError(f"{mpath}: {rel!r} is used but not listed in 'files'")
        if "params_file" in manifest:
            bundle.params  # noqa: B018  (an invalid params.json fails here, not pair after pair)
        return bundle

    @staticmethod
    def _named_files(node: Any):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("file", "files") or k.endswith("_file"):
                    yield from (v if isinstance(v, list) else [v])
                else:
                    yield from Bundle._named_files(v)
        elif isinstance(node, list):
            for v in node:
                yield from Bundle._named_files(v)

    # ---- access -------------------------------------------------------------
    @property
    def models(self) -> dict[str, dict]:
        return self.manifest.get("models", {})

    def has(self, model: str) -> bool:
        return model in self.models

    def model(self, name: str) -> dict:
        if name not in self.models:
            raise BundleError(f"{self.root / MANIFEST}: the bundle has no {name!r} model "
                              f"(it has: {', '.join(self.models) or 'none'})")
        return self.models[name]

    def path(self, rel: str) -> Path:
        if rel not in self.manifest["files"]:
            raise BundleError(f"{self.root / MANIFEST}: {rel!r} is not listed in 'files'")
        return resolve_inside(self.root, rel)

    def array(self, rel: str) -> np.ndarray:
        if rel not in self._cache:
            try:
                self._cache[rel] = np.load(self.path(rel), allow_pickle=False)
            except ValueError as e:
                raise BundleError(f"{self.root / rel}: cannot be read as a numpy array ({e})") from None
        return self._cache[rel]

    def arrays(self, rel: str) -> dict[str, np.ndarray]:
        """An `.npz` file as a dict of arrays."""
        if rel not in self._cache:
            try:
                with np.load(self.path(rel), allow_pickle=False) as z:
                    self._cache[rel] = {k: z[k] for k in z.files}
            except ValueError as e:
                raise BundleError(f"{self.root / rel}: cannot be read as an npz archive ({e})") from None
        return self._cache[rel]

    def json(self, rel: str) -> Any:
        path = self.path(rel)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{path}: not valid JSON ({e})") from None

    @property
    def vocabulary(self) -> list[str]:
        return list(self.manifest["vocabulary"])

    @property
    def params(self) -> dict[str, Any]:
        """The bundle's parameters, checked (`sdrun.bundle.params`): numbers as float."""
        rel = self.manifest.get("params_file")
        if not rel:
            raise BundleError(f"{self.root / MANIFEST}: no params_file")
        source = str(self.path(rel))
        params = validate_params(self.json(rel), source, complete=True)
        check_combination(params, source, self.has_class_heads)
        return params

    @property
    def has_class_heads(self) -> bool:
        """Whether the Siamese graph also gives per-class change probabilities."""
        return "class_heads" in self.manifest.get("models", {}).get("siamese", {})

    @property
    def content_id(self) -> str:
        """sha256 over every file's recorded digest except the parameters file: what the
        models compute. Tuning (a new params.json) does not change it."""
        params = self.manifest.get("params_file")
        h = hashlib.sha256()
        for rel, meta in sorted(self.manifest["files"].items()):
            if rel != params:
                h.update(f"{rel}\0{meta.get('sha256') if isinstance(meta, dict) else meta}\n".encode())
        return h.hexdigest()


def bundle_files(root: str | Path) -> set[str]:
    """Every file (relative POSIX path) an earlier `sdexport build` or `sdrun tune` wrote in
    the bundle folder `root`, from its manifest: what a rebuild may replace. Empty when
    there is no readable manifest."""
    root = Path(root)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(manifest, dict):
        return set()
    owned = {MANIFEST}
    for table in ("files", "source_files"):
        if isinstance(manifest.get(table), dict):
            owned.update(manifest[table])
    owned.update(rel for rel in Bundle._named_files(manifest) if isinstance(rel, str))
    if isinstance(manifest.get("params_file"), str):
        owned.add(manifest["params_file"] + ".bak")  # `write_params`' backup
    return owned


def write_params(root: str | Path, params: dict[str, Any], backup: bool = True) -> Path:
    """Replace a bundle's parameters file (the one `params_file` names) with `params` and
    update its sha256 and size in manifest.json, so that `Bundle.load` still verifies.

    Both files are written to temporary files first and moved into place with
    `os.replace` (params file first, then the manifest), so neither is ever half
    written. With `backup`, the previous parameters are kept in `<params file>.bak`
    (not listed in the manifest): if the process dies between the two moves, the
    manifest still describes the old file and `cp params.json.bak params.json`
    restores a bundle that loads. Returns the path of the parameters file."""
    root = Path(root)
    mpath = root / MANIFEST
    bundle = Bundle.load(root, verify=False)
    manifest = bundle.manifest
    rel = manifest.get("params_file")
    if not rel or rel not in manifest["files"]:
        raise BundleError(f"{mpath}: no params_file listed in 'files'")
    path = resolve_inside(root, rel)
    params = validate_params(params, f"parameters for {path}", complete=True)
    check_combination(params, f"parameters for {path}", bundle.has_class_heads)
    data = (json.dumps(params, indent=2, allow_nan=False) + "\n").encode()
    if backup and path.exists():
        atomic_write(path.with_name(path.name + ".bak"), path.read_bytes())
    manifest["files"][rel] = {**manifest["files"][rel], "sha256": hashlib.sha256(data).hexdigest(),
                              "bytes": len(data)}
    atomic_write(path, data)
    atomic_write(mpath, json.dumps(manifest, indent=2) + "\n")
    return path


def write_openvino_policy(root: str | Path, section: dict[str, Any]) -> Path:
    """Record an OpenVINO precision policy (`sdrun precision`) as the manifest's "openvino"
    section, replacing any earlier one; no other file of the bundle changes. The manifest
    is written to a temporary file and renamed (never half written)."""
    root = Path(root)
    mpath = root / MANIFEST
    bundle = Bundle.load(root, verify=False)
    manifest = {**bundle.manifest, "openvino": section}
    atomic_write(mpath, json.dumps(manifest, indent=2) + "\n")
    return mpath
