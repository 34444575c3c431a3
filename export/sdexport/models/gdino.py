"""Grounding DINO: the whole model (image + the prompt -> logits, boxes) as one graph.

The prompt is fixed at build time, the notebook's `'. '.join(labels)` ("l1. l2. ... ln",
no final period); its token ids are stored with a
token -> label map made from the labels' character spans, so the runtime never decodes
phrases. The graph is then specialised to the prompt and the all-ones pixel mask
(`sdrun.bundle.specialise`): BERT and everything else computed from them alone (text masks,
position ids, sine position embeddings, valid ratios, reference points) become constants,
and `gdino/text.onnx` recomputes them for other ids. The image size is fixed per bundle (FACTS.md: dynamic
height/width export but give wrong answers); the batch axis is dynamic.
"""
from __future__ import annotations

import contextlib
import re
import string
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sdrun.bundle.prompts import (
    check_labels,
    label_spans,
    make_prompt,
    token_label_map,
    too_long,
)
from sdrun.bundle.specialise import specialise

from ..context import (
    BuildContext,
    export_onnx,
    image_like,
    jsonable,
    seed_torch,
    to_numpy,
)
from ..sources import Source, SourceError
from ..writer import BundleWriter, GoldenRecorder

GRAPH_FILE = "gdino/model.onnx"
TEXT_GRAPH_FILE = "gdino/text.onnx"
TOKENIZER_FILE = "gdino/tokenizer.json"
GOLDEN_FILE = "gdino/golden.npz"
INPUT_NAMES = ["pixel_values", "pixel_mask", "input_ids", "attention_mask", "token_type_ids"]
OUTPUT_NAMES = ["logits", "pred_boxes"]
TEXT_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]

# Ids the model hard-codes ([CLS], [SEP], ".", "?") plus BERT's usual specials.
FIXED_TOKENS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103,
                ".": 1012, "?": 1029}
BERT_BASE_VOCAB_SIZE = 30522
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


# ---- loading ---------------------------------------------------------------------------

def load_torch(source: Source, ctx: BuildContext):
    """(GroundingDinoForObjectDetection in eval mode, GroundingDinoProcessor)."""
    if source.kind == "hub":
        model, processor = _load_hub(source)
    elif source.kind == "local":
        model, processor = _load_local(source)
    elif source.kind == "preset":
        model, processor = _build_preset(source, ctx)
    else:
        raise SourceError(f"Grounding DINO: cannot load a model from a {source.kind!r} source")
    check_tokenizer(source, processor.tokenizer, model.config)
    return model.eval(), processor


def check_tokenizer(source: Source, tokenizer, config):
    """A folder without tokenizer.json loads BERT's 5-token default vocabulary silently."""
    wanted = [FIXED_TOKENS[t] for t in ("[CLS]", "[SEP]", ".")]
    ids = tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", "."])
    size = config.text_config.vocab_size
    if ids != wanted or len(tokenizer) > size:
        raise source.local_error(
            f"the tokenizer does not fit the model: [CLS], [SEP], '.' have ids {ids} (the model "
            f"expects {wanted}) and it has {len(tokenizer)} tokens for a text model of {size} "
            "(is tokenizer.json missing?)")


def _load_hub(source: Source):
    from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

    try:
        model = GroundingDinoForObjectDetection.from_pretrained(source.id)
        processor = GroundingDinoProcessor.from_pretrained(source.id)
    except Exception as e:  # offline, unknown id, wrong architecture, ...: all one message
        raise source.hub_error(e) from None
    return model, processor


