"""OWL-ViT: image graph (pixels -> boxes, class embeddings, logit shift/scale) and text graph.

The query embeddings of every prompt are computed here, once, and stored; the
runtime computes logits = (class_embeds . q/|q| + shift) * scale itself.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from sdrun.bundle.vocab import make_prompts

from ..context import (
    BuildContext,
    export_onnx,
    image_like,
    jsonable,
    seed_torch,
    to_numpy,
)
from ..sources import Source
from ..tokenizers import clip_tokenizer
from ..writer import BundleWriter, GoldenRecorder

TEXT_LEN = 16  # OWL-ViT pads every prompt to 16 tokens

TINY = dict(
    text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=TEXT_LEN),
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, image_size=128, patch_size=16),
    projection_dim=32,
)


def load_torch(source: Source, ctx: BuildContext):
    """(OwlViTForObjectDetection in eval mode, OwlViTProcessor)."""
    from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTProcessor

    if source.kind == "preset":
        from transformers import OwlViTImageProcessor

        seed_torch(ctx.seed * 7 + 1)
        config = OwlViTConfig(**TINY) if source.id == "tiny-random" else OwlViTConfig()
        model = OwlViTForObjectDetection(config)
        reinit_heads(model)
        size = config.vision_config.image_size
        processor = OwlViTProcessor(
            image_processor=OwlViTImageProcessor(size={"height": size, "width": size},
                                                 crop_size={"height": size, "width": size}),
            tokenizer=clip_tokenizer(TEXT_LEN))
        return model.eval(), processor
    try:
        model = OwlViTForObjectDetection.from_pretrained(source.id)
        processor = OwlViTProcessor.from_pretrained(source.id)
    except Exception as e:  # every loading failure becomes one clear message
        if source.kind == "hub":
            raise source.hub_error(e) from None
        raise source.local_error(f"not a loadable save_pretrained folder ({type(e).__name__}: "
                                 f"{str(e).strip()[:300]})") from None
    return model.eval(), processor


def reinit_heads(model) -> None:
    """transformers' std-1.0 init of the heads saturates random boxes and ties scores
    at exactly 0.5, so tests would flip on float noise; use std 1/sqrt(fan_in)."""
    for head in (model.class_head, model.box_head):
        for m in head.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=1.0 / math.sqrt(m.in_features))
                nn.init.zeros_(m.bias)


class ImageGraph(nn.Module):
    """pixel_values [B,3,S,S] -> pred_boxes [B,N,4] (cxcywh in 0..1), class_embeds [B,N,D]
    (L2-normalised as OWL-ViT does, +1e-6), logit_shift [B,N,1], logit_scale [B,N,1]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        m = self.model
        feature_map = m.image_embedder(pixel_values=pixel_values)[0]
        b, h, w, d = feature_map.shape
        feats = feature_map.reshape(b, h * w, d)
        head = m.class_head
        class_embeds = head.dense0(feats)
        class_embeds = class_embeds / (torch.linalg.norm(class_embeds, dim=-1, keepdim=True) + 1e-6)
        logit_shift = head.logit_shift(feats)
        logit_scale = head.elu(head.logit_scale(feats)) + 1
        pred_boxes = m.box_predictor(feats, feature_map)
        return pred_boxes, class_embeds, logit_shift, logit_scale


