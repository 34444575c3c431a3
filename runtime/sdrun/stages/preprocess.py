"""Model inputs from uint8 RGB images: numpy re-implementations of the PyTorch-side
preprocessing, exact to the grey level (see tests/test_preprocess.py for the measured
parity).

Every function takes the model's `preprocess` facts from the manifest
(`bundle.model(name)["preprocess"]`) and reads sizes, means, stds and resampling from
them; nothing model-specific is hard-coded here.

| model    | PyTorch reference                                | resize                     |
|----------|--------------------------------------------------|----------------------------|
| OWL-ViT  | transformers OwlViTImageProcessor (torchvision)  | uint8 tensor, antialiased  |
| G. DINO  | transformers GroundingDinoImageProcessor (tv.)   | uint8 tensor, antialiased  |
| Siamese  | timm eval transform (Resize + CenterCrop on PIL) | PIL Image.resize           |
| CLIP     | open_clip eval transform (same, on PIL)          | PIL Image.resize           |

`resize_uint8` implements the antialiased separable resize that Pillow (Resample.c) and
torch's uint8 CPU kernel (UpSampleKernel*.cpp, "PIL-SIMD") share: per output pixel a
window centred at (i + 0.5) * scale of half-width support * max(scale, 1), filter taps
normalised to sum 1 and made integers, one pass per axis, each pass's integer sums
rounded and clipped to uint8. The two libraries differ in how the taps become integers:

- Pillow: round(w * 2**22) (fixed 22 fraction bits);
- torch:  round(w * 2**p) with p the largest precision (<= 22) for which the largest tap
  still fits in int16; and its bicubic polynomial is written in another order.

`weights="pil"` or `weights="torch"` picks one; each is then reproduced bit for bit.
The order of the passes matters too (each pass rounds): torch and Pillow <= 12 always
go horizontal first; Pillow 13 goes vertical first when the height shrinks by more than
twice as many pixels as the width (see `pass_order`; `order="hv"` forces the old way).
(torch uses this uint8 kernel on CPUs with AVX2/AVX-512 or on ARM; elsewhere
torchvision resizes bilinear in float and results may differ by a grey level.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence, Union

import numpy as np

from ..errors import BundleError
from .images import as_rgb
from .pixels import pixel_floor

# one RGB image, a [B, H, W, 3] array, or a list of images
Images = Union[np.ndarray, Iterable[np.ndarray]]

MODES = ("bicubic", "bilinear")
WEIGHTS = ("pil", "torch")
PIL_PRECISION_BITS = 32 - 8 - 2  # Pillow's Resample.c
_BLOCK_ELEMENTS = 1 << 22  # elements of the int32 accumulator per step (16 MB)
_RESAMPLE_IDS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


# ---- the resize ------------------------------------------------------------------------

def _bicubic_pil(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    outer = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0))


def _bicubic_torch(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    inner = ((a + 2) * x - (a + 3)) * x * x + 1
    outer = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


_FILTERS = {  # mode -> (support, pil filter, torch filter)
    "bicubic": (2.0, _bicubic_pil, _bicubic_torch),
    "bilinear": (1.0, _triangle, _triangle),
}


@dataclass(frozen=True)
class _AxisPlan:
    """Integer taps of a 1-D resize: output i reads input xmin[i] .. xmin[i]+xsize[i]-1."""
    xmin: np.ndarray  # int64 [out]
    xsize: np.ndarray  # int64 [out]
    taps: np.ndarray  # float64 [out, k], integer values
    precision: int  # fraction bits of the taps


@lru_cache(maxsize=64)
def _axis_plan(in_size: int, out_size: int, mode: str, weights: str) -> _AxisPlan:
    support0, pil_filter, torch_filter = _FILTERS[mode]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    # C casts truncate toward zero, as astype(int64) does
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum((center + support + 0.5).astype(np.int64), in_size)
    xsize = np.clip(xmax - xmin, 0, ksize)
    j = np.arange(ksize)
    valid = j[None, :] < xsize[:, None]
    taps_at = (xmin[:, None] + j[None, :]).astype(np.float64)
    pos = (taps_at - center[:, None] + 0.5) * (1.0 / filterscale)
    w = np.where(valid, (pil_filter if weights == "pil" else torch_filter)(pos), 0.0)
    total = np.cumsum(w, axis=1)[:, -1:]  # left-to-right sum, as the C loops add
    w = np.divide(w, total, out=w.copy(), where=total != 0.0)
    if weights == "pil":
        precision = PIL_PRECISION_BITS
    else:
        wt_max = max(float(w.max()), 0.0)
        precision = 0
        while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
            precision += 1
    v = w * float(1 << precision)
    taps = np.trunc(np.where(v < 0, v - 0.5, v + 0.5))
    for arr in (xmin, xsize, taps):  # shared through the cache
        arr.flags.writeable = False
    return _AxisPlan(xmin, xsize, taps, precision)


def _pass(a: np.ndarray, plan: _AxisPlan, o0: int, o1: int, first: int) -> np.ndarray:
    """Resize along axis 0: uint8 a [inputs from `first`, K] -> uint8 [o1-o0, K], the
    outputs o0..o1: integer sums of taps times pixels, then (sum + 2**(p-1)) >> p clipped
    to 0..255, in int32 like both libraries' accumulators.

    A loop over the taps with row gathers: no BLAS (many small BLAS calls crawl where
    OpenBLAS threads contend for cores), and the work is taps x outputs, never dense."""
    k_cols = a.shape[1]
    out = np.empty((o1 - o0, k_cols), np.uint8)
    p = plan.precision
    half = (1 << (p - 1)) if p > 0 else 0
    xmin, xsize = plan.xmin[o0:o1] - first, plan.xsize[o0:o1]
    bound = 255 * float(np.abs(plan.taps).sum(axis=1).max()) + half
    acc_type = np.int32 if bound < 2**31 else np.int64  # int32 always, in practice
    taps = plan.taps[o0:o1].astype(acc_type)
    used = [j for j in range(taps.shape[1]) if (taps[:, j] != 0).any()]
    idx = {j: np.where(j < xsize, xmin + j, xmin) for j in used}  # unused taps are 0
    block = max(64, _BLOCK_ELEMENTS // max(o1 - o0, 1))
    for b0 in range(0, k_cols, block):
        x = a[:, b0:b0 + block]
        acc = np.full((o1 - o0, x.shape[1]), half, acc_type)
        for j in used:
            acc += x[idx[j]] * taps[:, j:j + 1]
        np.right_shift(acc, p, out=acc)
        out[:, b0:b0 + x.shape[1]] = np.clip(acc, 0, 255)
    return out


def _horizontal(a: np.ndarray, plan: _AxisPlan | None, o0: int, o1: int, first: int) -> np.ndarray:
    """(R, X, C) with columns from `first` -> (R, o1-o0, C): columns o0..o1 resized."""
    if plan is None:
        return a[:, o0 - first:o1 - first]
    r, x, c = a.shape
    cols = np.ascontiguousarray(a.transpose(1, 0, 2)).reshape(x, r * c)
    return _pass(cols, plan, o0, o1, first).reshape(o1 - o0, r, c).transpose(1, 0, 2)


def _vertical(a: np.ndarray, plan: _AxisPlan | None, o0: int, o1: int, first: int) -> np.ndarray:
    """(Y, X, C) with rows from `first` -> (o1-o0, X, C): rows o0..o1 resized."""
    if plan is None:
        return a[o0 - first:o1 - first]
    y, x, c = a.shape
    return _pass(np.ascontiguousarray(a).reshape(y, x * c), plan, o0, o1, first) \
        .reshape(o1 - o0, x, c)


def _span(plan: _AxisPlan | None, o0: int, o1: int) -> tuple[int, int]:
    """The inputs that outputs o0..o1 read."""
    if plan is None:
        return o0, o1
    return int(plan.xmin[o0:o1].min()), int((plan.xmin[o0:o1] + plan.xsize[o0:o1]).max())


def _check_mode(mode: str, weights: str, order: str | None = None) -> None:
    if mode not in _FILTERS:
        raise ValueError(f"resize mode {mode!r} is not supported; use one of {', '.join(MODES)}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights {weights!r}: use 'pil' or 'torch'")
    if order not in (None, "hv", "vh"):
        raise ValueError(f"order {order!r}: use None (the library's own), 'hv' or 'vh'")


def pass_order(in_hw: tuple[int, int], out_hw: tuple[int, int], weights: str) -> str:
    """Which pass comes first: "hv" (horizontal) or "vh".

    torch always resizes horizontally first, and so did Pillow up to 12. Pillow 13
    (python-pillow/Pillow#9549) resizes vertically first when both passes are needed and
    the height shrinks by more than twice as many pixels as the width does."""
    (h, w), (oh, ow) = in_hw, out_hw
    if weights == "pil" and h != oh and w != ow and h - oh > 0 and h - oh > 2 * (w - ow):
        return "vh"
    return "hv"


def _resize_window(img: np.ndarray, size_hw: tuple[int, int], window: tuple[int, int, int, int],
                   mode: str, weights: str, order: str | None = None) -> np.ndarray:
    """Rows r0:r1, columns c0:c1 of the (H, W, C) uint8 image resized to size_hw: only the
    input pixels those outputs read are touched."""
    h, w, _ = img.shape
    oh, ow = size_hw
    r0, r1, c0, c1 = window
    vplan = _axis_plan(h, oh, mode, weights) if oh != h else None
    hplan = _axis_plan(w, ow, mode, weights) if ow != w else None
    y0, y1 = _span(vplan, r0, r1)
    x0, x1 = _span(hplan, c0, c1)
    src = img[y0:y1, x0:x1]
    if (order or pass_order((h, w), (oh, ow), weights)) == "vh":
        out = _horizontal(_vertical(src, vplan, r0, r1, y0), hplan, c0, c1, x0)
    else:
        out = _vertical(_horizontal(src, hplan, c0, c1, x0), vplan, r0, r1, y0)
    return np.ascontiguousarray(out)


def resize_uint8(img: np.ndarray, size_hw: tuple[int, int], mode: str = "bicubic",
                 weights: str = "pil", order: str | None = None) -> np.ndarray:
    """Antialiased resize of a uint8 image to (out_h, out_w), exactly as Pillow's
    `Image.resize` (weights="pil") or torch's uint8 `interpolate(..., antialias=True)` /
    torchvision `resize` on a uint8 tensor (weights="torch").

    img: (H, W), (H, W, C) or (B, H, W, C) uint8; mode: "bicubic" or "bilinear";
    order: None for the library's own pass order (see `pass_order`; "pil" follows
    Pillow >= 13), or "hv" / "vh" to force one (order="hv" reproduces Pillow <= 12)."""
    _check_mode(mode, weights, order)
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"resize_uint8 takes a uint8 image, got {img.dtype}")
    oh, ow = (int(s) for s in size_hw)
    if oh < 1 or ow < 1:
        raise ValueError(f"output size must be at least 1x1, got {oh}x{ow}")
    if img.ndim == 4:
        return np.stack([resize_uint8(im, (oh, ow), mode, weights, order) for im in img])
    if img.ndim == 2:
        return resize_uint8(img[:, :, None], (oh, ow), mode, weights, order)[:, :, 0]
    if img.ndim != 3 or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"expected an image (H, W[, C]) with pixels, got shape {img.shape}")
    if img.shape[:2] == (oh, ow):
        return img.copy()
    return _resize_window(img, (oh, ow), (0, oh, 0, ow), mode, weights, order)


# ---- sizes and crops -------------------------------------------------------------------

def shortest_edge_size(h: int, w: int, size: int) -> tuple[int, int]:
    """torchvision's (and transformers') output size for "resize the shorter side to size"."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def _crop_offsets(h: int, w: int, ch: int, cw: int, rounding: str) -> tuple[int, int]:
    if rounding == "round":  # torchvision: int(round(...)), round half to even
        return int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return int((h - ch) / 2.0), int((w - cw) / 2.0)  # transformers: int(...)