def _load_local(source: Source):
    from transformers import (
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
    )

    folder = Path(source.id)
    if not (folder / "config.json").is_file():
        raise source.local_error(f"no config.json in {folder} (expected a save_pretrained folder)")
    try:
        config = GroundingDinoConfig.from_pretrained(folder)
    except Exception as e:
        raise source.local_error(
            f"{folder / 'config.json'} cannot be read ({_reason(e)})") from None
    weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise source.local_error(f"no weights file in {folder} (expected model.safetensors)")
    try:
        model, info = GroundingDinoForObjectDetection.from_pretrained(
            folder, config=config, output_loading_info=True)
    except Exception as e:
        raise source.local_error(f"{weights} cannot be loaded ({_reason(e)})") from None
    # A weights file of another model loads "fine" with random gaps; refuse it.
    bad = list(info.get("missing_keys", [])) + [str(k) for k in info.get("mismatched_keys", [])]
    if bad:
        raise source.local_error(
            f"{weights} does not fit config.json: {len(bad)} weights missing or of the wrong "
            f"shape (e.g. {', '.join(sorted(bad)[:3])})")
    try:
        processor = GroundingDinoProcessor.from_pretrained(folder)
    except Exception as e:
        raise source.local_error(
            f"the processor files in {folder} (processor_config.json or "
            f"preprocessor_config.json, tokenizer.json) cannot be loaded ({_reason(e)})") from None
    return model, processor


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


# ---- random presets --------------------------------------------------------------------

def _build_preset(source: Source, ctx: BuildContext):
    from transformers import GroundingDinoForObjectDetection

    if source.id == "tiny-random":
        vocab = wordpiece_vocab(ctx.vocabulary, min_size=max(FIXED_TOKENS.values()) + 1)
        config = tiny_config(len(vocab))
    elif source.id == "full-random":
        vocab = wordpiece_vocab(ctx.vocabulary, min_size=BERT_BASE_VOCAB_SIZE)
        config = base_config()
    else:
        raise SourceError(f"Grounding DINO: unknown preset {source.id!r}")
    if len(vocab) != config.text_config.vocab_size:
        raise SourceError(f"Grounding DINO {source.id}: {len(vocab)} tokens do not fit the text "
                          f"model's vocab_size {config.text_config.vocab_size}")
    seed_torch(ctx.seed * 7 + 2)
    model = GroundingDinoForObjectDetection(config)
    share_query_embedding(model)
    desaturate_text_logits(model)
    return model, preset_processor(vocab)


def share_query_embedding(model):
    """Start every decoder query from one random vector (a random model's only slot-specific
    input): a slot's outputs then depend on its proposal alone. Encoder scores of the 900
    proposals lie a few float32 ulps apart, so onnxruntime and PyTorch can rank two of them
    differently; with a shared query that permutes two slots, which the check's slot matching
    undoes, instead of giving both slots other values."""
    with torch.no_grad():
        weight = model.model.query_position_embeddings.weight
        weight.copy_(weight[:1].expand_as(weight))


def desaturate_text_logits(model, target_std: float = 2.0):
    """A box's logit for a token is the plain dot product of the decoder's LayerNorm'd state
    and the encoder's LayerNorm'd text state: with random weights its spread is ~sqrt(d_model)
    and nearly every score saturates at 1.0, so fused scores pile up a float32 ulp from the
    thresholds and runtime/reference comparisons flip on noise. Scale the decoder's final
    LayerNorm so the logits spread with std ~ target_std instead."""
    norm = model.model.decoder.layer_norm
    with torch.no_grad():
        norm.weight.mul_(target_std / norm.weight.numel() ** 0.5)
        norm.bias.zero_()


def tiny_config(vocab_size: int):
    """A few-MB Grounding DINO: tiny Swin, 1-layer BERT, 1 encoder and 1 decoder layer."""
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    backbone = SwinConfig(embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8],
                          window_size=7, image_size=224, out_indices=[2, 3, 4],
                          out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=512)
    # With one decoder layer there is nothing to share the box head with (and HF's tying
    # regex fails on a single layer).
    return GroundingDinoConfig(
        backbone_config=backbone, text_config=text, d_model=32, num_queries=30,
        encoder_layers=1, decoder_layers=1, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, decoder_bbox_embed_share=False)


def base_config():
    """The architecture of IDEA-Research/grounding-dino-base (Swin-B 384, BERT-base)."""
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    backbone = SwinConfig(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32],
                          window_size=12, image_size=384, out_indices=[2, 3, 4],
                          out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=BERT_BASE_VOCAB_SIZE)  # bert-base-uncased
    return GroundingDinoConfig(
        backbone_config=backbone, text_config=text, d_model=256, num_queries=900,
        encoder_layers=6, decoder_layers=6, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
        encoder_attention_heads=8, decoder_attention_heads=8, num_feature_levels=4,
        encoder_n_points=4, decoder_n_points=4, two_stage=True, max_text_len=256,
        embedding_init_target=True, decoder_bbox_embed_share=True,
        two_stage_bbox_embed_share=False, positional_embedding_temperature=20,
        activation_function="relu", dropout=0.1, fusion_droppath=0.1)


