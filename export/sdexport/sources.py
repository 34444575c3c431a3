"""Where a model comes from: a hub id, a local folder, a random preset, or none."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sdrun.errors import SpotdiffError

PRESETS = ("tiny-random", "full-random")
# Presets of one model only: the Siamese ViT's small-random sits between tiny and B/16
# (random weights a CPU can train in minutes: benchmarks/train_change.py).
MODEL_PRESETS = {"siamese": ("small-random",)}

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
    # the option that named it, for messages: --siamese (build), --backbone (train-change)
    option: str = field(default="", compare=False)

    @property
    def flag(self) -> str:
        return self.option or f"--{self.model}"

    @property
    def is_random(self) -> bool:
        return self.kind == "preset"

    def describe(self) -> dict:
        return {"kind": self.kind, "id": self.id}

    def hub_error(self, err: BaseException) -> SourceError:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        presets = ("--preset tiny-random / full-random" if self.flag == f"--{self.model}"
                   else f"{self.flag} tiny-random")
        return SourceError(
            f"cannot load {TITLES[self.model]} from hub id {self.id!r} ({type(err).__name__}: "
            f"{reason[:300]}). Without network access pass {LOCAL_HINTS[self.model]} "
            f"({self.flag} DIR) or a preset ({presets}).")

    def local_error(self, what: str) -> SourceError:
        return SourceError(f"cannot load {TITLES[self.model]} from {self.flag} {self.id}: {what}")


def parse_source(model: str, spec: str | None, preset: str | None, option: str | None = None) -> Source:
    """Turn a `--owlvit`-style option (or its absence) into a Source. `option`: the flag
    the user gave it with, named in messages (default `--{model}`; e.g. `--backbone`)."""
    flag = option or f"--{model}"
    if spec is None:
        spec = preset if preset else DEFAULT_HUB_IDS[model]
    if not spec.strip():
        raise SourceError(f"{flag} is empty: give {LOCAL_HINTS[model]}, a hub id or a preset "
                          f"({'|'.join(PRESETS)})")
    if spec == "none":
        if model != "gdino":
            raise SourceError(f"{flag} none: only Grounding DINO can be left out")
        return Source(model, "none", "none", option or "")
    if spec in PRESETS or spec in MODEL_PRESETS.get(model, ()):
        return Source(model, "preset", spec, option or "")
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"{flag} {spec}: expected {LOCAL_HINTS[model]}, got a file")
        return Source(model, "local", str(path.resolve()), option or "")
    if spec.startswith((".", "/", "~")) or spec.endswith(("/", "\\")):
        raise SourceError(f"{flag} {spec}: folder not found")
    return Source(model, "hub", spec, option or "")
