"""CLIP's visual encoder: an embedding of every box's crop."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..bundle.bundle import Bundle
from ..stages import preprocess
from .base import Embedder, register


@dataclass(frozen=True)
class ClipSpec:
    preprocess: Mapping[str, Any]


@register
class Clip(Embedder):
    name = "clip"
    graphs = ("visual",)

    @classmethod
    def parse_spec(cls, bundle: Bundle, entry: Mapping[str, Any]) -> ClipSpec:
        return ClipSpec(entry["preprocess"])

    def embed(self, images: Sequence[np.ndarray], boxes_px: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Every box of every image, in as few calls as possible; a box whose crop is empty
        (`preprocess.crop_bounds`) gets a row of NaN, which matching reads as "no
        similarity: use the IoU", the notebook's fallback."""
        # The crops are made chunk by chunk, as many as one CLIP call may take: thousands of
        # candidate boxes (embed="all") are gigabytes of 224x224 float32 crops otherwise.
        sizes = [len(b) for b in boxes_px]
        offsets = np.cumsum([0, *sizes])  # box j of image i is row offsets[i] + j overall
        total = int(offsets[-1])
        step = getattr(self.graph, "max_batch", None) or max(1, total)
        full = None
        for start in range(0, total, step):
            end = min(start + step, total)
            made = [preprocess.clip_crops(images[i], np.asarray(boxes_px[i])[max(lo, start) - lo:min(hi, end) - lo],
                                          self.spec.preprocess)
                    for i, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])) if lo < end and hi > start]
            ok = np.concatenate([o for _, o in made])
            if not ok.any():
                continue
            embeds = self.graph.run({"crops": np.concatenate([c for c, _ in made])})["embeds"]
            if full is None:
                full = np.full((total, embeds.shape[1]), np.nan, embeds.dtype)
            full[start + np.flatnonzero(ok)] = embeds
        if full is None:
            return [np.full((n, 0), np.nan, np.float32) for n in sizes]
        return np.split(full, offsets[1:-1])
