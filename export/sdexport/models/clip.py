"""CLIP visual encoder (open_clip): crops [B,3,S,S] -> L2-normalised embeddings [B,D]."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..context import (
    BuildContext,
    export_onnx,
    image_like,
    jsonable,
    pil_pass_order,
    seed_torch,
    to_numpy,
)
from ..sources import Source
from ..writer import BundleWriter, GoldenRecorder

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def load_torch(source: Source, ctx: BuildContext):
    """(open_clip CLIP model in eval mode, its eval image transform, model_cfg dict or None)."""
    import open_clip

    if source.kind == "preset":
        cfg = TINY_CFG if source.id == "tiny-random" else open_clip.get_model_config("ViT-B-32")
        seed_torch(ctx.seed * 7 + 4)
        model = open_clip.model.CLIP(**cfg)
        transform = open_clip.image_transform(model.visual.image_size, is_train=False,
                                              mean=open_clip.OPENAI_DATASET_MEAN,
                                              std=open_clip.OPENAI_DATASET_STD)
        model.visual.image_mean = open_clip.OPENAI_DATASET_MEAN
        model.visual.image_std = open_clip.OPENAI_DATASET_STD
        return model.eval(), transform, cfg
    try:
        if source.kind == "local":
            _check_local(source)
            model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{source.id}")
            cfg = json.loads((Path(source.id) / CONFIG_FILE).read_text())["model_cfg"]
        else:
            name, _, tag = source.id.partition(":")
            if name.startswith("hf-hub"):
                name, tag = source.id, None
            model, _, transform = open_clip.create_model_and_transforms(name, pretrained=tag or None)
            cfg = open_clip.get_model_config(name) if not name.startswith("hf-hub") else None
    except Exception as e:
        if source.kind == "hub":
            raise source.hub_error(e) from None
        raise source.local_error(f"{type(e).__name__}: {str(e).strip()[:300]}") from None
    return model.eval(), transform, cfg


def _check_local(source: Source):
    folder = Path(source.id)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise source.local_error(f"{folder / name} is missing (expected an open_clip folder "
                                     f"with {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        from safetensors import safe_open

        with safe_open(str(folder / WEIGHTS_FILE), "pt"):
            pass
    except Exception as e:
        raise source.local_error(f"{folder / WEIGHTS_FILE} is not a readable safetensors file "
                                 f"({str(e).strip()[:200]})") from None


def save_local(model, cfg: dict, folder: Path):
    """The open_clip local-dir format: config + safetensors state dict."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps({
        "model_cfg": cfg,
        "preprocess_cfg": {"mean": list(model.visual.image_mean), "std": list(model.visual.image_std)},
    }, indent=2))


class VisualGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, crops):
        return F.normalize(self.model.encode_image(crops), dim=-1)


def preprocess_facts(model, transform) -> dict:
    """Read off the eval transform (Resize shortest side, CenterCrop, ToTensor, Normalize)."""
    facts = {"transform": [type(t).__name__ for t in transform.transforms]}
    for t in transform.transforms:
        name = type(t).__name__
        if name == "Resize":
            facts.update(resize=t.size, interpolation=str(t.interpolation.value))
        elif name == "CenterCrop":
            facts["crop_size"] = list(t.size)
        elif name == "Normalize":
            facts.update(image_mean=list(t.mean), image_std=list(t.std))
    facts["image_size"] = list(_pair(model.visual.image_size))
    facts["pil_pass_order"] = pil_pass_order()
    return jsonable(facts)


def _pair(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


def export_model(source: Source, writer: BundleWriter, ctx: BuildContext) -> dict:
    model, transform, cfg = load_torch(source, ctx)
    entry: dict = {"source": source.describe()}
    if source.is_random:
        save_local(model, cfg, writer.source_dir("clip"))
        entry["source"]["saved_to"] = "source/clip"
    h, w = _pair(model.visual.image_size)
    graph = VisualGraph(model).eval()
    rng = ctx.generator(4)
    with ctx.timed("clip visual graph export"):
        example = torch.from_numpy(rng.standard_normal((2, 3, h, w), dtype=np.float32))
        io = export_onnx(graph, (example,), writer.path("clip/visual.onnx"), ["crops"], ["embeds"],
                         {"crops": {0: "batch"}, "embeds": {0: "batch"}}, ctx.opset)
    golden = GoldenRecorder()
    from PIL import Image

    image = transform(Image.fromarray(image_like(h + 20, w - 30, ctx.seed + 4))).numpy()[None]
    with torch.no_grad():
        for case, crops in (("random", rng.standard_normal((3, 3, h, w), dtype=np.float32)),
                            ("image", image.astype(np.float32))):
            embeds = to_numpy(graph(torch.from_numpy(crops)))
            golden.add(case, "visual", {"crops": crops}, {"embeds": embeds})
    entry.update({
        "graphs": {"visual": {"file": "clip/visual.onnx", **io}},
        "golden_file": golden.save(writer, "clip/golden.npz"),
        "tolerance": {"rel_l2": 1e-5},
        "image_size": [h, w],
        "embed_dim": int(embeds.shape[-1]),
        "preprocess": preprocess_facts(model, transform),
    })
    return entry
