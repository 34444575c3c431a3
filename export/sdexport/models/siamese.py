"""Siamese ViT change model: pairs [N,2,3,S,S] -> per-patch L2 distance map + change logit."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
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
from ..sources import Source, SourceError
from ..writer import BundleWriter, GoldenRecorder

CKPT_FILE = "siamese_change.safetensors"
TINY_ARGS = dict(embed_dim=32, depth=2, num_heads=2)
HEAD_HIDDEN = 256


class SiameseViTChange(nn.Module):
    """The notebook's change model. A timm ViT built with its classifier (so a saved state
    dict holds `backbone.head.*`, unused here), `forward_features` tokens for both images,
    and a head Linear(2D, 256) -> ReLU -> Linear(256, 1) on the two mean-pooled token sets
    (class token included). The heat map is the per-patch L2 distance of the tokens after
    the first (the class token), on the patch grid."""

    def __init__(self, backbone: nn.Module, hidden: int = HEAD_HIDDEN):
        super().__init__()
        self.backbone = backbone
        self.embed_dim = backbone.num_features
        self.head = nn.Sequential(nn.Linear(2 * self.embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, a: torch.Tensor, b: torch.Tensor):
        n = a.shape[0]
        tokens = self.backbone.forward_features(torch.cat([a, b]))
        ta, tb = tokens[:n], tokens[n:]
        gh, gw = self.backbone.patch_embed.grid_size
        heat = (ta[:, 1:] - tb[:, 1:]).pow(2).sum(-1).sqrt().reshape(n, gh, gw)
        logit = self.head(torch.cat([ta.mean(1), tb.mean(1)], dim=1)).squeeze(-1)
        return heat, logit


class PairGraph(nn.Module):
    def __init__(self, model: SiameseViTChange):
        super().__init__()
        self.model = model

    def forward(self, pairs):
        return self.model(pairs[:, 0], pairs[:, 1])


def _backbone(source: Source):
    import timm

    if source.kind == "preset":
        kwargs = TINY_ARGS if source.id == "tiny-random" else {}
        return timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs)
    try:
        if source.kind == "local":
            folder = Path(source.id)
            if not (folder / "config.json").is_file():
                raise source.local_error(f"{folder / 'config.json'} is missing (expected a timm "
                                         "folder with config.json and model.safetensors)")
            return timm.create_model(f"local-dir:{folder}", pretrained=True)
        return timm.create_model(source.id, pretrained=True)
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001
        if source.kind == "hub":
            raise source.hub_error(e) from None
        raise source.local_error(f"{type(e).__name__}: {str(e).strip()[:300]}") from None


def load_state_dict_file(path: Path) -> dict:
    """A state dict from safetensors, or torch.load(weights_only=True); errors name the file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise ValueError(f"holds a {type(sd).__name__}, not a state dict")
        return sd
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"--siamese-ckpt {path}: cannot be read as a state dict "
                          f"({type(e).__name__}: {str(e).strip()[:200]})") from None


def _check_state_dict(path: Path, model: nn.Module, sd: dict) -> None:
    """A clear error naming the file and the keys when `sd` is not the notebook's
    SiameseViTChange on this backbone (missing, unexpected or misshapen tensors)."""
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [f"{k} {tuple(sd[k].shape)} (expected {tuple(want[k].shape)})"
              for k in want if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)]
    if not (missing or unexpected or shapes):
        return

    def some(keys):
        return ", ".join(keys[:6]) + (f", ... ({len(keys) - 6} more)" if len(keys) > 6 else "")

    parts = [f"{len(v)} {what}: {some(v)}" for what, v in
             (("missing", missing), ("unexpected", unexpected), ("with another shape", shapes)) if v]
    raise SourceError(f"--siamese-ckpt {path}: not a state dict of the notebook's SiameseViTChange "
                      f"on this backbone ({'; '.join(parts)})")


def load_torch(source: Source, ctx: BuildContext, ckpt: str | Path | None = None):
    """(SiameseViTChange in eval mode, timm data config, what the head was loaded from)."""
    import timm

    seed_torch(ctx.seed * 7 + 3)
    backbone = _backbone(source)
    if ckpt is None and source.kind == "local" and (Path(source.id) / CKPT_FILE).is_file():
        ckpt = Path(source.id) / CKPT_FILE
    head_from = "random init (no --siamese-ckpt)"
    if ckpt is not None:
        ckpt = Path(ckpt)
        sd = load_state_dict_file(ckpt)
        hidden = sd["head.0.weight"].shape[0] if "head.0.weight" in sd else HEAD_HIDDEN
        model = SiameseViTChange(backbone, hidden)
        _check_state_dict(ckpt, model, sd)
        model.load_state_dict(sd, strict=True)
        head_from = str(ckpt)
    else:
        model = SiameseViTChange(backbone)
    data_cfg = timm.data.resolve_data_config({}, model=backbone)
    return model.eval(), data_cfg, head_from


