"""The optimised PyTorch pipeline: what a careful user would write instead of the seed.

The same models as `ReferencePipeline` (loaded from a random bundle's `source/`, or shared
with a loaded reference), run the way the runtime runs its graphs:

- the OWL-ViT query embeddings of every prompt are computed once, at load time;
- one call per detector on the fused TTA batch [a, flip(a), b, flip(b)];
- one Siamese call for the pair, one CLIP batch for every kept crop of both images;
- `torch.inference_mode()` throughout;
- the model-free post-processing is `sdrun`'s numpy code (box decoding, un-flipping,
  Weighted Boxes Fusion, heat fusion, Hungarian matching): the same math as the seed's
  ensemble-boxes / slice-and-mean / per-pair loops, without their Python loops.

It gives the reference's answers (benchmarks/accuracy.py checks it on every run).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from PIL import Image

from sdrun.stages import detect as sd_detect
from sdrun.stages import fusion as sd_fusion
from sdrun.stages import heatmap as sd_heatmap
from sdrun.stages import matching as sd_matching

from .models import owlvit as owlvit_model
from .reference import ReferencePipeline, crop_box

CLIP_CHUNK = 64


class _NoTimer:
    @staticmethod
    def stage(name: str):
        return contextlib.nullcontext()


class FastPipeline(ReferencePipeline):
    """`diff(a, b)` -> the same dict as `ReferencePipeline.diff`.

    `share`: a loaded `ReferencePipeline` (or FastPipeline) whose models to use instead of
    loading them again. `timer`: an object whose `stage(name)` is a context manager around
    each stage (preprocess, each model, ...); benchmarks pass one."""

    def __init__(self, bundle_dir=None, params: dict | None = None,
                 share: ReferencePipeline | None = None, timer=None, device: str | None = None):
        if share is not None:
            self.__dict__.update({k: v for k, v in share.__dict__.items()
                                  if not k.startswith("_fast")})
            if params:
                self.params = {**self.params, **params}
        else:
            super().__init__(bundle_dir, params)
            if device is not None:
                self.to(device)
        self.timer = timer or _NoTimer()
        self._image_graph = owlvit_model.ImageGraph(self.owl).eval()
        with torch.inference_mode():
            tokens = owlvit_model.tokenize(self.owl_proc, self.prompts)
            q = owlvit_model.TextGraph(self.owl).eval()(
                *(torch.from_numpy(tokens[k]).to(self.device) for k in ("input_ids", "attention_mask")))
        self.queries = sd_detect.normalize_queries(q.cpu().numpy().astype(np.float32))
        if self.gd is not None:
            enc = self.gd_proc.tokenizer(self.gd_prompt, return_tensors="pt")
            self.gd_text = {k: enc[k].to(self.device) for k in ("input_ids", "attention_mask", "token_type_ids")}

    # ---- detectors, one call per detector on every view ------------------------------
    @torch.inference_mode()
    def _owlvit_views(self, views):
        with self.timer.stage("preprocess"):
            pixels = self.owl_proc.image_processor(images=views, return_tensors="pt")["pixel_values"]
        with self.timer.stage("OWL-ViT"):
            boxes, embeds, shift, scale = (t.cpu().numpy() for t in self._image_graph(pixels.to(self.device)))
        thr = self.params["owlvit_score_thr"]
        return [sd_detect.owlvit_detections(boxes[k], embeds[k], shift[k], scale[k], self.queries,
                                            self.prompt_labels, thr) for k in range(len(views))]

    @torch.inference_mode()
    def _gdino_views(self, views):
        gh, gw = self.gd_size
        with self.timer.stage("preprocess"):
            enc = self.gd_proc.image_processor(images=views, size={"height": gh, "width": gw},
                                               return_tensors="pt")
        n = len(views)
        with self.timer.stage("Grounding DINO"):
            out = self.gd(pixel_values=enc["pixel_values"].to(self.device),
                          pixel_mask=enc["pixel_mask"].to(self.device),
                          **{k: v.expand(n, -1) for k, v in self.gd_text.items()})
            logits, pred_boxes = out.logits.cpu().numpy(), out.pred_boxes.cpu().numpy()
        thr = self.params["gdino_box_thr"]
        return [sd_detect.gdino_detections(logits[k], pred_boxes[k], self.gd_token_labels,
                                           len(self.labels), thr) for k in range(n)]

    def detect_pair(self, a: np.ndarray, b: np.ndarray):
        """[(boxes normalised xyxy float64, scores, labels)] for a and b: flip TTA in one
        call per detector, un-flipped, WBF per image over (views x detectors)."""
        with self.timer.stage("preprocess"):
            views = [np.ascontiguousarray(v) for im in (a, b) for v in (im, im[:, ::-1])]
        per_view = [self._owlvit_views(views)]
        if self.gd is not None:
            per_view.append(self._gdino_views(views))
        p = self.params
        out = []
        for i in range(2):
            boxes, scores, labels = [], [], []
            for dets in per_view:
                for k, flipped in ((2 * i, False), (2 * i + 1, True)):
                    bx, s, lab = dets[k]
                    boxes.append(np.clip(sd_detect.unflip(bx) if flipped else bx, 0.0, 1.0))
                    scores.append(s)
                    labels.append(lab)
            if not any(len(s) for s in scores):
                out.append((np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64)))
                continue
            fb, fs, fl = sd_fusion.weighted_boxes_fusion(
                boxes, scores, labels, iou_thr=p["wbf_iou_thr"],
                skip_box_thr=p["wbf_skip_box_thr"], conf_type="avg")
            out.append((fb, fs, fl.astype(np.int64)))
        return out

    # ---- Siamese and CLIP: one call each ---------------------------------------------
    @torch.inference_mode()
    def heat_pair(self, a: np.ndarray, b: np.ndarray):
        with self.timer.stage("preprocess"):
            x = torch.stack([self.siamese_tf(Image.fromarray(a)), self.siamese_tf(Image.fromarray(b))])
        with self.timer.stage("Siamese"):
            x = x.to(self.device)
            patch, logit = self.siamese(x[:1], x[1:])
            patch, logit = patch.cpu(), logit.cpu()
        return patch[0].numpy(), float(logit[0])

    @torch.inference_mode()
    def clip_batch(self, images, boxes_px) -> list[np.ndarray]:
        with self.timer.stage("preprocess"):
            pil = [crop_box(im, box) for im, bx in zip(images, boxes_px) for box in bx]
            crops = [self.clip_tf(c) for c in pil if c is not None]
        counts = [len(bx) for bx in boxes_px]
        ok = np.array([c is not None for c in pil], bool)
        if not crops:
            return [np.full((n, 0), np.nan, np.float32) for n in counts]
        with self.timer.stage("CLIP"):
            x = torch.stack(crops).to(self.device)
            e = torch.cat([self.clip.encode_image(x[i:i + CLIP_CHUNK])
                           for i in range(0, len(x), CLIP_CHUNK)])
            e = torch.nn.functional.normalize(e, dim=-1).cpu().numpy()
        full = np.full((len(ok), e.shape[1]), np.nan, e.dtype)  # no crop: NaN, matched by IoU
        full[ok] = e
        return np.split(full, np.cumsum(counts)[:-1])

    # ---- one pair ---------------------------------------------------------------------
    def diff(self, a: np.ndarray, b: np.ndarray) -> dict:
        p = self.params
        dets = self.detect_pair(a, b)
        patch, logit = self.heat_pair(a, b)
        kept = []
        for im, (boxes, scores, labels) in zip((a, b), dets):
            h, w = im.shape[:2]
            heat = sd_heatmap.upsample_heat(patch, h, w)
            px = boxes * np.array([w, h, w, h], np.float64)
            share = sd_heatmap.hot_share(heat, px, p["heat_th"])
            fused = sd_heatmap.fuse_scores(scores, share, p["heat_lambda"])
            keep = fused >= p["det_thr"]
            kept.append((boxes[keep], px[keep], labels[keep], scores[keep], fused[keep]))
        (na, pa, la, sa, fa), (nb, pb, lb, sb, fb) = kept
        ea, eb = self.clip_batch((a, b), (pa, pb))
        m = sd_matching.match_objects(na, la, ea, nb, lb, eb, alpha=p["alpha"], iou_thr=p["iou_thr"])
        return {
            "added": sorted({self.labels[lb[j]] for j in m.added}),
            "removed": sorted({self.labels[la[i]] for i in m.removed}),
            "changed": sorted({self.labels[la[i]] for i, _ in m.changed}),
            "boxes": (pa, pb), "labels": (la, lb), "scores": (sa, sb), "fused": (fa, fb),
            "pairs": m.pairs, "change_logit": logit,
        }
