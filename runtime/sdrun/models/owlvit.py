"""OWL-ViT: open-vocabulary boxes scored against the bundle's prompt embeddings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..bundle.bundle import Bundle
from ..stages import detect, preprocess
from .base import Detections, Detector, register


@dataclass(frozen=True)
class OwlVitSpec:
    preprocess: Mapping[str, Any]
    queries: np.ndarray  # L2-normalised text embeddings of the prompts [Q, D]
    prompt_labels: np.ndarray  # vocabulary index of each prompt [Q]


@register
class OwlVit(Detector):
    name = "owlvit"
    graphs = ("image",)
    score_param = "owlvit_score_thr"

    @classmethod
    def parse_spec(cls, bundle: Bundle, entry: Mapping[str, Any]) -> OwlVitSpec:
        return OwlVitSpec(entry["preprocess"],
                          detect.normalize_queries(bundle.array(entry["query_embeds_file"]).astype(np.float32)),
                          bundle.array(entry["prompt_labels_file"]))

    def detect(self, views: Sequence[np.ndarray], params: Mapping[str, Any]) -> list[Detections]:
        s = self.spec
        o = self.graph.run({"pixel_values": preprocess.owlvit_pixels(views, s.preprocess)})
        thr = params[self.score_param]
        return [Detections(*detect.owlvit_detections(
            o["pred_boxes"][k], o["class_embeds"][k], o["logit_shift"][k], o["logit_scale"][k],
            s.queries, s.prompt_labels, thr)) for k in range(len(views))]