def save_local(model: SiameseViTChange, folder: Path):
    """A timm folder for the backbone plus the whole model's state dict."""
    from safetensors.torch import save_file
    from timm.models import save_for_hf

    save_for_hf(model.backbone, str(folder), safe_serialization=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / CKPT_FILE))


def preprocess_facts(data_cfg: dict) -> dict:
    facts = {k: data_cfg[k] for k in ("input_size", "interpolation", "mean", "std",
                                      "crop_pct", "crop_mode") if k in data_cfg}
    return jsonable({**facts, "pil_pass_order": pil_pass_order()})


def heat_transform(size_hw: tuple[int, int]):
    """The notebook's heat-map input: T.Resize((H, W)) (PIL bilinear, the whole image
    squashed), T.ToTensor() ([0, 1], no mean/std)."""
    import torchvision.transforms as T

    return T.Compose([T.Resize(tuple(size_hw)), T.ToTensor()])


def heat_facts(size_hw: tuple[int, int]) -> dict:
    """`heat_transform` as preprocessing facts the runtime reads (`sdrun.stages.preprocess.siamese_image`):
    squash to HxW, bilinear, [0, 1]. Bundles built before it record timm's eval transform
    (`preprocess_facts`) and keep it."""
    h, w = size_hw
    return jsonable({"transform": f"notebook: Resize(({h}, {w})) bilinear squash, ToTensor [0, 1]",
                     "input_size": [3, h, w], "interpolation": "bilinear", "crop_pct": 1.0,
                     "crop_mode": "squash", "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
                     "pil_pass_order": pil_pass_order()})


def timm_transform(data_cfg: dict):
    import timm

    return timm.data.create_transform(**data_cfg, is_training=False)


def export_model(source: Source, writer: BundleWriter, ctx: BuildContext,
                 ckpt: str | Path | None = None) -> dict:
    model, data_cfg, head_from = load_torch(source, ctx, ckpt)
    entry: dict = {"source": {**source.describe(), "head": head_from}}
    if source.is_random:
        save_local(model, writer.source_dir("siamese"))
        entry["source"]["saved_to"] = "source/siamese"
    _, h, w = data_cfg["input_size"]
    graph = PairGraph(model).eval()
    rng = ctx.generator(3)
    with ctx.timed("siamese graph export"):
        example = torch.from_numpy(rng.standard_normal((2, 2, 3, h, w), dtype=np.float32))
        io = export_onnx(graph, (example,), writer.path("siamese/pair.onnx"), ["pairs"],
                         ["heat", "logit"], {"pairs": {0: "pairs"}, "heat": {0: "pairs"},
                                             "logit": {0: "pairs"}}, ctx.opset)
    from PIL import Image

    transform = heat_transform((h, w))
    a = image_like(h + 31, w + 7, ctx.seed + 3)
    b = a.copy()
    b[h // 4: h // 2, w // 3: w // 2] = 255 - b[h // 4: h // 2, w // 3: w // 2]
    image_pair = np.stack([transform(Image.fromarray(x)).numpy() for x in (a, b)])[None]
    golden = GoldenRecorder()
    with torch.no_grad():
        for case, pairs in (("random", rng.standard_normal((3, 2, 3, h, w), dtype=np.float32)),
                            ("image", image_pair.astype(np.float32))):
            heat, logit = graph(torch.from_numpy(pairs))
            golden.add(case, "pair", {"pairs": pairs}, {"heat": to_numpy(heat), "logit": to_numpy(logit)})
    grid = list(model.backbone.patch_embed.grid_size)
    entry.update({
        "graphs": {"pair": {"file": "siamese/pair.onnx", **io}},
        "golden_file": golden.save(writer, "siamese/golden.npz"),
        "tolerance": {"rel_l2": 1e-5},
        "image_size": [h, w],
        "heat_grid": grid,
        "preprocess": heat_facts((h, w)),
    })
    return entry
