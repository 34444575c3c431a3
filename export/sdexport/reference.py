"""The PyTorch reference pipeline: the oracle `sdrun` must agree with.

Written the way the seed notebook does it: Hugging Face models with their own
processors and post-processing, one image (and one flipped view) per call, the
prompts re-encoded on every OWL-ViT call, ensemble-boxes for WBF, the slice-and-mean
heat fusion, and CLIP run on both crops of every candidate pair. It loads the
models from a random bundle's `source/` folders, so it runs exactly the weights the
bundle's graphs were exported from.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from scipy.optimize import linear_sum_assignment

from .context import BuildContext
from .models import clip as clip_model
from .models import gdino as gdino_model
from .models import owlvit as owlvit_model
from .models import siamese as siamese_model
from .sources import Source


class ReferencePipeline:
    def __init__(self, bundle_dir: str | Path, params: dict | None = None):
        root = Path(bundle_dir)
        self.manifest = json.loads((root / "manifest.json").read_text())
        m = self.manifest
        self.labels = m["vocabulary"]
        self.params = {**json.loads((root / m["params_file"]).read_text()), **(params or {})}
        ctx = BuildContext(vocabulary=self.labels, prompt_templates=m["prompt_templates"],
                           log=lambda s: None)

        def local(name):
            folder = root / "source" / name
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder}: the reference needs a random bundle's source/ folders")
            return Source(name, "local", str(folder))

        models = m["models"]
        self.owl, self.owl_proc = owlvit_model.load_torch(local("owlvit"), ctx)
        self.prompts = models["owlvit"]["prompts"]
        self.prompt_labels = np.load(root / models["owlvit"]["prompt_labels_file"])
        self.gd = None
        if "gdino" in models:
            entry = models["gdino"]
            self.gd, self.gd_proc = gdino_model.load_torch(local("gdino"), ctx)
            self.gd_prompt = entry["prompt"]
            self.gd_size = tuple(entry["image_size"])
            self.gd_token_labels = np.load(root / entry["token_labels_file"])
        self.siamese, data_cfg, _ = siamese_model.load_torch(local("siamese"), ctx)
        self.siamese_tf = siamese_model.heat_transform(tuple(data_cfg["input_size"][1:]))
        self.clip, self.clip_tf, _ = clip_model.load_torch(local("clip"), ctx)
        self.device = torch.device("cpu")

    def to(self, device) -> "ReferencePipeline":
        """Run the models on `device` (e.g. "cuda"); inputs go there, outputs come back to
        the CPU for the numpy post-processing. The default, the CPU, changes nothing."""
        self.device = torch.device(device)
        for m in (self.owl, self.gd, self.siamese, self.clip):
            if m is not None:
                m.to(self.device)
        return self

    # ---- detectors, one image per call ----------------------------------------------
    @torch.inference_mode()
    def owlvit(self, image: np.ndarray):
        h, w = image.shape[:2]
        inputs = self.owl_proc(text=[self.prompts], images=image, return_tensors="pt")
        out = self.owl(**{k: v.to(self.device) for k, v in inputs.items()})
        out.logits, out.pred_boxes = out.logits.cpu(), out.pred_boxes.cpu()
        res = self.owl_proc.image_processor.post_process_object_detection(
            out, threshold=self.params["owlvit_score_thr"], target_sizes=[(h, w)])[0]
        return (res["boxes"].numpy(), res["scores"].numpy(),
                self.prompt_labels[res["labels"].numpy()])

    @torch.inference_mode()
    def gdino(self, image: np.ndarray):
        h, w = image.shape[:2]
        gh, gw = self.gd_size
        inputs = self.gd_proc(images=image, text=self.gd_prompt, return_tensors="pt",
                              size={"height": gh, "width": gw})
        out = self.gd(**{k: v.to(self.device) for k, v in inputs.items()})
        out.logits, out.pred_boxes = out.logits.cpu(), out.pred_boxes.cpu()
        t = len(self.gd_token_labels)
        probs = out.logits[0, :, :t].sigmoid()
        per_label = torch.zeros(probs.shape[0], len(self.labels), dtype=probs.dtype)
        for label in range(len(self.labels)):
            cols = torch.from_numpy(np.flatnonzero(self.gd_token_labels == label))
            if len(cols):
                per_label[:, label] = probs[:, cols].max(-1).values
        scores, labels = per_label.max(-1)
        keep = scores > self.params["gdino_box_thr"]
        cx, cy, bw, bh = out.pred_boxes[0][keep].unbind(-1)
        boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
        boxes = boxes * torch.tensor([w, h, w, h], dtype=boxes.dtype)
        return boxes.numpy(), scores[keep].numpy(), labels[keep].numpy()

    def detect(self, image: np.ndarray):
        """Flip TTA per detector, un-flipped, then ensemble-boxes WBF on normalised boxes."""
        from ensemble_boxes import weighted_boxes_fusion

        h, w = image.shape[:2]
        flipped = np.ascontiguousarray(image[:, ::-1])
        boxes_list, scores_list, labels_list = [], [], []
        for fn in [self.owlvit] + ([self.gdino] if self.gd is not None else []):
            for view, is_flipped in ((image, False), (flipped, True)):
                b, s, lab = fn(view)
                if is_flipped:
                    b = np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], -1) if len(b) else b
                boxes_list.append((b / np.array([w, h, w, h])).reshape(-1, 4))
                scores_list.append(s)
                labels_list.append(lab)
        if not any(len(s) for s in scores_list):
            return np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            boxes, scores, labels = weighted_boxes_fusion(
                boxes_list, scores_list, labels_list, iou_thr=self.params["wbf_iou_thr"],
                skip_box_thr=self.params["wbf_skip_box_thr"], conf_type="avg")
        return boxes * np.array([w, h, w, h]), scores, labels.astype(np.int64)

    # ---- change heatmap -----------------------------------------------------------
    @torch.inference_mode()
    def heat(self, a: np.ndarray, b: np.ndarray):
        x = torch.stack([self.siamese_tf(Image.fromarray(a)), self.siamese_tf(Image.fromarray(b))])
        x = x.to(self.device)
        patch, logit = self.siamese(x[:1], x[1:])
        return patch[0].cpu().numpy(), float(logit[0])

    @staticmethod
    def upsample(patch: np.ndarray, h: int, w: int) -> np.ndarray:
        m = (patch - patch.min()) / (patch.max() - patch.min() + 1e-6)  # the notebook's eps
        return cv2.resize(m.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)

    @staticmethod
    def hot_share(heat: np.ndarray, box, heat_th: float) -> float:
        h, w = heat.shape
        # the notebook's bounds: each edge clamped to [0, W-1] / [0, H-1]
        x1, y1, x2, y2 = (_pixel(v, lim) for v, lim in zip(box, (w - 1, h - 1, w - 1, h - 1)))
        region = heat[y1:y2, x1:x2]
        return float((region >= heat_th).mean()) if region.size else 0.0

    # ---- CLIP, per candidate pair -------------------------------------------------
    @torch.inference_mode()
    def clip_embed(self, image: np.ndarray, box) -> torch.Tensor:
        """The notebook's crop_to_tensor + encode_image; raises for a crop it cannot embed."""
        crop = crop_box(image, box)
        if crop is None:
            raise ValueError(f"box {list(box)}: empty crop")
        e = self.clip.encode_image(self.clip_tf(crop)[None].to(self.device))
        return torch.nn.functional.normalize(e, dim=-1)[0].cpu()

    # ---- one pair -------------------------------------------------------------------
    def diff(self, a: np.ndarray, b: np.ndarray) -> dict:
        p = self.params
        patch, logit = self.heat(a, b)
        objects = []
        for im in (a, b):
            boxes, scores, labels = self.detect(im)
            heat = self.upsample(patch, *im.shape[:2])
            fused = np.array([s * (1 + p["heat_lambda"] * self.hot_share(heat, bx, p["heat_th"]))
                              for bx, s in zip(boxes, scores)])
            keep = fused >= p["det_thr"] if len(fused) else np.zeros(0, bool)
            objects.append((boxes[keep], labels[keep], scores[keep], fused[keep]))
        (ba, la, _, _), (bb, lb, _, _) = objects
        (ha, wa), (hb, wb) = a.shape[:2], b.shape[:2]
        na, nb = len(la), len(lb)
        cost = np.ones((na, nb))
        affinity = np.zeros((na, nb))
        iou = np.zeros((na, nb))
        for i in range(na):
            for j in range(nb):
                bi = ba[i] / np.array([wa, ha, wa, ha])
                bj = bb[j] / np.array([wb, hb, wb, hb])
                iou[i, j] = _iou(bi, bj)
                if la[i] == lb[j]:
                    try:
                        sim = (float(self.clip_embed(a, ba[i]) @ self.clip_embed(b, bb[j])) + 1) / 2
                    except ValueError:
                        sim = iou[i, j]  # the notebook's fallback
                    affinity[i, j] = p["alpha"] * iou[i, j] + (1 - p["alpha"]) * sim
                    cost[i, j] = 1 - affinity[i, j]
        pairs, changed = [], []
        if na and nb:
            for i, j in zip(*linear_sum_assignment(cost)):
                if la[i] == lb[j] and affinity[i, j] >= p["iou_thr"]:
                    pairs.append((i, j))
                    if iou[i, j] < p["iou_thr"]:
                        changed.append(i)
        mi, mj = {i for i, _ in pairs}, {j for _, j in pairs}
        return {
            "added": sorted({self.labels[lb[j]] for j in range(nb) if j not in mj}),
            "removed": sorted({self.labels[la[i]] for i in range(na) if i not in mi}),
            "changed": sorted({self.labels[la[i]] for i in changed}),
            "boxes": (ba, bb), "labels": (la, lb), "scores": (objects[0][2], objects[1][2]),
            "fused": (objects[0][3], objects[1][3]), "pairs": pairs, "change_logit": logit,
        }


def _pixel(x: float, size: int) -> int:
    """A box edge as a pixel index: floor, with edges within 1e-3 px below a whole pixel
    counted as on it (the runtime's rule, written out independently)."""
    return int(min(max(np.floor(float(x) + 1e-3), 0), size))


def crop_box(image: np.ndarray, box) -> Image.Image | None:
    """The notebook's CLIP crop of a pixel box: x1, y1 = max(0, int(.)), x2, y2 =
    min(W-1 / H-1, int(.)) (edges by `_pixel`), or None when it is empty (the notebook's
    crop then fails and its similarity falls back to the IoU)."""
    h, w = image.shape[:2]
    x0, y0 = _pixel(box[0], w - 1), _pixel(box[1], h - 1)
    x1, y1 = _pixel(box[2], w - 1), _pixel(box[3], h - 1)
    if x1 <= x0 or y1 <= y0:
        return None
    return Image.fromarray(np.ascontiguousarray(image[y0:y1, x0:x1]))


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
