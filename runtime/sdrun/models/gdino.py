"""Grounding DINO: boxes grounded in the tokens of one prompt of every label."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..bundle.bundle import Bundle
from ..stages import detect, preprocess
from .base import Detections, Detector, register

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class GroundingDinoSpec:
    preprocess: Mapping[str, Any]
    image_size: tuple[int, int]  # (height, width) the graph takes
    text: Mapping[str, np.ndarray]  # the tokenised prompt, [1, T] int64 each
    token_labels: np.ndarray  # vocabulary index of each token (-1: none)


@register
class GroundingDino(Detector):
    name = "gdino"
    graphs = ("model",)
    score_param = "gdino_box_thr"

    @classmethod
    def parse_spec(cls, bundle: Bundle, entry: Mapping[str, Any]) -> GroundingDinoSpec:
        return GroundingDinoSpec(entry["preprocess"], tuple(entry["image_size"]),
                                 {k: bundle.array(entry[f"{k}_file"]).astype(np.int64) for k in TEXT_INPUTS},
                                 bundle.array(entry["token_labels_file"]))

    def detect(self, views: Sequence[np.ndarray], params: Mapping[str, Any]) -> list[Detections]:
        s = self.spec
        pixels, mask = preprocess.gdino_pixels(views, s.preprocess, s.image_size)
        n = len(views)
        o = self.graph.run({"pixel_values": pixels, "pixel_mask": mask,
                            **{k: np.repeat(v, n, axis=0) for k, v in s.text.items()}})
        thr = params[self.score_param]
        return [Detections(*detect.gdino_detections(o["logits"][k], o["pred_boxes"][k], s.token_labels,
                                                    len(self.vocabulary), thr))
                for k in range(n)]