def wordpiece_vocab(labels: list[str], min_size: int) -> dict[str, int]:
    """A WordPiece vocabulary with BERT's special ids where the model expects them, every
    label word, and single characters (plain and `##`) so any word tokenises without [UNK]."""
    words = [w for label in labels for w in re.findall(r"\w+", label.lower())]
    chars = list(string.ascii_lowercase + string.digits)
    pieces = words + chars + ["##" + c for c in chars] + list(",;:!'\"-()/&")
    extra = [t for t in dict.fromkeys(pieces) if t not in FIXED_TOKENS]
    taken = set(FIXED_TOKENS.values())
    size = max(min_size, len(FIXED_TOKENS) + len(extra))
    free = (i for i in range(size) if i not in taken)
    vocab = dict(FIXED_TOKENS)
    for token, i in zip(extra, free):
        vocab[token] = i
    for n, i in enumerate(free):
        vocab[f"[unused{n}]"] = i
    return vocab


def preset_processor(vocab: dict[str, int]):
    """The hub's processor settings with a home-made tokenizer.

    `BertTokenizerFast(vocab_file=...)` is silently ignored in transformers 5.x: pass the dict."""
    from transformers import (
        BertTokenizerFast,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
    )

    image_processor = GroundingDinoImageProcessor(
        size={"shortest_edge": 800, "longest_edge": 1333}, resample=2, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225], do_pad=True)
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=512)
    return GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)


# ---- prompt ----------------------------------------------------------------------------

def tokenize_prompt(tokenizer, labels: list[str], max_text_len: int) -> dict[str, np.ndarray]:
    """The prompt's ids and token -> label map with the HF tokenizer (the runtime's
    `sdrun.bundle.prompts.gdino_tokens` does the same from tokenizer.json)."""
    check_labels(labels)
    prompt = make_prompt(labels)
    enc = tokenizer(prompt, return_offsets_mapping=True)
    n = len(enc["input_ids"])
    if n > max_text_len:
        raise too_long(max_text_len, labels, n,
                       lambda k: len(tokenizer(make_prompt(labels[:k]))["input_ids"]))
    out = {k: np.asarray(enc[k], dtype=np.int64)[None] for k in TEXT_INPUTS}
    out["token_labels"] = token_label_map(enc["offset_mapping"], label_spans(labels))
    return out


# ---- export patches --------------------------------------------------------------------

def phrase_masks(input_ids: torch.Tensor, special_tokens: torch.Tensor):
    """HF's `generate_masks_with_special_tokens_and_transfer_map` without isin/cummax/cummin
    (the legacy exporter has no symbolic for them): the previous/next delimiter of every
    position is a masked max/min over a (T, T) position grid. Shapes stay symbolic."""
    special = (input_ids.unsqueeze(-1) == special_tokens).any(-1)  # (B, T)
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)
    seq_len = pos[-1:] + 1
    row, col = pos.view(-1, 1), pos.view(1, -1)  # row: position i, col: candidate j
    cand = special.unsqueeze(1)  # (B, 1, T): j is a delimiter
    no_prev, no_next = torch.full_like(pos, -1), seq_len.expand_as(pos)
    prev_special = torch.where(cand & (col < row), col, no_prev.view(1, 1, -1)).amax(-1)
    next_special = torch.where(cand & (col >= row), col, no_next.view(1, 1, -1)).amin(-1)

    valid_block = (next_special != 0) & (next_special != seq_len - 1) & (next_special != seq_len)
    same_block = next_special.unsqueeze(2) == next_special.unsqueeze(1)
    attention_mask = (row == col).unsqueeze(0) | (same_block & valid_block.unsqueeze(1))

    position_ids = pos.unsqueeze(0) - prev_special - 1
    position_ids = torch.where(valid_block, position_ids, torch.zeros_like(position_ids))
    return attention_mask, torch.clamp(position_ids, min=0).to(torch.long)