def center_crop(img: np.ndarray, crop_hw: tuple[int, int], rounding: str = "round") -> np.ndarray:
    """Centre crop of an (H, W, C) image; zero padding (left/top get the smaller half)
    where the crop is larger, as torchvision's CenterCrop. rounding: "round"
    (torchvision) or "floor" (transformers' image processors) for odd margins."""
    ch, cw = crop_hw
    h, w = img.shape[:2]
    if ch > h or cw > w:
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        pad = [(ph // 2, (ph + 1) // 2), (pw // 2, (pw + 1) // 2)] + [(0, 0)] * (img.ndim - 2)
        img = np.pad(img, pad)
        h, w = img.shape[:2]
    top, left = _crop_offsets(h, w, ch, cw, rounding)
    return img[top:top + ch, left:left + cw]


def resize_center_crop(img: np.ndarray, resize_hw: tuple[int, int], crop_hw: tuple[int, int],
                       mode: str, weights: str = "pil", rounding: str = "round",
                       order: str | None = None) -> np.ndarray:
    """`center_crop(resize_uint8(img, resize_hw), crop_hw)` of an (H, W, C) uint8 image,
    computing only the pixels that are kept (a 1x300 crop resized to 224 x 67200 costs
    224 x 224)."""
    _check_mode(mode, weights, order)
    (rh, rw), (ch, cw) = resize_hw, crop_hw
    h, w = img.shape[:2]
    if ch > rh or cw > rw or (rh, rw) == (h, w):
        return center_crop(resize_uint8(img, (rh, rw), mode, weights, order), crop_hw, rounding)
    top, left = _crop_offsets(rh, rw, ch, cw, rounding)
    return _resize_window(img, (rh, rw), (top, top + ch, left, left + cw), mode, weights, order)


def crop_bounds(box: Sequence[float] | np.ndarray, height: int, width: int) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) of the crop of pixel box (x1, y1, x2, y2) as the notebook takes it,
    or None when that crop is empty.

    The notebook's rule: each edge to a whole pixel (`int()`; here floored with the 1e-3 px
    edge snap of `pixels.pixel_floor`), the top-left corner at least 0 and the bottom-right
    at most (W-1, H-1), then rows y0:y1 and columns x0:x1. A box thinner than a pixel, one
    outside the image, or one reaching only the last row or column gives an empty crop,
    which the notebook cannot embed: its CLIP similarity falls back to the IoU
    (`matching.clip_similarity`). A box with x2 < x1 or y2 < y1, or NaN/inf coordinates, is
    an error."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"box {list(box)} has NaN or infinite coordinates")
    if x2 < x1 or y2 < y1:
        raise ValueError(f"box {list(box)} is not (x1, y1, x2, y2) with x1 <= x2 and y1 <= y2")
    y0, y1_ = pixel_floor(y1, 0, height - 1), pixel_floor(y2, 0, height - 1)
    x0, x1_ = pixel_floor(x1, 0, width - 1), pixel_floor(x2, 0, width - 1)
    if y1_ <= y0 or x1_ <= x0:
        return None
    return y0, y1_, x0, x1_


