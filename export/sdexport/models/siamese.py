"""Siamese ViT change model: pairs [N,2,3,S,S] -> per-patch L2 distance map + change logit."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sdrun.csvfile import COLUMNS

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
# vit_base_patch16_224's arguments for each random preset: small-random has ViT-Ti's width
# and heads in 4 blocks (about 1/50 of B/16's compute), for training from scratch on a CPU
PRESET_ARGS = {"tiny-random": TINY_ARGS, "small-random": dict(embed_dim=192, depth=4, num_heads=3),
               "full-random": {}}
HEAD_HIDDEN = 256
PATCH_HIDDEN = 64  # the patch-diff head's width per patch
HEADS = ("notebook", "patch-diff")


class SiameseViTChange(nn.Module):
    """The notebook's change model. A timm ViT built with its classifier (so a saved state
    dict holds `backbone.head.*`, unused here), `forward_features` tokens for both images,
    and a head Linear(2D, 256) -> ReLU -> Linear(256, 1) on the two mean-pooled token sets
    (class token included). The heat map is the per-patch L2 distance of the tokens after
    the first (the class token), on the patch grid.

    `n_labels` > 0 adds per-class change heads (the notebook's section 6, "classification
    heads, trained from category-level labels"): `class_head`, the same shape of MLP on the
    same pooled features, giving [N, 3, n_labels] logits: label v added / removed / changed."""

    def __init__(self, backbone: nn.Module, hidden: int | None = None, n_labels: int = 0,
                 head: str = "notebook"):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head {head!r}: choose one of {', '.join(HEADS)}")
        self.backbone = backbone
        self.embed_dim = backbone.num_features
        self.n_labels = n_labels
        self.head_kind = head
        if head == "notebook":
            hidden = hidden or HEAD_HIDDEN
            self.head = nn.Sequential(nn.Linear(2 * self.embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
            if n_labels:
                self.class_head = nn.Sequential(nn.Linear(2 * self.embed_dim, hidden), nn.ReLU(),
                                                nn.Linear(hidden, 3 * n_labels))
        else:  # patch-diff (docs/departures.md): features of each patch's difference, max- and mean-pooled
            hidden = hidden or PATCH_HIDDEN
            self.patch_proj = nn.Sequential(nn.Linear(3 * self.embed_dim, hidden), nn.ReLU(),
                                            nn.Linear(hidden, hidden), nn.ReLU())
            self.head = nn.Linear(2 * hidden, 1)
            if n_labels:  # per patch, then each cell's largest: its own most telling patch
                self.class_head = nn.Linear(hidden, 3 * n_labels)

    def patch_features(self, ta: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
        """The patch-diff head's [N, patches, hidden] features of each patch's a - b, |a - b|
        and a * b (signed: the per-class heads tell "added" from "removed" by it)."""
        pa, pb = ta[:, 1:], tb[:, 1:]
        d = pa - pb
        return self.patch_proj(torch.cat([d, d.abs(), pa * pb], dim=-1))

    def forward(self, a: torch.Tensor, b: torch.Tensor):
        n = a.shape[0]
        tokens = self.backbone.forward_features(torch.cat([a, b]))
        ta, tb = tokens[:n], tokens[n:]
        gh, gw = self.backbone.patch_embed.grid_size
        heat = (ta[:, 1:] - tb[:, 1:]).pow(2).sum(-1).sqrt().reshape(n, gh, gw)
        if self.head_kind == "notebook":
            pooled = torch.cat([ta.mean(1), tb.mean(1)], dim=1)
            logit = self.head(pooled).squeeze(-1)
            classes = self.class_head(pooled) if self.n_labels else None
        else:
            f = self.patch_features(ta, tb)
            logit = self.head(torch.cat([f.amax(1), f.mean(1)], dim=1)).squeeze(-1)
            classes = self.class_head(f).amax(1) if self.n_labels else None
        if classes is None:
            return heat, logit
        return heat, logit, classes.reshape(n, 3, self.n_labels)


class PairGraph(nn.Module):
    def __init__(self, model: SiameseViTChange):
        super().__init__()
        self.model = model

    def forward(self, pairs):
        return self.model(pairs[:, 0], pairs[:, 1])


def backbone_for(source: Source):
    """The timm ViT of a `--siamese` source: a preset (random), a local timm folder or a hub name."""
    import timm

    if source.kind == "preset":
        return timm.create_model("vit_base_patch16_224", pretrained=False, **PRESET_ARGS[source.id])
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
    except Exception as e:
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
    except Exception as e:
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


def checkpoint_vocabulary(path: Path) -> list[str] | None:
    """The label list `sdexport train-change` stores in a checkpoint with per-class
    heads (safetensors metadata), or None."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta["vocabulary"]) if meta.get("vocabulary") else None


def _check_head_vocabulary(path: Path, n_labels: int, vocabulary: list[str]) -> None:
    """Per-class heads give one logit per bundle label: the checkpoint's labels must be
    the bundle's, in its order."""
    trained = checkpoint_vocabulary(path)
    if trained is None:
        if n_labels != len(vocabulary):
            raise SourceError(f"--siamese-ckpt {path}: its per-class heads have {n_labels} labels, "
                              f"the bundle's vocabulary {len(vocabulary)}")
        return
    if list(trained) != list(vocabulary):
        extra = [w for w in trained if w not in vocabulary]
        lacking = [w for w in vocabulary if w not in trained]
        raise SourceError(f"--siamese-ckpt {path}: its per-class heads were trained on another "
                          f"vocabulary ({len(trained)} labels; not in the bundle: {extra[:8]}, "
                          f"missing: {lacking[:8]}{'' if extra or lacking else ', same labels in another order'}); "
                          "build with --vocab of the training CSV (or the run's vocabulary.json labels)")


def load_torch(source: Source, ctx: BuildContext, ckpt: str | Path | None = None):
    """(SiameseViTChange in eval mode, timm data config, what the head was loaded from)."""
    import timm

    seed_torch(ctx.seed * 7 + 3)
    backbone = backbone_for(source)
    if ckpt is None and source.kind == "local" and (Path(source.id) / CKPT_FILE).is_file():
        ckpt = Path(source.id) / CKPT_FILE
    head_from = "random init (no --siamese-ckpt)"
    if ckpt is not None:
        ckpt = Path(ckpt)
        sd = load_state_dict_file(ckpt)
        head, hidden, n_labels = head_of_state_dict(sd)
        model = SiameseViTChange(backbone, hidden, n_labels, head=head)
        _check_state_dict(ckpt, model, sd)
        if n_labels:
            _check_head_vocabulary(ckpt, n_labels, ctx.vocabulary)
        model.load_state_dict(sd, strict=True)
        head_from = str(ckpt)
    else:
        model = SiameseViTChange(backbone)
    data_cfg = timm.data.resolve_data_config({}, model=backbone)
    return model.eval(), data_cfg, head_from


def head_of_state_dict(sd: dict) -> tuple[str, int, int]:
    """(head kind, hidden width, per-class labels) of a checkpoint, from its keys."""
    if "patch_proj.0.weight" in sd:
        labels = sd["class_head.weight"].shape[0] // 3 if "class_head.weight" in sd else 0
        return "patch-diff", int(sd["patch_proj.0.weight"].shape[0]), int(labels)
    hidden = sd["head.0.weight"].shape[0] if "head.0.weight" in sd else HEAD_HIDDEN
    labels = sd["class_head.2.weight"].shape[0] // 3 if "class_head.2.weight" in sd else 0
    return "notebook", int(hidden), int(labels)


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
    entry: dict = {"source": {**source.describe(), "head": head_from}, "change_head": model.head_kind}
    if source.is_random:
        save_local(model, writer.source_dir("siamese"))
        entry["source"]["saved_to"] = "source/siamese"
    _, h, w = data_cfg["input_size"]
    graph = PairGraph(model).eval()
    rng = ctx.generator(3)
    with ctx.timed("siamese graph export"):
        example = torch.from_numpy(rng.standard_normal((2, 2, 3, h, w), dtype=np.float32))
        outputs = ["heat", "logit"] + (["class_logits"] if model.n_labels else [])
        io = export_onnx(graph, (example,), writer.path("siamese/pair.onnx"), ["pairs"], outputs,
                         {"pairs": {0: "pairs"}, **{o: {0: "pairs"} for o in outputs}}, ctx.opset)
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
            out = graph(torch.from_numpy(pairs))
            golden.add(case, "pair", {"pairs": pairs}, {o: to_numpy(t) for o, t in zip(outputs, out)})
    grid = list(model.backbone.patch_embed.grid_size)
    entry.update({
        "graphs": {"pair": {"file": "siamese/pair.onnx", **io}},
        "golden_file": golden.save(writer, "siamese/golden.npz"),
        "tolerance": {"rel_l2": 1e-5},
        "image_size": [h, w],
        "heat_grid": grid,
        "preprocess": heat_facts((h, w)),
    })
    if model.n_labels:  # per-class change heads: class_logits [N, 3, V] over the bundle's labels
        entry["class_heads"] = {"columns": list(COLUMNS), "labels": len(ctx.vocabulary)}
    return entry
