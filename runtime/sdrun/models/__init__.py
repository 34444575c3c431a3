"""The model kinds a bundle may hold, behind one registry (the shape of fastembed's and
RapidOCR's): each kind is an adapter class that parses its manifest entry once into a
frozen spec, opens its graphs through the backend, and turns images into what the
pipeline needs (`Detector.detect`, `ChangeModel.change`, `Embedder.embed`).

`Pipeline` composes the adapters the bundle names, in the manifest's order; a new detector
is one adapter module (registered with `@register`) plus its export module, nothing else.
apps/ and cli/ use this package's names only, never an adapter module's internals.
"""
from __future__ import annotations

from . import clip, gdino, owlvit, siamese  # noqa: F401  (each registers its kind)
from .base import (
    REGISTRY,
    ChangeModel,
    Detections,
    Detector,
    Embedder,
    ModelAdapter,
    OpenGraph,
    adapter_class,
    register,
)

__all__ = ["REGISTRY", "ChangeModel", "Detections", "Detector", "Embedder", "ModelAdapter",
           "OpenGraph", "adapter_class", "register"]