class TextGraph(nn.Module):
    """input_ids, attention_mask [P,16] -> text_embeds [P,D] (projected, not normalised)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model.owlvit.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return out.pooler_output


def preprocess_facts(processor) -> dict:
    ip = processor.image_processor
    return jsonable({
        "processor": type(ip).__name__,
        "size": ip.size, "resample": getattr(ip.resample, "name", ip.resample),
        "do_resize": ip.do_resize, "do_center_crop": ip.do_center_crop,
        "crop_size": ip.crop_size, "do_rescale": ip.do_rescale,
        "rescale_factor": ip.rescale_factor, "do_normalize": ip.do_normalize,
        "image_mean": ip.image_mean, "image_std": ip.image_std,
    })


def tokenize(processor, prompts: list[str]) -> dict[str, np.ndarray]:
    enc = processor.tokenizer(prompts, padding="max_length", truncation=True,
                              max_length=TEXT_LEN, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64)}


def pixel_values(processor, image: np.ndarray) -> np.ndarray:
    return processor.image_processor(images=image, return_tensors="np")["pixel_values"].astype(np.float32)


def export_model(source: Source, writer: BundleWriter, ctx: BuildContext) -> dict:
    model, processor = load_torch(source, ctx)
    entry: dict = {"source": source.describe()}
    if source.is_random:
        d = writer.source_dir("owlvit")
        model.save_pretrained(d)
        processor.save_pretrained(d)
        entry["source"]["saved_to"] = "source/owlvit"

    size = model.config.vision_config.image_size
    image_graph, text_graph = ImageGraph(model).eval(), TextGraph(model).eval()
    rng = ctx.generator(1)
    golden = GoldenRecorder()

    with ctx.timed("owlvit image graph export"):
        example = torch.from_numpy(rng.standard_normal((2, 3, size, size), dtype=np.float32))
        image_io = export_onnx(
            image_graph, (example,), writer.path("owlvit/image.onnx"), ["pixel_values"],
            ["pred_boxes", "class_embeds", "logit_shift", "logit_scale"],
            {"pixel_values": {0: "batch"}, "pred_boxes": {0: "batch"}, "class_embeds": {0: "batch"},
             "logit_shift": {0: "batch"}, "logit_scale": {0: "batch"}}, ctx.opset)

    prompts, prompt_labels = make_prompts(ctx.vocabulary, ctx.prompt_templates)
    tokens = tokenize(processor, prompts)
    with ctx.timed("owlvit text graph export"):
        example = {k: torch.from_numpy(v[:3]) for k, v in tokens.items()}
        text_io = export_onnx(
            text_graph, (example["input_ids"], example["attention_mask"]),
            writer.path("owlvit/text.onnx"), ["input_ids", "attention_mask"], ["text_embeds"],
            {"input_ids": {0: "prompts"}, "attention_mask": {0: "prompts"},
             "text_embeds": {0: "prompts"}}, ctx.opset)

    with torch.no_grad():
        query_embeds = to_numpy(text_graph(*(torch.from_numpy(tokens[k])
                                              for k in ("input_ids", "attention_mask"))))

        def record_image(case, pixels):
            outs = image_graph(torch.from_numpy(pixels))
            golden.add(case, "image", {"pixel_values": pixels},
                       dict(zip(["pred_boxes", "class_embeds", "logit_shift", "logit_scale"],
                                map(to_numpy, outs))))

        record_image("random", rng.standard_normal((2, 3, size, size), dtype=np.float32))
        record_image("image", pixel_values(processor, image_like(size + 37, size - 11, ctx.seed)))

        pick = rng.choice(len(prompts), size=min(5, len(prompts)), replace=False)
        for case, feeds in (("random", _random_tokens(rng, processor, 4)),
                            ("image", {k: v[pick] for k, v in tokens.items()})):
            out = text_graph(*(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask")))
            golden.add(case, "text", feeds, {"text_embeds": to_numpy(out)})

    tok_file = "owlvit/tokenizer.json"
    processor.tokenizer.backend_tokenizer.save(str(writer.path(tok_file)))
    entry.update({
        "graphs": {"image": {"file": "owlvit/image.onnx", **image_io},
                   "text": {"file": "owlvit/text.onnx", **text_io}},
        "golden_file": golden.save(writer, "owlvit/golden.npz"),
        "tolerance": {"rel_l2": 1e-5},
        "image_size": [size, size],
        "box_format": "cxcywh normalised to the (square) model input",
        "text_length": TEXT_LEN,
        "pad_token_id": int(processor.tokenizer.pad_token_id),
        "tokenizer_file": tok_file,
        "prompt_templates": list(ctx.prompt_templates),
        "prompts": prompts,
        "prompt_labels_file": writer.save_npy("owlvit/prompt_labels.npy",
                                              np.asarray(prompt_labels, np.int64)),
        "query_embeds_file": writer.save_npy("owlvit/query_embeds.npy", query_embeds),
        "preprocess": preprocess_facts(processor),
    })
    return entry


def _random_tokens(rng, processor, n: int) -> dict[str, np.ndarray]:
    """Fresh random token sequences of random lengths, framed like real prompts."""
    tok = processor.tokenizer
    ids = np.full((n, TEXT_LEN), tok.pad_token_id, np.int64)
    mask = np.zeros((n, TEXT_LEN), np.int64)
    for i in range(n):
        k = int(rng.integers(1, TEXT_LEN - 2))
        ids[i, 0] = tok.bos_token_id
        ids[i, 1:k + 1] = rng.integers(1, tok.bos_token_id, k)
        ids[i, k + 1] = tok.eos_token_id
        mask[i, :k + 2] = 1
    return {"input_ids": ids, "attention_mask": mask}
