"""On-disk cache of the model phase: one `.npz` per pair, so that everything after the
models (`Pipeline.finish`, `sdrun eval`, `sdrun tune`) runs without running a model.

What a pair's file holds (`allow_pickle=False`; see `save_outputs`): the image sizes,
per image the detections after WBF (float64 boxes, scores, labels) and CLIP embeddings
of *every* candidate box, the decoded detections of every view before WBF, the
Siamese patch map and change logit, and the seconds the models took.

Where: `<bundle>/../.sdrun-cache/<key>/` (or any folder given), a file
`<pair id>-<digest>.npz` per pair. The key is a hash of what decides the model outputs:
the bundle's manifest.json *without* the params file's entry (so tuning the post-model
parameters, which rewrites params.json and its sha256, does not throw the cache
away), the pre-model parameters (WBF and detector score thresholds), the execution
provider and this cache's format version. The digest hashes the pair id and the bytes
of both image files, so a changed image is a miss, never a stale hit.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, cast

import numpy as np

from ..files import atomic_path, check_output_paths, id_file_stem
from ..pipeline import Detections, PairOutputs, Pipeline, run_isolated

log = logging.getLogger(__name__)

CACHE_VERSION = 1
MODEL_PARAMS = ("wbf_iou_thr", "wbf_skip_box_thr", "owlvit_score_thr", "gdino_box_thr")


def model_key(pipe: Pipeline) -> str:
    """Hash of everything the model outputs depend on (not the post-model parameters)."""
    m = json.loads(json.dumps(pipe.bundle.manifest))
    m.get("files", {}).pop(m.get("params_file"), None)
    facts = {"cache_version": CACHE_VERSION, "manifest": m, "provider": pipe.provider,
             "model_params": {k: pipe.params.get(k) for k in MODEL_PARAMS}}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def default_cache_dir(pipe: Pipeline) -> Path:
    return pipe.bundle.root.resolve().parent / ".sdrun-cache" / model_key(pipe)[:20]


def pair_digest(pair_id: str, a: str | Path, b: str | Path) -> str:
    h = hashlib.sha256(f"{pair_id}\0".encode())
    for p in (a, b):
        data = Path(p).read_bytes()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()




# ---- one pair <-> npz --------------------------------------------------------------
def save_outputs(path: Path, o: PairOutputs, key: str = "") -> None:
    """Write atomically (sdrun.files.atomic_path): a killed run never leaves half a file."""
    arrays = {"format": np.int64(CACHE_VERSION), "key": np.str_(key), "pair_id": np.str_(o.pair_id or ""),
              "image_sizes": np.asarray(o.image_sizes, np.int64), "patch_map": o.patch_map,
              "change_logit": np.float64(o.change_logit), "model_seconds": np.float64(o.model_seconds),
              "clip_seconds": np.float64(o.clip_seconds)}
    for k in (0, 1):
        d = o.detections[k]
        arrays.update({f"boxes{k}": d.boxes, f"scores{k}": d.scores, f"labels{k}": d.labels,
                       f"embeds{k}": o.embeds[k], f"embedded{k}": np.asarray(o.embedded[k], np.int64)})
    if o.class_probs is not None:
        arrays["class_probs"] = np.asarray(o.class_probs, np.float64)
    names = [n for n, _ in o.views]
    arrays["view_names"] = np.array(names, dtype=np.str_) if names else np.zeros(0, "<U1")
    for v, (_, d) in enumerate(o.views):
        arrays.update({f"view{v}_boxes": d.boxes, f"view{v}_scores": d.scores, f"view{v}_labels": d.labels})
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: savez adds no .npz
        np.savez(f, **arrays)


def load_outputs(path: Path) -> tuple[PairOutputs, str]:
    """(outputs, key) from a file written by `save_outputs`. Raises ValueError/OSError."""
    with np.load(path, allow_pickle=False) as z:
        if int(z["format"]) != CACHE_VERSION:
            raise ValueError(f"cache format {int(z['format'])}, expected {CACHE_VERSION}")
        dets = cast("tuple[Detections, Detections]",
                    tuple(Detections(z[f"boxes{k}"], z[f"scores{k}"], z[f"labels{k}"]) for k in (0, 1)))
        views = [(str(n), Detections(z[f"view{v}_boxes"], z[f"view{v}_scores"], z[f"view{v}_labels"]))
                 for v, n in enumerate(z["view_names"])]
        o = PairOutputs(
            pair_id=str(z["pair_id"]), image_sizes=[[int(x) for x in s] for s in z["image_sizes"]],
            detections=dets, patch_map=z["patch_map"], change_logit=float(z["change_logit"]),
            embeds=(z["embeds0"], z["embeds1"]), embedded=(z["embedded0"], z["embedded1"]),
            views=views, model_seconds=float(z["model_seconds"]), clip_seconds=float(z["clip_seconds"]),
            class_probs=z["class_probs"] if "class_probs" in z.files else None)
        return o, str(z["key"])


# ---- the cache --------------------------------------------------------------------
@dataclass
class FillResult:
    outputs: dict[str, PairOutputs] = field(default_factory=dict)  # pair id -> outputs
    errors: dict[str, str] = field(default_factory=dict)  # pair id -> why it has none
    computed: int = 0  # pairs the models ran on now
    fill_seconds: float = 0.0  # wall time of those model runs (CLIP on every candidate included)

    @property
    def model_seconds(self) -> float:
        """Model time of every pair (recorded when its entry was made)."""
        return sum(o.model_seconds for o in self.outputs.values())

    @property
    def clip_seconds(self) -> float:
        return sum(o.clip_seconds for o in self.outputs.values())


class OutputCache:
    """`PairOutputs` with CLIP embeddings of every candidate, per pair, on disk."""

    def __init__(self, pipe: Pipeline, folder: str | Path | None = None):
        self.pipe = pipe
        self.key = model_key(pipe)
        self.folder = Path(folder) / self.key[:20] if folder else default_cache_dir(pipe)
        # every file of a bundle is checked against its manifest: the cache lives elsewhere
        check_output_paths({"--cache": self.folder}, protected_dirs=[("the bundle", pipe.bundle.root)])

    def path(self, pair_id: str, digest: str) -> Path:
        return self.folder / f"{id_file_stem(pair_id)}-{digest[:16]}.npz"

    def get(self, pair_id: str, digest: str) -> PairOutputs | None:
        path = self.path(pair_id, digest)
        if not path.exists():
            return None
        try:
            o, key = load_outputs(path)
        except Exception:  # a torn or foreign file is a miss
            return None
        if key != self.key or o.pair_id != str(pair_id) or not o.embeds_all:
            return None
        return o

    def put(self, o: PairOutputs, digest: str) -> Path:
        if not o.embeds_all:
            raise ValueError(f"pair {o.pair_id}: the cache keeps embeddings of every candidate; "
                             "make the outputs with embed='all'")
        path = self.path(str(o.pair_id), digest)
        save_outputs(path, o, self.key)
        return path

    def fill(self, pairs: Sequence[tuple], batch_pairs: int = 1, progress: bool = True,
             warn: Callable[[str], None] | None = None) -> FillResult:
        """Outputs of every (id, a_path, b_path) pair: from the cache, or by running the
        models (embedding every candidate) and storing them. A pair whose images cannot be
        read is reported in `errors` (and through `warn`); the others go on."""
        warn = warn or log.warning
        res = FillResult()
        todo = []
        for pair_id, a, b in pairs:
            pair_id = str(pair_id)
            try:
                digest = pair_digest(pair_id, a, b)
            except OSError as e:
                res.errors[pair_id] = f"cannot read images: {e}"
                warn(f"error: pair {pair_id}: {res.errors[pair_id]}")
                continue
            o = self.get(pair_id, digest)
            if o is None:
                todo.append((pair_id, a, b, digest))
            else:
                res.outputs[pair_id] = o
        if todo:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), unit="pair", disable=not progress, dynamic_ncols=True,
                       desc="models (filling the cache)")
            t0 = time.perf_counter()
            for start in range(0, len(todo), batch_pairs):
                batch = todo[start:start + batch_pairs]
                for item, o in zip(batch, self._run(batch, res, warn)):
                    if o is not None:
                        self.put(o, item[3])
                        res.outputs[item[0]] = o
                        res.computed += 1
                bar.update(len(batch))
            res.fill_seconds = time.perf_counter() - t0
            bar.close()
        order = [str(p[0]) for p in pairs]
        res.outputs = {k: res.outputs[k] for k in order if k in res.outputs}
        return res

    def _run(self, batch, res: FillResult, warn) -> list[PairOutputs | None]:
        def failed(item, e: Exception) -> None:
            res.errors[item[0]] = f"{type(e).__name__}: {e}"
            warn(f"error: pair {item[0]}: {res.errors[item[0]]}")

        return run_isolated(batch, lambda items: self.pipe.model_outputs(
            [(pid, a, b) for pid, a, b, _ in items], embed="all"), failed)
