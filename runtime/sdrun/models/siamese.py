"""The Siamese ViT: a patch-distance map and a change logit per pair (and, when trained
with them, per-class change heads)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..bundle.bundle import Bundle
from ..stages import preprocess
from .base import ChangeModel, register


@dataclass(frozen=True)
class SiameseSpec:
    preprocess: Mapping[str, Any]
    class_heads: bool


@register
class Siamese(ChangeModel):
    name = "siamese"
    graphs = ("pair",)

    @classmethod
    def parse_spec(cls, bundle: Bundle, entry: Mapping[str, Any]) -> SiameseSpec:
        return SiameseSpec(entry["preprocess"], "class_heads" in entry)

    def change(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        x = preprocess.siamese_pixels([a for a, _ in pairs], [b for _, b in pairs], self.spec.preprocess)
        o = self.graph.run({"pairs": x})
        probs = None
        if "class_logits" in o:
            probs = 1.0 / (1.0 + np.exp(-o["class_logits"].astype(np.float64)))
        return o["heat"], o["logit"], probs
