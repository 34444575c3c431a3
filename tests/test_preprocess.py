"""sdrun.stages.preprocess against the real PyTorch-side preprocessing (parity tests).

The references are built the way the exporters build them (same constructors, facts
written by the exporters' own `preprocess_facts` and passed through JSON like a
manifest). Each comparison prints its max-abs difference (in normalised units and in
grey levels) and the share of differing elements: run with `pytest -s` to see them.
Tolerance: one grey level, (1/255)/min(std) + 1e-6, on under 1% of the elements; in
practice every case here is bit-exact.
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
from conftest import BLOCK_TORCH, REAL_PAIRS

from sdrun.errors import BundleError
from sdrun.stages import preprocess as pp
from sdrun.stages.images import load_image

REAL = ("31795_1.png", "35333_2.png")
RANDOM_SIZES = [(37, 53), (53, 37), (1000, 700), (700, 1000), (224, 224), (128, 128),
                (300, 301), (7, 5), (99, 257)]
MAX_SHARE = 0.01


def _jsonish(d: dict) -> dict:
    return json.loads(json.dumps(d))


def _images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {f"rand{h}x{w}": rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in RANDOM_SIZES}
    for name in REAL:
        path = REAL_PAIRS / name
        if path.is_file():
            out[name.removesuffix(".png")] = load_image(path)
    return out


IMAGES = _images()


def _compare(label: str, ours: np.ndarray, ref: np.ndarray, std) -> tuple[float, float]:
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, f"{label}: shape {ours.shape} vs reference {ref.shape}"
    assert ours.dtype == np.float32
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    share = float(np.count_nonzero(diff) / diff.size) if diff.size else 0.0
    levels = max_abs * min(std) * 255
    print(f"  {label:48s} max-abs {max_abs:.3g} ({levels:.3f} grey levels)  "
          f"differing {share:.2e}")
    assert max_abs <= (1 / 255) / min(std) + 1e-6, f"{label}: max-abs {max_abs}"
    assert share < MAX_SHARE, f"{label}: {share:.2%} of the elements differ"
    return max_abs, share


@pytest.fixture(scope="module")
def torch_refs():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("timm")
    pytest.importorskip("open_clip")
    import torchvision.transforms.v2.functional as tvF
    from PIL import Image
    return types.SimpleNamespace(torch=torch, Image=Image, tvF=tvF)


# ---- the resize itself -------------------------------------------------------------------

RESIZE_CASES = [((37, 53), (224, 224)), ((1000, 700), (224, 224)), ((224, 224), (248, 248)),
                ((300, 400), (248, 330)), ((7, 5), (128, 128)), ((480, 640), (768, 768)),
                ((100, 100), (99, 101)), ((100, 100), (101, 99)), ((513, 257), (128, 128)),
                ((1, 1), (5, 7)), ((2, 300), (224, 33600)), ((640, 480), (800, 800)),
                ((37, 53), (37, 80)), ((37, 53), (80, 53)), ((1000, 700), (248, 354))]


def _pil_order():
    import PIL

    return None if int(PIL.__version__.split(".")[0]) >= 13 else "hv"


def _native_uint8_torch(torch, mode: str) -> bool:
    """torchvision resizes uint8 natively (the int16-weight kernel) on these CPUs."""
    if mode == "bicubic":
        return True
    return (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
            or platform.machine() in ("aarch64", "arm64"))


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_resize_uint8_matches_pillow(torch_refs, mode):
    Image = torch_refs.Image
    rng = np.random.default_rng(1)
    filt = Image.Resampling.BICUBIC if mode == "bicubic" else Image.Resampling.BILINEAR
    print(f"\nresize_uint8(weights='pil', {mode}) vs PIL.Image.resize:")
    total = mismatched = 0
    for (h, w), (oh, ow) in RESIZE_CASES:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = np.asarray(Image.fromarray(img).resize((ow, oh), filt))
        ours = pp.resize_uint8(img, (oh, ow), mode, weights="pil", order=_pil_order())
        n = int(np.count_nonzero(ours != ref))
        print(f"  {h}x{w} -> {oh}x{ow}: {n} of {ref.size} values differ "
              f"(max {int(np.abs(ours.astype(int) - ref).max())} levels)")
        total += ref.size
        mismatched += n
    print(f"  all: {mismatched} of {total} differ")
    assert mismatched == 0


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_resize_uint8_matches_torchvision(torch_refs, mode):
    torch, tvF = torch_refs.torch, torch_refs.tvF
    from torchvision.transforms import InterpolationMode

    rng = np.random.default_rng(2)
    print(f"\nresize_uint8(weights='torch', {mode}) vs torchvision resize(uint8, antialias=True):")
    total = mismatched = worst = 0
    for (h, w), (oh, ow) in RESIZE_CASES:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        chw = torch.from_numpy(img).permute(2, 0, 1).contiguous()
        ref = tvF.resize(chw, [oh, ow], interpolation=InterpolationMode(mode),
                         antialias=True).permute(1, 2, 0).numpy()
        ours = pp.resize_uint8(img, (oh, ow), mode, weights="torch")
        n = int(np.count_nonzero(ours != ref))
        d = int(np.abs(ours.astype(int) - ref).max())
        print(f"  {h}x{w} -> {oh}x{ow}: {n} of {ref.size} values differ (max {d} levels)")
        total, mismatched, worst = total + ref.size, mismatched + n, max(worst, d)
    print(f"  all: {mismatched} of {total} differ")
    if _native_uint8_torch(torch, mode):
        assert mismatched == 0
    else:  # torchvision resizes in float here: at most one level, rarely
        assert worst <= 1 and mismatched / total < MAX_SHARE


def test_resize_uint8_random_sizes(torch_refs):
    """Many random size pairs, both libraries, both filters: bit for bit."""
    torch, tvF, Image = torch_refs.torch, torch_refs.tvF, torch_refs.Image
    from torchvision.transforms import InterpolationMode

    rng = np.random.default_rng(3)
    bad, n = [], 0
    for _ in range(80):
        h, w, oh, ow = (int(v) for v in rng.integers(1, 160, 4))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for mode, filt in (("bicubic", Image.Resampling.BICUBIC),
                           ("bilinear", Image.Resampling.BILINEAR)):
            ref = np.asarray(Image.fromarray(img).resize((ow, oh), filt))
            if not np.array_equal(ref, pp.resize_uint8(img, (oh, ow), mode, "pil", _pil_order())):
                bad.append(("pil", mode, h, w, oh, ow))
            if _native_uint8_torch(torch, mode):
                t = tvF.resize(torch.from_numpy(img).permute(2, 0, 1).contiguous(), [oh, ow],
                               interpolation=InterpolationMode(mode), antialias=True)
                if not np.array_equal(t.permute(1, 2, 0).numpy(),
                                      pp.resize_uint8(img, (oh, ow), mode, "torch")):
                    bad.append(("torch", mode, h, w, oh, ow))
            n += 1
    print(f"\nrandom sizes: {len(bad)} of {2 * n} resizes differ: {bad[:5]}")
    assert not bad


def test_resize_uint8_shapes_and_errors():
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert pp.resize_uint8(img, (20, 30)) is not img
    assert np.array_equal(pp.resize_uint8(img, (20, 30)), img)
    grey = pp.resize_uint8(img[:, :, 0], (10, 15))
    assert grey.shape == (10, 15) and np.array_equal(grey, pp.resize_uint8(img, (10, 15))[:, :, 0])
    batch = pp.resize_uint8(np.stack([img, img[::-1]]), (7, 9), "bilinear")
    assert batch.shape == (2, 7, 9, 3)
    assert np.array_equal(batch[1], pp.resize_uint8(img[::-1], (7, 9), "bilinear"))
    with pytest.raises(ValueError, match="uint8"):
        pp.resize_uint8(img.astype(np.float32), (5, 5))
    with pytest.raises(ValueError, match="mode"):
        pp.resize_uint8(img, (5, 5), "lanczos")
    with pytest.raises(ValueError, match="at least 1x1"):
        pp.resize_uint8(img, (0, 5))
    # a centre-cropped window equals cropping the full resize
    full = pp.resize_uint8(img, (41, 77))
    assert np.array_equal(pp.resize_center_crop(img, (41, 77), (30, 30), "bicubic"),
                          pp.center_crop(full, (30, 30)))


def test_pass_order_rule():
    assert pp.pass_order((100, 100), (99, 101), "pil") == "vh"
    assert pp.pass_order((100, 100), (101, 99), "pil") == "hv"
    assert pp.pass_order((277, 75), (47, 10), "pil") == "vh"  # 230 > 2 * 65
    assert pp.pass_order((231, 234), (136, 164), "pil") == "hv"  # 95 <= 2 * 70
    assert pp.pass_order((100, 100), (99, 101), "torch") == "hv"


# ---- the models --------------------------------------------------------------------------

@pytest.mark.parametrize("size", [128, 768])
def test_owlvit_pixels_match_transformers(torch_refs, size):
    from transformers import OwlViTImageProcessor

    from sdexport.models import owlvit

    # as the presets build it (768 is also google/owlvit-base-patch32's setting)
    ip = OwlViTImageProcessor(size={"height": size, "width": size},
                              crop_size={"height": size, "width": size})
    facts = _jsonish(owlvit.preprocess_facts(types.SimpleNamespace(image_processor=ip)))
    print(f"\nOWL-ViT {size}x{size} vs transformers OwlViTImageProcessor:")
    names = list(IMAGES)
    ours = pp.owlvit_pixels([IMAGES[k] for k in names], facts)
    assert ours.shape == (len(names), 3, size, size)
    ref = ip(images=[IMAGES[k] for k in names], return_tensors="np")["pixel_values"]
    for i, k in enumerate(names):
        _compare(f"owlvit{size} {k}", ours[i], ref[i], facts["image_std"])


@pytest.mark.parametrize("size", [(256, 256), (800, 800), (480, 640)])
def test_gdino_pixels_match_transformers(torch_refs, size):
    from transformers import GroundingDinoImageProcessor

    from sdexport.models import gdino

    # the hub's / preset's image processor settings; the exporter's own call
    ip = GroundingDinoImageProcessor(
        size={"shortest_edge": 800, "longest_edge": 1333}, resample=2, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225], do_pad=True)
    processor = types.SimpleNamespace(image_processor=ip)
    facts = _jsonish(gdino.preprocess_facts(processor, size))
    print(f"\nGrounding DINO {size} vs transformers GroundingDinoImageProcessor:")
    names = list(IMAGES)
    pixels, mask = pp.gdino_pixels([IMAGES[k] for k in names], facts)
    assert pixels.shape == (len(names), 3, *size) and mask.shape == (len(names), *size)
    assert mask.dtype == np.int64 and (mask == 1).all()
    for i, k in enumerate(names):
        ref = gdino.preprocess(processor, IMAGES[k], size)[0]
        _compare(f"gdino{size[0]}x{size[1]} {k}", pixels[i], ref, facts["image_std"])
    out = ip(images=IMAGES[names[0]], size={"height": size[0], "width": size[1]},
             return_tensors="np")
    assert np.array_equal(out["pixel_mask"], mask[:1])


def _timm_cfg():
    import timm

    from sdexport.models import siamese

    backbone = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0,
                                 **siamese.TINY_ARGS)
    return timm.data.resolve_data_config({}, model=backbone)


def test_siamese_pixels_match_the_notebooks_heat_transform(torch_refs):
    """New bundles: T.Resize((224, 224)) + T.ToTensor(), on square and non-square images."""
    from sdexport.models import siamese

    Image = torch_refs.Image
    facts = _jsonish(siamese.heat_facts((224, 224)))
    transform = siamese.heat_transform((224, 224))
    for k, img in IMAGES.items():
        ref = transform(Image.fromarray(img)).numpy()
        got = pp.siamese_image(img, facts)
        _compare(f"siamese (notebook) {k}", got, ref, facts["std"])
        assert got.min() >= 0.0 and got.max() <= 1.0


def test_siamese_pixels_match_timm(torch_refs):
    """Bundles built before the notebook's transform: timm's eval transform, kept as built."""
    from sdexport.models import siamese

    Image = torch_refs.Image
    cfg = _timm_cfg()
    facts = _jsonish(siamese.preprocess_facts(cfg))
    transform = siamese.timm_transform(cfg)
    print(f"\nSiamese vs timm eval transform {facts}:")
    for k, img in IMAGES.items():
        ref = transform(Image.fromarray(img)).numpy()
        _compare(f"siamese {k}", pp.siamese_image(img, facts), ref, facts["std"])
    a = IMAGES.get("31795_1", IMAGES["rand224x224"])
    b = IMAGES["rand1000x700"]
    one = pp.siamese_pixels(a, b, facts)
    assert one.shape == (1, 2, 3, 224, 224) and one.dtype == np.float32
    ref = np.stack([transform(Image.fromarray(x)).numpy() for x in (a, b)])[None]
    _compare("siamese pair", one, ref, facts["std"])
    many = pp.siamese_pixels([a, b, a], [b, a, a], facts)
    assert many.shape == (3, 2, 3, 224, 224)
    assert np.array_equal(many[0], one[0]) and np.array_equal(many[1, 0], one[0, 1])
    with pytest.raises(ValueError, match="2 first images but 1"):
        pp.siamese_pixels([a, b], [a], facts)


def _clip_transform_and_facts():
    import open_clip

    from sdexport.models import clip

    transform = open_clip.image_transform(224, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                                          std=open_clip.OPENAI_DATASET_STD)
    model = types.SimpleNamespace(visual=types.SimpleNamespace(image_size=224))
    return transform, _jsonish(clip.preprocess_facts(model, transform))


def test_clip_images_match_open_clip(torch_refs):
    Image = torch_refs.Image
    transform, facts = _clip_transform_and_facts()
    print(f"\nCLIP vs open_clip eval transform {facts}:")
    for k, img in IMAGES.items():
        ref = transform(Image.fromarray(img)).numpy()
        _compare(f"clip {k}", pp.clip_image(img, facts), ref, facts["image_std"])


def test_clip_crops_match_open_clip(torch_refs):
    Image = torch_refs.Image
    transform, facts = _clip_transform_and_facts()
    boxes = np.array([
        [10.2, 20.7, 150.9, 130.1],  # fractional
        [0, 0, 224, 224],  # whole image
        [50, 60, 50.4, 60.3],  # < 1 px: no crop (the notebook's similarity is then the IoU)
        [100, 5, 101, 205],  # 1 px wide, tall (extreme aspect)
        [3, 100, 220, 101.5],  # wide, 1 px tall
        [-30, -10, 40, 30],  # partly outside
        [200, 200, 400, 500],  # partly outside
        [300, 300, 320, 330],  # wholly outside: no crop
        [7.5, 3.25, 40.75, 90.5],
    ])
    print("\nCLIP crops vs open_clip on the same crops:")
    for k in [n for n in IMAGES if not n.startswith("rand")] + ["rand1000x700"]:
        img = IMAGES[k]
        ours, ok = pp.clip_crops(img, boxes, facts)
        assert ok.shape == (len(boxes),) and ours.shape == (ok.sum(), 3, 224, 224)
        crops = [pp.crop_box(img, box) for box in boxes]
        assert [c is not None for c in crops] == ok.tolist()
        for i, crop in enumerate(c for c in crops if c is not None):
            ref = transform(Image.fromarray(np.ascontiguousarray(crop))).numpy()
            _compare(f"clip crop {k} {crop.shape[1]}x{crop.shape[0]}@{i}", ours[i], ref,
                     facts["image_std"])
    for none in (np.zeros((0, 4)), []):
        crops, ok = pp.clip_crops(IMAGES["rand128x128"], none, facts)
        assert crops.shape == (0, 3, 224, 224) and ok.shape == (0,)


def test_tiny_bundle_facts_match_its_source_processors(torch_refs, tiny_bundle):
    """The manifest's facts, read back, against processors loaded from the bundle's
    source/<model> folders (what a PyTorch reference pipeline would load)."""
    import open_clip
    from transformers import AutoProcessor

    from sdexport.models import gdino, siamese
    from sdrun.bundle.bundle import Bundle

    Image = torch_refs.Image
    bundle = Bundle.load(tiny_bundle)
    imgs = {k: IMAGES[k] for k in ("rand37x53", "rand1000x700") if k in IMAGES}
    imgs.update({k: v for k, v in IMAGES.items() if not k.startswith("rand")})
    src = tiny_bundle / "source"
    print("\ntiny bundle manifest facts vs its source processors:")

    owl = AutoProcessor.from_pretrained(src / "owlvit").image_processor
    facts = bundle.model("owlvit")["preprocess"]
    for k, img in imgs.items():
        _compare(f"bundle owlvit {k}", pp.owlvit_pixels([img], facts)[0],
                 owl(images=img, return_tensors="np")["pixel_values"][0], facts["image_std"])

    if bundle.has("gdino"):
        facts = bundle.model("gdino")["preprocess"]
        proc = AutoProcessor.from_pretrained(src / "gdino") if (src / "gdino").is_dir() else None
        if proc is not None:
            size = tuple(bundle.model("gdino")["image_size"])
            for k, img in imgs.items():
                _compare(f"bundle gdino {k}", pp.gdino_pixels([img], facts)[0][0],
                         gdino.preprocess(proc, img, size)[0], facts["image_std"])

    facts = bundle.model("siamese")["preprocess"]
    assert facts["crop_mode"] == "squash" and facts["std"] == [1.0, 1.0, 1.0]  # the notebook's
    transform = siamese.heat_transform(tuple(facts["input_size"][1:]))
    for k, img in imgs.items():
        _compare(f"bundle siamese {k}", pp.siamese_image(img, facts),
                 transform(Image.fromarray(img)).numpy(), facts["std"])

    facts = bundle.model("clip")["preprocess"]
    _, _, transform = open_clip.create_model_and_transforms(f"local-dir:{src / 'clip'}")
    for k, img in imgs.items():
        _compare(f"bundle clip {k}", pp.clip_image(img, facts),
                 transform(Image.fromarray(img)).numpy(), facts["image_std"])


# ---- crops, flips, facts (no torch needed) ------------------------------------------------

@pytest.mark.parametrize("box, bounds", [
    ((10.2, 20.7, 150.9, 130.1), (20, 130, 10, 150)),
    ((0, 0, 224, 224), (0, 223, 0, 223)),  # the notebook clamps x2, y2 to W-1, H-1
    ((50, 60, 50.4, 60.3), None),  # under a pixel: the notebook cannot embed it
    ((50.2, 60, 50.9, 80), None),
    ((-30, -10, 40, 30), (0, 30, 0, 40)),
    ((200, 200, 400, 500), (200, 223, 200, 223)),
    ((300, 300, 320, 330), None),  # outside
    ((-5, -5, -1, -1), None),
    ((10, 10, 10, 10), None),
    ((10, 10, 223.9995, 20), (10, 20, 10, 223)),  # within the 1e-3 px snap of 224: still W-1
])
def test_crop_bounds_rule(box, bounds):
    assert pp.crop_bounds(box, 224, 224) == bounds
    img = np.zeros((224, 224, 3), np.uint8)
    if bounds is None:
        assert pp.crop_box(img, box) is None
        return
    y0, y1, x0, x1 = bounds
    assert pp.crop_box(img, box).shape == (y1 - y0, x1 - x0, 3)
    # the notebook's crop_to_tensor bounds, written out
    nx1, ny1, nx2, ny2 = (int(v + 1e-3) if v > 0 else int(v) for v in box)
    assert (max(0, ny1), min(223, ny2), max(0, nx1), min(223, nx2)) == bounds


@pytest.mark.parametrize("box", [(5, 5, 4, 10), (5, 5, 10, 4), (np.nan, 0, 1, 1),
                                 (0, 0, np.inf, 1)])
def test_crop_bounds_refuses(box):
    with pytest.raises(ValueError, match="box"):
        pp.crop_bounds(box, 10, 10)


def test_hflip():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    flipped = pp.hflip(img)
    assert flipped.flags.c_contiguous and np.array_equal(flipped, img[:, ::-1])
    assert np.array_equal(pp.hflip(np.stack([img, img]))[1], img[:, ::-1])
    assert np.array_equal(pp.hflip(img[:, :, 0]), img[:, ::-1, 0])


def test_center_crop_rounding_and_padding():
    img = np.arange(5 * 6, dtype=np.uint8).reshape(5, 6, 1)
    # margins 3 rows / 1 column: torchvision rounds half to even, transformers floors
    assert pp.center_crop(img, (2, 5), "round")[0, 0, 0] == img[2, 0, 0]  # round(1.5) = 2
    assert pp.center_crop(img, (2, 5), "floor")[0, 0, 0] == img[1, 0, 0]
    assert pp.center_crop(img, (4, 5), "round")[0, 0, 0] == img[0, 0, 0]  # round(0.5) = 0
    padded = pp.center_crop(img, (7, 6))
    assert padded.shape == (7, 6, 1) and (padded[0] == 0).all() and (padded[-1] == 0).all()


def test_shortest_edge_size():
    assert pp.shortest_edge_size(1000, 700, 248) == (354, 248)
    assert pp.shortest_edge_size(700, 1000, 248) == (248, 354)
    assert pp.shortest_edge_size(1, 300, 224) == (224, 67200)


def test_bad_facts_are_bundle_errors():
    img = np.zeros((10, 10, 3), np.uint8)
    clip = {"resize": 224, "interpolation": "lanczos", "crop_size": [224, 224],
            "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    with pytest.raises(BundleError, match="clip preprocess: resampling 'lanczos'"):
        pp.clip_image(img, clip)
    with pytest.raises(BundleError, match="image_std"):
        pp.clip_image(img, {**clip, "interpolation": "bicubic", "image_std": [0.5, 0.0, 0.5]})
    with pytest.raises(BundleError, match="siamese preprocess: crop_mode 'border'"):
        pp.siamese_image(img, {"input_size": [3, 224, 224], "interpolation": "bicubic",
                               "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.9,
                               "crop_mode": "border"})
    with pytest.raises(BundleError, match="gdino preprocess: resize"):
        pp.gdino_pixels([img], {"resize": "big", "image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    gd = {"resize": [8, 8], "resample": "bilinear", "image_mean": [0.5] * 3,
          "image_std": [0.5] * 3}
    with pytest.raises(BundleError, match="gdino preprocess: only the antialiased"):
        pp.gdino_pixels([img], {**gd, "antialias": False})
    with pytest.raises(BundleError, match="PIL backend"):
        pp.gdino_pixels([img], {**gd, "backend": "pil"})
    with pytest.raises(BundleError, match="PIL backend"):
        pp.owlvit_pixels([img], {"processor": "OwlViTImageProcessorPil"})
    with pytest.raises(BundleError, match="owlvit preprocess: size"):
        pp.owlvit_pixels([img], {"size": {"longest_edge": 5}, "resample": "BICUBIC",
                                 "image_mean": [0.5] * 3, "image_std": [0.5] * 3})


def test_grey_and_float_inputs_are_accepted():
    facts = {"resize": [32, 48], "resample": "bilinear", "do_rescale": True,
             "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3,
             "image_std": [0.25] * 3}
    rng = np.random.default_rng(5)
    grey = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    a, _ = pp.gdino_pixels([grey], facts)
    b, _ = pp.gdino_pixels([np.repeat(grey[:, :, None], 3, 2)], facts)
    c, _ = pp.gdino_pixels(grey[None, :, :, None].repeat(3, 3) / 255.0, facts)
    assert np.array_equal(a, b) and np.array_equal(a, c)


def test_runtime_modules_import_without_torch_or_pillow():
    code = BLOCK_TORCH.replace('"sdexport"}', '"sdexport", "PIL"}') + textwrap.dedent("""
        import numpy as np
        from sdrun.stages import preprocess, images
        facts = {"resize": 16, "interpolation": "bicubic", "crop_size": [16, 16],
                 "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
        out, ok = preprocess.clip_crops(np.zeros((20, 30, 3), np.uint8), [[0, 0, 10, 10]], facts)
        assert out.shape == (1, 3, 16, 16) and ok.tolist() == [True]
        for name in ("torch", "transformers", "timm", "open_clip", "PIL"):
            assert name not in sys.modules, name
        print("ok")
    """)
    assert '"PIL"' in code
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_tiny_bundle_golden_image_inputs(torch_refs, tiny_bundle):
    """The golden "image" inputs that the exporters recorded from PyTorch, rebuilt from
    the same synthetic images with sdrun.stages.preprocess (recipes as in sdexport.models.*)."""
    from sdexport.context import image_like
    from sdrun.bundle.bundle import Bundle

    bundle = Bundle.load(tiny_bundle)
    seed = bundle.manifest["build"]["seed"]
    print("\ntiny bundle golden 'image' inputs rebuilt by sdrun.stages.preprocess:")

    def golden(model, key):
        return bundle.arrays(bundle.model(model)["golden_file"])[key]

    facts = bundle.model("owlvit")["preprocess"]
    size = bundle.model("owlvit")["image_size"][0]
    _compare("golden owlvit", pp.owlvit_pixels([image_like(size + 37, size - 11, seed)], facts),
             golden("owlvit", "image__image__in__pixel_values"), facts["image_std"])

    facts = bundle.model("siamese")["preprocess"]
    h, w = bundle.model("siamese")["image_size"]
    a = image_like(h + 31, w + 7, seed + 3)
    b = a.copy()
    b[h // 4: h // 2, w // 3: w // 2] = 255 - b[h // 4: h // 2, w // 3: w // 2]
    _compare("golden siamese", pp.siamese_pixels(a, b, facts),
             golden("siamese", "image__pair__in__pairs"), facts["std"])

    facts = bundle.model("clip")["preprocess"]
    h, w = bundle.model("clip")["image_size"]
    _compare("golden clip", pp.clip_image(image_like(h + 20, w - 30, seed + 4), facts)[None],
             golden("clip", "image__visual__in__crops"), facts["image_std"])

    if bundle.has("gdino"):
        facts = bundle.model("gdino")["preprocess"]
        h, w = bundle.model("gdino")["image_size"]
        pixels, mask = pp.gdino_pixels([image_like(h, w, seed + 2)], facts)
        _compare("golden gdino", pixels, golden("gdino", "image__model__in__pixel_values"),
                 facts["image_std"])
        assert np.array_equal(mask, golden("gdino", "image__model__in__pixel_mask"))