def crop_box(image: np.ndarray, box: Sequence[float] | np.ndarray) -> np.ndarray | None:
    """The pixels of `image` under pixel box (x1, y1, x2, y2), or None for an empty crop;
    see `crop_bounds`."""
    bounds = crop_bounds(box, image.shape[0], image.shape[1])
    if bounds is None:
        return None
    y0, y1, x0, x1 = bounds
    return image[y0:y1, x0:x1]


def hflip(image: np.ndarray) -> np.ndarray:
    """The image mirrored left-right: (H, W) or (H, W, C); (B, H, W, C) flips each."""
    image = np.asarray(image)
    return np.ascontiguousarray(np.flip(image, axis=2 if image.ndim == 4 else 1))


def _triple(facts: dict, key: str, model: str) -> np.ndarray:
    v = facts.get(key)
    if isinstance(v, (int, float)):
        v = [v] * 3
    if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(
            isinstance(x, (int, float)) and math.isfinite(x) for x in v):
        raise BundleError(f"{model} preprocess: {key!r} must be 3 numbers, got {v!r}")
    arr = np.asarray(v, np.float32)
    if key.endswith("std") and (arr == 0).any():
        raise BundleError(f"{model} preprocess: {key!r} has a zero: {v!r}")
    return arr


def _to_chw_tensor_style(img: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """torchvision ToTensor + Normalize, in float32 like torch: (x / 255 - mean) / std."""
    x = img.astype(np.float32) / np.float32(255.0)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _to_chw_hf(img: np.ndarray, facts: dict, model: str) -> np.ndarray:
    """transformers' TorchvisionBackend.rescale_and_normalize (rescale fused into the
    mean/std when both are on), in float32."""
    x = img.astype(np.float32)
    do_rescale = bool(facts.get("do_rescale", True))
    do_normalize = bool(facts.get("do_normalize", True))
    factor = float(facts.get("rescale_factor", 1 / 255))
    if do_normalize:
        mean, std = _triple(facts, "image_mean", model), _triple(facts, "image_std", model)
        if do_rescale:
            inv = np.float32(1.0 / factor)
            mean, std = mean * inv, std * inv
        x = (x - mean) / std
    elif do_rescale:
        x = x * np.float32(factor)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


# ---- facts -----------------------------------------------------------------------------

def _pil_order(facts: dict) -> str | None:
    """The bundle's Pillow pass order: "hv" for Pillow <= 12, else Pillow 13's own rule."""
    return "hv" if facts.get("pil_pass_order") == "hv" else None


def _mode(value, model: str) -> str:
    name = _RESAMPLE_IDS.get(value, value) if isinstance(value, int) else value
    name = str(name).lower().rsplit(".", 1)[-1]
    if name not in _FILTERS:
        raise BundleError(f"{model} preprocess: resampling {value!r} is not supported by sdrun "
                          f"(it supports {', '.join(MODES)})")
    return name


def _positive_int(v, what: str, model: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise BundleError(f"{model} preprocess: {what} must be a positive integer, got {v!r}")
    return v


def _hw(v, what: str, model: str) -> tuple[int, int]:
    if isinstance(v, dict) and "height" in v and "width" in v:
        v = [v["height"], v["width"]]
    if isinstance(v, int):
        v = [v, v]
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise BundleError(f"{model} preprocess: {what} must be [height, width], got {v!r}")
    return _positive_int(v[0], what, model), _positive_int(v[1], what, model)


def _check_torchvision_backend(facts: dict, model: str) -> None:
    """The transformers processors' torchvision backend is what is reproduced; their PIL
    backend ("...ImageProcessorPil") rounds differently."""
    name, backend = str(facts.get("processor", "")), str(facts.get("backend", "torchvision"))
    if name.endswith("Pil") or backend not in ("torchvision", "unknown"):
        raise BundleError(f"{model} preprocess: the {name or backend} image processor (PIL "
                          "backend) is not supported by sdrun; export with the torchvision one")
    if facts.get("antialias", True) is not True or facts.get("resize_dtype", "uint8") != "uint8":
        raise BundleError(f"{model} preprocess: only the antialiased uint8 resize is supported "
                          f"(antialias={facts.get('antialias')!r}, "
                          f"resize_dtype={facts.get('resize_dtype')!r})")


def _images(images: Images) -> list[np.ndarray]:
    if isinstance(images, np.ndarray):
        return [as_rgb(im) for im in images] if images.ndim == 4 else [as_rgb(images)]
    images = list(images)
    if not images:
        raise ValueError("no images given")
    return [as_rgb(im) for im in images]


# ---- the models ------------------------------------------------------------------------

def owlvit_image(image: np.ndarray, facts: dict) -> np.ndarray:
    """One image as OWL-ViT pixel values [3, S, S] float32 (transformers' OwlViTImageProcessor,
    torchvision backend: uint8 antialiased resize, optional centre crop, fused rescale and
    normalise)."""
    model = "owlvit"
    _check_torchvision_backend(facts, model)
    img = as_rgb(image)
    if facts.get("do_resize", True):
        size = facts.get("size")
        mode = _mode(facts.get("resample", "bicubic"), model)
        if isinstance(size, dict) and set(size) >= {"height", "width"} and size.get("height"):
            target = _hw(size, "size", model)
        elif isinstance(size, dict) and size.get("shortest_edge") and not size.get("longest_edge"):
            target = shortest_edge_size(img.shape[0], img.shape[1],
                                        _positive_int(size["shortest_edge"], "size", model))
        else:
            raise BundleError(f"{model} preprocess: size {size!r} is not supported by sdrun "
                              "(expected {height, width} or {shortest_edge})")
        img = resize_uint8(img, target, mode, weights="torch")
    if facts.get("do_center_crop", False):
        img = center_crop(img, _hw(facts.get("crop_size"), "crop_size", model), rounding="floor")
    return _to_chw_hf(img, facts, model)


def owlvit_pixels(images: Images, facts: dict) -> np.ndarray:
    """OWL-ViT pixel values [B, 3, S, S] float32 for a list of RGB images (or one image,
    or a [B, H, W, 3] array)."""
    return np.stack([owlvit_image(im, facts) for im in _images(images)])


def gdino_pixels(images: Images, facts: dict, size_hw: tuple[int, int] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Grounding DINO inputs for a list of RGB images: (pixel_values [B, 3, H, W] float32,
    pixel_mask [B, H, W] int64 all ones).

    Every image is resized (ignoring its aspect ratio) to the bundle's fixed canvas
    `facts["resize"]` (or `size_hw`), bilinear antialiased on uint8 as transformers'
    GroundingDinoImageProcessor(size={"height": H, "width": W}) does, then rescaled and
    normalised."""
    model = "gdino"
    _check_torchvision_backend(facts, model)
    h, w = _hw(size_hw if size_hw is not None else facts.get("resize"), "resize", model)
    if facts.get("keep_aspect", False):
        raise BundleError(f"{model} preprocess: keep_aspect resizing is not supported by sdrun")
    mode = _mode(facts.get("resample", "bilinear"), model)
    pixels = np.stack([_to_chw_hf(resize_uint8(im, (h, w), mode, weights="torch"), facts, model)
                       for im in _images(images)])
    return pixels, np.ones((pixels.shape[0], h, w), np.int64)


def siamese_image(image: np.ndarray, facts: dict) -> np.ndarray:
    """One image as the Siamese ViT sees it, [3, H, W] float32: timm's eval transform
    (Resize of the shorter side to floor(size / crop_pct) on a PIL image, CenterCrop,
    ToTensor, Normalize)."""
    model = "siamese"
    img = as_rgb(image)
    size = facts.get("input_size")
    if not isinstance(size, (list, tuple)) or len(size) != 3:
        raise BundleError(f"{model} preprocess: input_size must be [3, H, W], got {size!r}")
    crop = _hw(list(size[1:]), "input_size", model)
    crop_pct = facts.get("crop_pct") or 0.875  # timm's DEFAULT_CROP_PCT
    scale = (math.floor(crop[0] / crop_pct), math.floor(crop[1] / crop_pct))
    mode = _mode(facts.get("interpolation", "bilinear"), model)
    crop_mode = facts.get("crop_mode") or "center"
    if crop_mode == "squash":
        resized = scale
    elif crop_mode == "center" and scale[0] == scale[1]:
        resized = shortest_edge_size(img.shape[0], img.shape[1], scale[0])
    else:
        raise BundleError(f"{model} preprocess: crop_mode {crop_mode!r} with input size {crop} "
                          "is not supported by sdrun (center with a square size, or squash)")
    img = resize_center_crop(img, resized, crop, mode, weights="pil", order=_pil_order(facts))
    return _to_chw_tensor_style(img, _triple(facts, "mean", model), _triple(facts, "std", model))


def siamese_pixels(img_a: Images, img_b: Images, facts: dict) -> np.ndarray:
    """Siamese pairs [N, 2, 3, H, W] float32. `img_a`, `img_b`: one RGB image each
    (N = 1) or equally long lists of images (or [N, H, W, 3] arrays)."""
    a, b = _images(img_a), _images(img_b)
    if len(a) != len(b):
        raise ValueError(f"siamese_pixels: {len(a)} first images but {len(b)} second images")
    return np.stack([np.stack([siamese_image(x, facts), siamese_image(y, facts)])
                     for x, y in zip(a, b)])


def clip_image(image: np.ndarray, facts: dict) -> np.ndarray:
    """One image (or crop) as CLIP sees it, [3, S, S] float32: open_clip's eval transform
    (Resize, CenterCrop on a PIL image, ToTensor, Normalize)."""
    model = "clip"
    img = as_rgb(image)
    steps = facts.get("transform", [])
    if "ResizeKeepRatio" in steps or "CenterCropOrPad" in steps:
        raise BundleError(f"{model} preprocess: transform {steps} is not supported by sdrun "
                          "(Resize [+ CenterCrop] only)")
    mode = _mode(facts.get("interpolation", "bicubic"), model)
    resize = facts.get("resize")
    if isinstance(resize, (list, tuple)) and len(resize) == 1:
        resize = resize[0]
    if isinstance(resize, int):
        resized = shortest_edge_size(img.shape[0], img.shape[1],
                                     _positive_int(resize, "resize", model))
    else:
        resized = _hw(resize, "resize", model)
    if "crop_size" in facts:
        crop = _hw(facts["crop_size"], "crop_size", model)
        img = resize_center_crop(img, resized, crop, mode, weights="pil", order=_pil_order(facts))
    else:
        img = resize_uint8(img, resized, mode, weights="pil", order=_pil_order(facts))
    return _to_chw_tensor_style(img, _triple(facts, "image_mean", model),
                                _triple(facts, "image_std", model))


def clip_crops(image: np.ndarray, boxes_xyxy: np.ndarray | Sequence,
               facts: dict) -> tuple[np.ndarray, np.ndarray]:
    """(CLIP inputs [K', 3, S, S] float32, embeddable [K] bool) for the pixel boxes
    (x1, y1, x2, y2) of one image: one input per box whose `crop_box` is not empty, in
    order. K' = 0 gives an empty [0, 3, S, S] array."""
    img = as_rgb(image)
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    crops = [crop_box(img, b) for b in boxes]
    ok = np.array([c is not None for c in crops], bool)
    if not ok.any():
        h, w = _hw(facts.get("image_size") or facts.get("crop_size"), "image_size", "clip")
        return np.zeros((0, 3, h, w), np.float32), ok
    return np.stack([clip_image(c, facts) for c in crops if c is not None]), ok