@contextlib.contextmanager
def patched_phrase_masks():
    from transformers.models.grounding_dino import modeling_grounding_dino as mod

    original = mod.generate_masks_with_special_tokens_and_transfer_map
    mod.generate_masks_with_special_tokens_and_transfer_map = phrase_masks
    try:
        yield
    finally:
        mod.generate_masks_with_special_tokens_and_transfer_map = original


def level_weighted_sampling(self, value, value_spatial_shapes, value_spatial_shapes_list,
                            level_start_index, sampling_locations, attention_weights,
                            im2col_step):
    """HF's `MultiScaleDeformableAttention.forward`, laid out for onnxruntime on CPU.

    HF samples each level as (batch*heads, hidden, queries, points), stacks the four levels
    on a new second-to-last axis and sums the weighted samples over the last one: onnxruntime
    then copies (8, 32, 13294, 4, 4) floats four at a time and reduces runs of 16 (75 ms +
    12 ms per encoder layer on 2 cores). Here the grid is laid out points-first, so GridSample
    returns (batch*heads, hidden, points, queries), and each level's weighted samples are
    summed over the points axis (whole rows of queries at a time) and added up. Same
    products, summed in another order (float32 rounding only)."""
    batch_size, _, num_heads, hidden_dim = value.shape
    _, num_queries, num_heads, num_levels, num_points, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in value_spatial_shapes_list], dim=1)
    # (batch, queries, heads, levels, points, 2) -> (batch*heads, levels, points, queries, 2)
    sampling_grids = (2 * sampling_locations - 1).permute(0, 2, 3, 4, 1, 5).flatten(0, 1)
    # (batch, queries, heads, levels, points) -> (batch*heads, 1, levels, points, queries)
    weights = attention_weights.permute(0, 2, 3, 4, 1).flatten(0, 1).unsqueeze(1)
    output = None
    for level, (height, width) in enumerate(value_spatial_shapes_list):
        value_l = (value_list[level].flatten(2).transpose(1, 2)
                   .reshape(batch_size * num_heads, hidden_dim, height, width))
        sampled = nn.functional.grid_sample(value_l, sampling_grids[:, level], mode="bilinear",
                                            padding_mode="zeros", align_corners=False)
        term = (sampled * weights[:, :, level]).sum(2)  # (batch*heads, hidden, queries)
        output = term if output is None else output + term
    output = output.view(batch_size, num_heads * hidden_dim, num_queries)
    return output.transpose(1, 2).contiguous()


@contextlib.contextmanager
def patched_deformable_sampling():
    from transformers.models.grounding_dino import modeling_grounding_dino as mod

    original = mod.MultiScaleDeformableAttention.forward
    mod.MultiScaleDeformableAttention.forward = level_weighted_sampling
    try:
        yield
    finally:
        mod.MultiScaleDeformableAttention.forward = original


def _linspace_float32(g, start, end, steps, dtype, layout, device, pin_memory):
    """The built-in symbolic computes in float64 (Python-float constants) and ignores dtype;
    onnxruntime has no float64 GridSample. Same math, cast to the requested float type."""
    from torch.onnx._internal.torchscript_exporter import _type_utils, symbolic_helper
    from torch.onnx._internal.torchscript_exporter import symbolic_opset9 as opset9

    out = opset9.linspace(g, start, end, steps, dtype, layout, device, pin_memory)
    scalar = symbolic_helper._maybe_get_const(dtype, "i")
    jit_type = (_type_utils.JitScalarType(scalar) if isinstance(scalar, int)
                else _type_utils.JitScalarType.FLOAT)
    return g.op("Cast", out, to_i=jit_type.onnx_type())


