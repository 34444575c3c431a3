"""Where a model comes from: a hub id, a local folder, a random preset, or none."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdrun.errors import SpotdiffError

PRESETS = ("tiny-random", "full-random")

# Hub defaults; timm and open_clip ids are their own model names.
DEFAULT_HUB_IDS = {
    "owlvit": "google/owlvit-base-patch32",
    "gdino": "IDEA-Research/grounding-dino-base",
    "siamese": "vit_base_patch16_224",
    "clip": "ViT-B-32:laion2b_s34b_b79k",
}

TITLES = {
    "owlvit": "OWL-ViT",
    "gdino": "Grounding DINO",
    "siamese": "Siamese ViT (timm backbone)",
    "clip": "CLIP visual (open_clip)",
}

LOCAL_HINTS = {
    "owlvit": "a Hugging Face save_pretrained folder",
    "gdino": "a Hugging Face save_pretrained folder",
    "siamese": "a timm folder (config.json + model.safetensors)",
    "clip": "an open_clip folder (open_clip_config.json + open_clip_model.safetensors)",
}


class SourceError(SpotdiffError):
    """A model source that cannot be loaded; the message names the model and the fix."""


@dataclass(frozen=True)
class Source:
    model: str  # owlvit | gdino | siamese | clip
    kind: str  # hub | local | preset | none
    id: str  # hub id, folder path or preset name

    @property
    def is_random(self) -> bool:
        return self.kind == "preset"

    def describe(self) -> dict:
        return {"kind": self.kind, "id": self.id}

    def hub_error(self, err: BaseException) -> SourceError:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return SourceError(
            f"cannot load {TITLES[self.model]} from hub id {self.id!r} ({type(err).__name__}: "
            f"{reason[:300]}). Without network access pass {LOCAL_HINTS[self.model]} "
            f"(--{self.model} DIR) or a preset (--preset tiny-random / full-random).")

    def local_error(self, what: str) -> SourceError:
        return SourceError(f"cannot load {TITLES[self.model]} from {self.id}: {what}")


def parse_source(model: str, spec: str | None, preset: str | None) -> Source:
    """Turn a `--owlvit`-style option (or its absence) into a Source."""
    if spec is None:
        spec = preset if preset else DEFAULT_HUB_IDS[model]
    if spec == "none":
        if model != "gdino":
            raise SourceError(f"--{model} none: only Grounding DINO can be left out")
        return Source(model, "none", "none")
    if spec in PRESETS:
        return Source(model, "preset", spec)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"--{model} {spec}: expected {LOCAL_HINTS[model]}, got a file")
        return Source(model, "local", str(path.resolve()))
    if spec.startswith((".", "/", "~")) or spec.endswith(("/", "\\")):
        raise SourceError(f"--{model} {spec}: folder not found")
    return Source(model, "hub", spec)
