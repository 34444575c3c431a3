"""The whole spot-the-difference pipeline over a bundle, without PyTorch.

    pipe = Pipeline.load("engines/tiny")
    result = pipe.diff("a.png", "b.png")          # or arrays
    for result in pipe.run(pairs, batch_pairs=4):  # (id, a, b) triples
        ...

Each stage is a small function in its own module (preprocess, detect, fusion,
heatmap, matching); this class batches the model calls: one detector call per
batch runs [a, flip(a), b, flip(b)] for every pair, one Siamese call all pairs,
one CLIP call every kept crop. Safe to call from several threads at once.

Two phases: `model_outputs(pairs)` runs the models and returns, per pair, what they
said (`PairOutputs`: detections after WBF, the Siamese patch map and change logit,
CLIP embeddings of candidate boxes); `finish(outputs, params)` does everything after
the models (score fusion, threshold, matching, label sets, the optional "none" gates)
in numpy. `diff_batch(pairs)` is `finish` over `model_outputs`, so a cached
`PairOutputs` (sdrun.apps.cache) gives exactly the answer the models would.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar, cast

import numpy as np

from .backends.memory import MemoryBudget
from .backends.session import open_graph
from .bundle.bundle import Bundle
from .bundle.params import GATE_SIGNALS, POST_DEFAULTS, resolve, validate  # noqa: F401  (re-exported)
from .errors import BundleError
from .models import (
    ChangeModel,
    Detections,
    Detector,
    Embedder,
    ModelAdapter,
    OpenGraph,
    adapter_class,
)
from .stages import decide, detect, heatmap, preprocess
from .stages.decide import COLUMNS, class_head_sets, gate_signal, gated  # noqa: F401  (re-exported)
from .stages.fusion import weighted_boxes_fusion
from .stages.images import DEFAULT_MAX_PIXELS, ImageError, as_rgb, load_image
from .stages.matching import match_objects


@dataclass
class PairOutputs:
    """What the models said about one pair: all `Pipeline.finish` needs to give its result.

    `detections` are per image after WBF (boxes normalised x1y1x2y2 float64, as WBF
    returns them). `embeds[k]` holds CLIP embeddings of the candidate boxes
    `embedded[k]` (sorted indices into `detections[k]`): every candidate when made with
    `embed="all"` (what the cache stores), only the kept ones for `embed="kept"`.
    `views` optionally keeps every view's decoded detections before WBF
    ("1/owlvit/plain", "1/owlvit/flip", ...; flipped boxes already mirrored back)."""

    pair_id: str | None
    image_sizes: list[list[int]]  # [[h, w], [h, w]]
    detections: tuple[Detections, Detections]
    patch_map: np.ndarray  # Siamese patch-distance map [gh, gw] float32
    change_logit: float
    embeds: tuple[np.ndarray, np.ndarray]
    embedded: tuple[np.ndarray, np.ndarray]
    views: list[tuple[str, Detections]] = field(default_factory=list)
    class_probs: np.ndarray | None = None  # per-class change heads: [3, V] sigmoid (added, removed, changed)
    model_seconds: float = 0.0  # detectors + Siamese (+ CLIP) time, this pair's share of its batch
    clip_seconds: float = 0.0  # of which CLIP
    heats: tuple | None = field(default=None, repr=False, compare=False)  # upsampled heat, transient

    def heatmaps(self) -> tuple[np.ndarray, np.ndarray]:
        if self.heats is None:
            self.heats = tuple(heatmap.upsample_heat(self.patch_map, h, w) for h, w in self.image_sizes)
        return self.heats

    @property
    def embeds_all(self) -> bool:
        """True when every candidate box of both images has its embedding."""
        return all(len(i) == len(d.scores) for i, d in zip(self.embedded, self.detections))


@dataclass
class PairResult:
    pair_id: str | None
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    objects: list[dict] = field(default_factory=list)
    change_score: float = 0.0
    change_logit: float = 0.0
    image_sizes: list[list[int]] = field(default_factory=list)  # [[h, w], [h, w]]
    heatmaps: tuple | None = field(default=None, repr=False)  # per image, HxW float32
    class_probs: dict | None = None  # per-class change heads: column -> label -> probability
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict:
        """Everything but the heatmaps, as plain JSON values."""
        return {"img_id": self.pair_id, "added": self.added, "removed": self.removed,
                "changed": self.changed, "change_score": round(self.change_score, 6),
                "change_logit": round(self.change_logit, 6), "image_sizes": self.image_sizes,
                "objects": self.objects, "error": self.error,
                **({"class_probs": self.class_probs} if self.class_probs is not None else {})}


def _image(x, max_pixels: int | None) -> np.ndarray:
    return load_image(x, max_pixels=max_pixels) if isinstance(x, (str, Path)) else as_rgb(x)


class Pipeline:
    def __init__(self, bundle: Bundle, provider: str = "cpu", params: dict | None = None,
                 threads: int | None = None, allow_onnx_fallback: bool = False,
                 memory_budget: MemoryBudget | int | str | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, graph_opener: OpenGraph | None = None):
        """`memory_budget`: the bytes (or '6G') every model call together may use at once;
        calls larger than that run in chunks (same answers). Default: a share of the memory
        this process can get (`sdrun.backends.memory`). `max_pixels`: an image file of more
        pixels is refused from its header, before decoding (None: no limit). `graph_opener`:
        (model, graph) -> the runnable graph, instead of opening the bundle's own with
        `provider` (Triton's `spotdiff` model runs them as other Triton models)."""
        self.max_pixels = max_pixels
        self.bundle = bundle
        self.provider = provider
        self.labels = bundle.vocabulary
        self.class_heads = bundle.has_class_heads
        self.params = {**bundle.params, **validate(params or {}, "Pipeline(params=...)")}
        resolve(self.params, None, f"{bundle.root}: parameters with the overrides given", self.class_heads)
        self.memory_budget = MemoryBudget.resolve(memory_budget, provider)
        b = bundle

        def session(model, graph):
            return open_graph(b, model, graph, provider=provider, threads=threads,
                              allow_onnx_fallback=allow_onnx_fallback, group=self,
                              budget=self.memory_budget)

        self.models: dict[str, ModelAdapter] = {
            name: adapter_class(b, name)(b, graph_opener or session) for name in b.models}
        by_role = {role: [m for m in self.models.values() if m.role == role]
                   for role in ("detector", "change", "embedder")}
        for role, found in by_role.items():
            if not found or (role != "detector" and len(found) > 1):
                raise BundleError(f"{b.root}: a bundle needs {'a' if role == 'detector' else 'one'} "
                                  f"{role} model; it has {', '.join(m.name for m in found) or 'none'}")
        # each adapter's `role` is its base class's (Detector, ChangeModel, Embedder)
        self.detectors = cast("list[Detector]", by_role["detector"])  # WBF fuses them in this order
        self.change_model = cast(ChangeModel, by_role["change"][0])
        self.embedder = cast(Embedder, by_role["embedder"][0])

    @classmethod
    def load(cls, bundle: str | Path | Bundle, provider: str = "cpu", params: dict | None = None,
             threads: int | None = None, allow_onnx_fallback: bool = False,
             memory_budget: MemoryBudget | int | str | None = None,
             max_pixels: int | None = DEFAULT_MAX_PIXELS) -> "Pipeline":
        if not isinstance(bundle, Bundle):
            bundle = Bundle.load(bundle)
        return cls(bundle, provider=provider, params=params, threads=threads,
                   allow_onnx_fallback=allow_onnx_fallback, memory_budget=memory_budget,
                   max_pixels=max_pixels)

    def open_sessions(self) -> "Pipeline":
        """Open every model's graphs now instead of at their first use (a server does this
        before it takes traffic). One after another: opened at once, the full-size bundle's
        sessions peaked 1.0 GiB higher (3.5 against 2.5 GiB for `sdrun diff`) and started no
        faster on 2 cores. Returns the pipeline."""
        for m in self.models.values():
            m.open()
        return self

    # ---- stages -------------------------------------------------------------------
    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Fused TTA: each image and its mirror image through every detector, in one call
        per detector; then Weighted Boxes Fusion per image over (views x detectors)."""
        return self._detect(images)[0]

    def _detect(self, images: Sequence[np.ndarray]) -> tuple[list[Detections], list[list[tuple[str, Detections]]]]:
        """(fused detections per image, per image the decoded detections of every view)."""
        views = [v for im in images for v in (im, preprocess.hflip(im))]
        per_view = [(d.name, d.detect(views, self.params)) for d in self.detectors]
        p = self.params
        out, named = [], []
        for i in range(len(images)):
            lists, names = [], []
            for name, dets in per_view:
                plain, flipped = dets[2 * i], dets[2 * i + 1]
                lists += [plain, Detections(detect.unflip(flipped.boxes), flipped.scores, flipped.labels)]
                names += [f"{i % 2 + 1}/{name}/plain", f"{i % 2 + 1}/{name}/flip"]
            out.append(self._wbf(lists, p["wbf_iou_thr"], p["wbf_skip_box_thr"]))
            named.append(list(zip(names, lists)))
        return out, named

    @staticmethod
    def _wbf(lists: list[Detections], iou_thr: float, skip_box_thr: float) -> Detections:
        if not any(len(d.scores) for d in lists):
            return Detections.empty()
        # Clip as ensemble-boxes would (same result), without its warning per box.
        boxes, scores, labels = weighted_boxes_fusion(
            [np.clip(d.boxes, 0.0, 1.0) for d in lists], [d.scores for d in lists], [d.labels for d in lists],
            iou_thr=iou_thr, skip_box_thr=skip_box_thr, conf_type="avg")
        # float64 as WBF returns them: box edges are truncated to pixel indices later, and
        # a float32 round trip moves an edge across an integer often enough to matter.
        return Detections(boxes, scores, labels.astype(np.int64))

    def change_maps(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """Siamese ViT on every pair in one call: (patch maps [N,gh,gw], change logits [N])."""
        return self.change_outputs(pairs)[:2]

    def change_outputs(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """`change_maps` plus the per-class change probabilities [N,3,V] (None when the
        model has no per-class heads)."""
        return self.change_model.change(pairs)

    def embed_crops(self, images: Sequence[np.ndarray], boxes_px: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The embedder's embedding of every box of every image (NaN rows for empty crops)."""
        return self.embedder.embed(images, boxes_px)

    # ---- whole pairs -------------------------------------------------------------
    def diff(self, a: str | Path | np.ndarray, b: str | Path | np.ndarray, pair_id: str | None = None) -> PairResult:
        """One pair (paths or arrays). Raises ImageError for an unreadable image."""
        return self.diff_batch([(pair_id, a, b)])[0]

    def diff_batch(self, pairs: Sequence[tuple]) -> list[PairResult]:
        """Several (id, a, b) pairs through every stage together (one call per model)."""
        return [self.finish(o) for o in self.model_outputs(pairs)]

    def model_outputs(self, pairs: Sequence[tuple], embed: str = "kept",
                      params: dict | Sequence[dict | None] | None = None) -> list[PairOutputs]:
        """The model phase for several (id, a, b) pairs: one call per model for them all.

        embed="kept" embeds only the boxes that `params` (default: the pipeline's; a list:
        each pair's own) keep, which is what `diff` needs; embed="all" embeds every candidate box of both
        images, so that `finish` works for any parameters (what the cache stores; it
        costs a CLIP crop per candidate, typically several times the kept ones).
        An embedding does not depend on which other crops share its CLIP batch
        (tests/test_score.py checks this bit for bit)."""
        if embed not in ("kept", "all"):
            raise ValueError(f"embed must be 'kept' or 'all', not {embed!r}")
        t0 = time.perf_counter()
        images = [(_image(a, self.max_pixels), _image(b, self.max_pixels)) for _, a, b in pairs]
        dets, views = self._detect([im for pair in images for im in pair])
        patch_maps, logits, class_probs = self.change_outputs(images)
        per_pair: Sequence[dict | None] = (params if isinstance(params, (list, tuple))
                                           else [cast("dict | None", params)] * len(images))
        if len(per_pair) != len(images):
            raise ValueError(f"{len(per_pair)} parameter sets for {len(images)} pairs")
        heats, chosen, ims, px = [], [], [], []
        for n, (a, b) in enumerate(images):
            rule = decide.KeepRule.of(self.resolve_params(per_pair[n]))
            pair_heats = []
            for k, im in enumerate((a, b)):
                h, w = im.shape[:2]
                d = dets[2 * n + k]
                heat = heatmap.upsample_heat(patch_maps[n], h, w)
                pair_heats.append(heat)
                boxes_px = decide.pixel_boxes(d.boxes, h, w)
                if embed == "all":
                    idx = np.arange(len(d.scores))
                else:
                    idx = decide.kept_boxes(d.scores, boxes_px, heat, rule)[0]
                chosen.append(idx)
                ims.append(im)
                px.append(boxes_px[idx])
            heats.append(tuple(pair_heats))
        t1 = time.perf_counter()
        embeds = self.embed_crops(ims, px)
        t2 = time.perf_counter()
        share, clip_share = (t2 - t0) / max(1, len(pairs)), (t2 - t1) / max(1, len(pairs))
        return [PairOutputs(
            pair_id=pair_id, image_sizes=[list(im.shape[:2]) for im in (a, b)],
            detections=(dets[2 * n], dets[2 * n + 1]), patch_map=patch_maps[n],
            change_logit=float(logits[n]), embeds=(embeds[2 * n], embeds[2 * n + 1]),
            embedded=(chosen[2 * n], chosen[2 * n + 1]), views=views[2 * n] + views[2 * n + 1],
            class_probs=None if class_probs is None else class_probs[n],
            model_seconds=share, clip_seconds=clip_share, heats=heats[n])
            for n, ((pair_id, _, _), (a, b)) in enumerate(zip(pairs, images))]

    @property
    def effective_params(self) -> dict:
        """Every parameter this pipeline runs with: the bundle's, the overrides, and the
        defaults of the post-model ones the bundle lacks."""
        return self.resolve_params(None)

    def resolve_params(self, params: dict | None, source: str = "params") -> dict:
        """This pipeline's parameters with `params` (one call's or request's overrides)
        applied and checked as every other source of parameters is (ParamError naming
        `source`)."""
        return resolve(self.params, params, source, self.class_heads)


    def finish(self, outputs: PairOutputs, params: dict | None = None) -> PairResult:
        """Everything after the models, for one pair: fused scores, kept boxes, matching,
        label sets, "none" gates. `params` override the pipeline's for this call only.
        Raises ValueError if a box these parameters keep has no embedding in `outputs`."""
        p = self.resolve_params(params)
        rule = decide.KeepRule.of(p)
        heats = outputs.heatmaps()
        objs = []
        for k, ((h, w), heat, d) in enumerate(zip(outputs.image_sizes, heats, outputs.detections)):
            boxes_px = decide.pixel_boxes(d.boxes, h, w)
            idx, share, fused = decide.kept_boxes(d.scores, boxes_px, heat, rule)
            emb = self._embeddings_of(outputs, k, idx)
            objs.append((d.boxes[idx], d.labels[idx], emb, boxes_px[idx], d.scores[idx],
                         fused[idx], share[idx]))
        (na, la, ea, pa, sa, fa, ha), (nb, lb, eb, pb, sb, fb, hb) = objs
        m = match_objects(na, la, ea, nb, lb, eb, alpha=p["alpha"], iou_thr=p["iou_thr"])
        status_a = {i: "removed" for i in m.removed}
        status_b = {j: "added" for j in m.added}
        partner_a, partner_b = {}, {}
        changed = set(m.changed)
        for i, j in m.pairs:
            status_a[i] = status_b[j] = "changed" if (i, j) in changed else "matched"
            partner_a[i], partner_b[j] = j, i
        objects = []
        for image_no, (labels, boxes, scores, fused, share, status, partner) in enumerate(
                ((la, pa, sa, fa, ha, status_a, partner_a), (lb, pb, sb, fb, hb, status_b, partner_b)), 1):
            for k in range(len(labels)):
                objects.append({"image": image_no, "index": k, "label": self.labels[int(labels[k])],
                                "box": [round(float(v), 3) for v in boxes[k]],
                                "score": round(float(scores[k]), 6),
                                "fused_score": round(float(fused[k]), 6),
                                "hot_share": round(float(share[k]), 6),
                                "status": status[k], "partner": partner.get(k)})
        score = heatmap.change_score(heats[0])
        sets = decide.label_sets(la, lb, decide.column_members(len(la), len(lb), m.pairs, m.changed),
                                 self.labels)
        probs = None
        if outputs.class_probs is not None:
            probs = {col: {label: round(float(v), 6) for label, v in zip(self.labels, row)}
                     for col, row in zip(COLUMNS, outputs.class_probs)}
            sets = decide.class_head_sets(sets, probs, p)
        signal = decide.gate_signal(p, score, outputs.change_logit)
        for col in COLUMNS:
            if decide.gated(p.get(f"none_gate_{col}"), signal):
                sets[col] = []
        return PairResult(
            pair_id=outputs.pair_id, **sets, objects=objects, change_score=score,
            change_logit=outputs.change_logit, image_sizes=[list(s) for s in outputs.image_sizes],
            heatmaps=heats, class_probs=probs)

    @staticmethod
    def _embeddings_of(outputs: PairOutputs, k: int, idx: np.ndarray) -> np.ndarray:
        have, emb = outputs.embedded[k], outputs.embeds[k]
        if len(have) == len(outputs.detections[k].scores):  # every candidate (arange)
            return emb[idx]
        pos = np.searchsorted(have, idx)
        if len(idx) and (pos.max() >= len(have) or not np.array_equal(have[pos], idx)):
            raise ValueError(f"pair {outputs.pair_id}: image {k + 1} keeps boxes that were not "
                             "embedded; make the outputs with model_outputs(..., embed='all')")
        return emb[pos]

    def run(self, pairs: Iterable[tuple], batch_pairs: int = 1) -> Iterator[PairResult]:
        """(id, a, b) triples -> results in order. A pair whose images cannot be read gives
        a result with `error` set; the others go on."""
        batch: list[tuple] = []
        for item in pairs:
            batch.append(item)
            if len(batch) >= batch_pairs:
                yield from self._run_batch(batch)
                batch = []
        if batch:
            yield from self._run_batch(batch)

    def _run_batch(self, batch: list[tuple]) -> list[PairResult]:
        loaded, results = [], {}
        for k, (pair_id, a, b) in enumerate(batch):
            try:
                loaded.append((k, (pair_id, _image(a, self.max_pixels), _image(b, self.max_pixels))))
            except (ImageError, ValueError) as e:
                results[k] = PairResult(pair_id=pair_id, error=str(e))
        if loaded:
            batch_results = run_isolated(
                [p for _, p in loaded], self.diff_batch,
                lambda pair, e: PairResult(pair_id=pair[0], error=f"{type(e).__name__}: {e}"))
            for (k, _), r in zip(loaded, batch_results):
                results[k] = r
        return [results[k] for k in range(len(batch))]


T = TypeVar("T")
R = TypeVar("R")


def run_isolated(items: Sequence[T], run_batch: Callable[[Sequence[T]], Sequence[R]],
                 on_error: Callable[[T, Exception], R]) -> list[R]:
    """`run_batch(items)`; when the batch fails as a whole, each item alone, and an item that
    still fails gets `on_error(item, exception)`: one bad pair never fails its batch (the
    runner, the service's batcher and the cache all go through here)."""
    try:
        return list(run_batch(items))
    except Exception as e:  # find the item that breaks the batch
        if len(items) == 1:
            return [on_error(items[0], e)]
    out = []
    for item in items:
        try:
            out.append(run_batch([item])[0])
        except Exception as e:
            out.append(on_error(item, e))
    return out