@contextlib.contextmanager
def float32_linspace(opset: int):
    torch.onnx.register_custom_op_symbolic("aten::linspace", _linspace_float32, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::linspace", opset)


@contextlib.contextmanager
def export_patches(opset: int):
    """Everything the legacy exporter needs, and the faster deformable sampling; the
    originals come back afterwards."""
    with patched_phrase_masks(), patched_deformable_sampling(), float32_linspace(opset):
        yield


class Detector(nn.Module):
    """The HF model as (logits, pred_boxes) of positional inputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, pixel_mask, input_ids, attention_mask, token_type_ids):
        out = self.model(pixel_values=pixel_values, input_ids=input_ids,
                         token_type_ids=token_type_ids, attention_mask=attention_mask,
                         pixel_mask=pixel_mask, return_dict=True)
        return out.logits, out.pred_boxes


def run_torch(model: nn.Module, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PyTorch outputs for numpy inputs named like the graph's."""
    args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in INPUT_NAMES]
    with torch.no_grad():
        outs = Detector(model).eval()(*args)
    return {n: to_numpy(o) for n, o in zip(OUTPUT_NAMES, outs)}


def export_graph(model: nn.Module, example: dict[str, np.ndarray], path: Path, opset: int) -> dict:
    args = tuple(torch.from_numpy(example[n]) for n in INPUT_NAMES)
    dynamic_axes = {n: {0: "batch"} for n in INPUT_NAMES + OUTPUT_NAMES}
    for n in TEXT_INPUTS:
        dynamic_axes[n][1] = "tokens"
    with export_patches(opset):
        io = export_onnx(Detector(model), args, path, INPUT_NAMES, OUTPUT_NAMES,
                         dynamic_axes, opset)
    config = model.config
    fixed = {"logits": ["batch", config.num_queries, config.max_text_len],
             "pred_boxes": ["batch", config.num_queries, 4]}
    return set_output_shapes(path, io, fixed)


def set_output_shapes(path: Path, io: dict, shapes: dict[str, list]) -> dict:
    """The exporter cannot infer the query and text-slot sizes after top-k and names them
    like "Gatherlogits_dim_1"; write the real sizes into the graph and its description."""
    import onnx

    graph = onnx.load(str(path))
    for value in graph.graph.output:
        for dim, size in zip(value.type.tensor_type.shape.dim, shapes[value.name]):
            if isinstance(size, int):
                dim.Clear()
                dim.dim_value = size
    onnx.save(graph, str(path))
    onnx.checker.check_model(str(path))
    for out in io["outputs"]:
        out["shape"] = list(shapes[out["name"]])
    return io


# ---- inputs ----------------------------------------------------------------------------

# Folded into the graph at build time: the prompt, and the pixel mask, which is all ones
# (a fixed canvas, never padded; FACTS.md: a padded mask gives wrong answers).
FOLDED_INPUTS = TEXT_INPUTS + ["pixel_mask"]


def fixed_inputs(text: dict[str, np.ndarray], size: tuple[int, int]) -> dict[str, np.ndarray]:
    """The batch-1 values of FOLDED_INPUTS for a prompt and a canvas (height, width)."""
    return {**{k: text[k] for k in TEXT_INPUTS}, "pixel_mask": np.ones((1, *size), np.int64)}


