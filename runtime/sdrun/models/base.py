"""The adapter interface and the registry of model kinds."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from ..backends.interface import Model
from ..bundle.bundle import Bundle
from ..errors import BundleError

# (model, graph) -> the runnable graph (the backend, budget and provider already chosen)
OpenGraph = Callable[[str, str], Model]


@dataclass
class Detections:
    """Objects of one image: boxes x1y1x2y2 normalised to the image, scores, label indices."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))


class ModelAdapter:
    """One model kind of a bundle. Subclasses set `name` (the manifest's key), `role` and
    `graphs` (the graph names they open), parse their manifest entry in `parse_spec` (a
    BundleError naming the bundle for a bad entry), and add their role's method."""

    name: ClassVar[str]
    role: ClassVar[str]  # "detector", "change" or "embedder"
    graphs: ClassVar[tuple[str, ...]]

    def __init__(self, bundle: Bundle, open_graph: OpenGraph):
        self.vocabulary = bundle.vocabulary
        try:
            self.spec = self.parse_spec(bundle, bundle.model(self.name))
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{bundle.root}: the {self.name} entry of the manifest is not usable "
                              f"({type(e).__name__}: {e})") from None
        self.models = {g: open_graph(self.name, g) for g in self.graphs}

    @classmethod
    def parse_spec(cls, bundle: Bundle, entry: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    @property
    def graph(self) -> Model:
        """The adapter's graph (its first, for adapters with several)."""
        return self.models[self.graphs[0]]

    def open(self) -> None:
        """Open every graph now (the backends open lazily otherwise)."""
        for m in self.models.values():
            m.open()


class Detector(ModelAdapter):
    """Finds labelled boxes: one call for every view of every image."""

    role = "detector"
    score_param: ClassVar[str]  # the parameter that drops its low-scoring boxes

    def detect(self, views: Sequence[np.ndarray], params: Mapping[str, Any]) -> list[Detections]:
        raise NotImplementedError


class ChangeModel(ModelAdapter):
    """Says where and whether two images differ."""

    role = "change"

    def change(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(patch maps [N, gh, gw], change logits [N], per-class probabilities [N, 3, V] or
        None)."""
        raise NotImplementedError


class Embedder(ModelAdapter):
    """Embeds the crops of boxes, for matching objects across the two images."""

    role = "embedder"

    def embed(self, images: Sequence[np.ndarray], boxes_px: Sequence[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError


REGISTRY: dict[str, type[ModelAdapter]] = {}


def register(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: `cls` is the adapter of manifest entries named `cls.name`."""
    if cls.role not in ("detector", "change", "embedder"):
        raise ValueError(f"{cls.__name__}: role {cls.role!r} is not detector, change or embedder")
    REGISTRY[cls.name] = cls
    return cls


def adapter_class(bundle: Bundle, name: str) -> type[ModelAdapter]:
    """The adapter of a bundle's model entry, or BundleError naming what sdrun knows."""
    cls = REGISTRY.get(name)
    if cls is None:
        raise BundleError(f"{bundle.root}: model {name!r} has no adapter in this sdrun (known: "
                          f"{', '.join(REGISTRY)}); use a newer sdrun, or register one "
                          "(sdrun.models.register)")
    return cls