def graph_inputs(pixel_values: np.ndarray, text: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds for a batch of preprocessed images and the prompt's ids (repeated per image)."""
    batch, _, height, width = pixel_values.shape
    feeds = {"pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32),
             "pixel_mask": np.ones((batch, height, width), dtype=np.int64)}
    for n in TEXT_INPUTS:
        feeds[n] = np.repeat(text[n], batch, axis=0)
    return feeds


def preprocess(processor, image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The PyTorch image processor, resizing to exactly `size` (height, width)."""
    height, width = size
    out = processor.image_processor(images=image, size={"height": height, "width": width},
                                    return_tensors="pt")
    return to_numpy(out["pixel_values"]).astype(np.float32)


def preprocess_facts(processor, size: tuple[int, int]) -> dict:
    from transformers.image_utils import PILImageResampling

    ip = processor.image_processor
    resample = ip.resample if hasattr(ip.resample, "name") else PILImageResampling(ip.resample)
    return jsonable({
        "resize": list(size), "keep_aspect": False, "resample": resample.name.lower(),
        "antialias": True, "resize_dtype": "uint8", "backend": getattr(ip, "backend", "unknown"),
        "do_rescale": ip.do_rescale, "rescale_factor": ip.rescale_factor,
        "do_normalize": ip.do_normalize, "image_mean": ip.image_mean, "image_std": ip.image_std,
        "do_pad": ip.do_pad, "pixel_mask": "all ones", "channels": "RGB", "layout": "NCHW"})


# ---- the bundle entry ------------------------------------------------------------------

def export_model(source: Source, writer: BundleWriter, ctx: BuildContext) -> dict:
    height, width = ctx.gdino_size
    with ctx.timed("gdino: load"):
        model, processor = load_torch(source, ctx)
    if source.is_random:  # so that a PyTorch reference can load exactly this model
        folder = writer.source_dir("gdino")
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    config = model.config
    labels = list(ctx.vocabulary)
    text = tokenize_prompt(processor.tokenizer, labels, config.max_text_len)
    unknown = int((text["input_ids"] == processor.tokenizer.unk_token_id).sum())
    if unknown:
        ctx.log(f"  gdino: warning: {unknown} prompt token(s) are [UNK]")
    text_files = {f"{k}_file": writer.save_npy(f"gdino/{k}.npy", text[k])
                  for k in TEXT_INPUTS + ["token_labels"]}
    # With the text graph, enough to put another vocabulary in without transformers/torch.
    text_files["tokenizer_file"] = TOKENIZER_FILE
    processor.tokenizer.backend_tokenizer.save(str(writer.path(TOKENIZER_FILE)))

    rng = ctx.generator(2)
    cases = {
        "random": graph_inputs(rng.standard_normal((2, 3, height, width), dtype=np.float32), text),
        "image": graph_inputs(preprocess(processor, image_like(height, width, ctx.seed + 2),
                                         (height, width)), text),
    }
    golden = GoldenRecorder()
    with ctx.timed("gdino: golden (PyTorch)"):
        for case, feeds in cases.items():
            golden.add(case, "model", feeds, run_torch(model, feeds))
    generic = writer.root / "gdino" / "generic.onnx"  # not kept: specialised below
    with ctx.timed("gdino: export"):
        io = export_graph(model, cases["random"], generic, ctx.opset)
    with ctx.timed("gdino: fold the prompt"):
        folded = specialise(generic, writer.path(GRAPH_FILE), writer.path(TEXT_GRAPH_FILE),
                            fixed_inputs(text, (height, width)))
        generic.unlink()
    io["inputs"] = [i for i in io["inputs"] if i["name"] not in FOLDED_INPUTS]
    ctx.log(f"  gdino: prompt and pixel mask folded in: {folded['nodes_removed']} nodes "
            f"({folded['weights_bytes_removed'] / 1e6:.0f} MB of weights) moved to "
            f"{TEXT_GRAPH_FILE}, {folded['where_removed']} masked_fill Where ops dropped")

    return {
        "source": source.describe(),
        "graphs": {"model": {"file": GRAPH_FILE, **io, "slot_outputs": OUTPUT_NAMES,
                             "slot_axis": 1}},
        "prompt_folding": {
            "text_graph": TEXT_GRAPH_FILE, "inputs": FOLDED_INPUTS,
            "boundary": folded["boundary"], "where_removed": folded["where_removed"],
            "how": ("the graph is specialised to this prompt and the all-ones pixel mask: "
                    "every tensor computed from them alone is an initializer "
                    "(sdrun.bundle.specialise); the text graph maps another prompt's ids (and "
                    "the same mask) to new values of those tensors (respecialise)")},
        "golden_file": golden.save(writer, GOLDEN_FILE),
        "tolerance": {"rel_l2": 1e-5},
        "image_size": [height, width],
        "prompt": make_prompt(labels),
        **text_files,
        "max_text_len": config.max_text_len,
        "num_queries": config.num_queries,
        "text_slots": ("logits[..., t] scores prompt token t (input_ids[:, t]); slots from the "
                       "prompt's length T up to max_text_len are -inf. token_labels[t] is the "
                       "label index of token t, -1 for [CLS], [SEP] and '.'. The prompt is "
                       "folded into the graph (prompt_folding); its text graph takes any "
                       "T <= max_text_len"),
        "preprocess": preprocess_facts(processor, (height, width)),
        "box_format": "cxcywh normalised",
    }
