"""The notebook's change model, end to end: a state dict saved from a class built as the
notebook builds `SiameseViTChange` (a timm ViT with its classifier, mean-pooled tokens,
Linear -> ReLU -> Linear) loads with `--siamese-ckpt`, and the bundle reproduces that
class's `forward` logit and its `patch_change_heatmap` map and score."""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

from sdexport.models.siamese import TINY_ARGS  # noqa: E402
from sdrun.apps.check import check_bundle, compare  # noqa: E402

TOL = 1e-5


class NotebookSiameseViTChange(nn.Module):
    """As the notebook writes it, with random weights (pretrained=False: no hub here)."""

    def __init__(self):
        super().__init__()
        self.backbone = timm.create_model("vit_base_patch16_224", pretrained=False, **TINY_ARGS)
        self.embed_dim = self.backbone.num_features
        self.head = nn.Sequential(nn.Linear(self.embed_dim * 2, 256), nn.ReLU(), nn.Linear(256, 1))

    def forward_feats(self, x):
        return self.backbone.forward_features(x)

    def forward(self, x1, x2):
        g1 = self.forward_feats(x1).mean(dim=1)
        g2 = self.forward_feats(x2).mean(dim=1)
        return self.head(torch.cat([g1, g2], dim=1))


def notebook_transform():
    import torchvision.transforms as T

    return T.Compose([T.Resize((224, 224)), T.ToTensor()])


def notebook_heatmap(model, img1: Image.Image, img2: Image.Image, dsize_as_written: bool = True):
    """The notebook's patch_change_heatmap, step by step. `dsize_as_written`: its cv2 dsize
    `img1.size[::-1]`, i.e. (h, w), where cv2 wants (w, h); False gives (w, h)."""
    import cv2

    t = notebook_transform()
    with torch.no_grad():
        f1 = model.forward_feats(t(img1).unsqueeze(0))
        f2 = model.forward_feats(t(img2).unsqueeze(0))
    diff = (f1[:, 1:, :] - f2[:, 1:, :]).pow(2).sum(dim=-1).sqrt()
    side = int(math.sqrt(diff.shape[1]))
    hm = diff[0].reshape(side, side).numpy()
    hm = (hm - hm.min()) / (hm.max() - hm.min() + 1e-6)
    dsize = img1.size[::-1] if dsize_as_written else img1.size
    hm_up = cv2.resize(hm, dsize, interpolation=cv2.INTER_CUBIC)
    k = max(1, hm_up.size // 20)
    return hm_up, float(np.mean(np.sort(hm_up.reshape(-1))[-k:]))


@pytest.fixture(scope="module")
def notebook_bundle(tmp_path_factory):
    from safetensors.torch import save_file

    from sdexport.build import build_bundle, resolve_sources
    from sdrun.bundle.vocab import default_vocabulary

    torch.manual_seed(11)
    model = NotebookSiameseViTChange().eval()
    tmp = tmp_path_factory.mktemp("notebook")
    ckpt = tmp / "chg_model.safetensors"
    sd = model.state_dict()
    assert any(k.startswith("backbone.head.") for k in sd)  # the classifier the notebook keeps
    save_file({k: v.contiguous() for k, v in sd.items()}, str(ckpt))
    out = build_bundle(tmp / "bundle", resolve_sources("tiny-random", {"gdino": "none"}),
                       default_vocabulary(), siamese_ckpt=str(ckpt), log=lambda s: None)
    return model, out, ckpt


def test_checkpoint_loads_and_graph_passes_its_check(notebook_bundle):
    from sdrun.bundle.bundle import Bundle

    _, out, ckpt = notebook_bundle
    b = Bundle.load(out)
    assert b.model("siamese")["source"]["head"] == str(ckpt)
    checks = list(check_bundle(b, models=["siamese"]))
    assert checks and all(c.ok and c.rel_l2 <= TOL for c in checks), checks


@pytest.mark.parametrize("size", [(224, 224), (240, 320)])
def test_bundle_gives_the_notebooks_heatmap_and_logit(notebook_bundle, size):
    from sdrun.pipeline import Pipeline
    from sdrun.stages import heatmap

    model, out, _ = notebook_bundle
    rng = np.random.default_rng(3)
    h, w = size
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    b = a.copy()
    b[h // 4: h // 2, w // 3: w // 2] = 255 - b[h // 4: h // 2, w // 3: w // 2]
    pipe = Pipeline.load(out)
    patch, logit = pipe.change_maps([(a, b)])
    ours = heatmap.upsample_heat(patch[0], h, w)
    ref, ref_score = notebook_heatmap(model, Image.fromarray(a), Image.fromarray(b))
    t = notebook_transform()
    with torch.no_grad():
        ref_logit = model(t(Image.fromarray(a))[None], t(Image.fromarray(b))[None]).numpy().ravel()
    # for an h x w image the notebook's cv2 dsize (h, w) makes a w x h map (the one departure);
    # with the sizes the right way round, its map is ours
    fixed, fixed_score = notebook_heatmap(model, Image.fromarray(a), Image.fromarray(b),
                                          dsize_as_written=False)
    assert ref.shape == ((h, w) if h == w else (w, h)) and ours.shape == (h, w)
    logit_err, heat_err = compare(logit, ref_logit)[1], compare(ours, fixed)[1]
    print(f"\n{h}x{w}: logit rel-L2 {logit_err:.2e}, heat map rel-L2 {heat_err:.2e}")
    assert logit_err <= TOL and heat_err <= TOL
    assert heatmap.change_score(ours) == pytest.approx(fixed_score, rel=TOL)
    if h == w:
        assert ref_score == fixed_score


def test_a_checkpoint_of_another_shape_is_named(notebook_bundle, tmp_path):
    from safetensors.torch import load_file, save_file

    from sdexport.context import BuildContext
    from sdexport.models import siamese
    from sdexport.sources import Source, SourceError
    from sdrun.bundle.vocab import default_vocabulary

    _, _, ckpt = notebook_bundle
    sd = load_file(str(ckpt))
    sd = {k: v for k, v in sd.items() if not k.startswith("backbone.head.")}  # num_classes=0 style
    sd["extra.weight"] = sd["head.2.weight"].clone()
    bad = tmp_path / "other.safetensors"
    save_file(sd, str(bad))
    ctx = BuildContext(vocabulary=default_vocabulary(), prompt_templates=["{l}"])
    with pytest.raises(SourceError, match=r"other\.safetensors: not a state dict of the notebook's "
                                          r"SiameseViTChange .*missing: backbone\.head\.weight, "
                                          r"backbone\.head\.bias; 1 unexpected: extra\.weight"):
        siamese.load_torch(Source("siamese", "preset", "tiny-random"), ctx, bad)


def test_images_of_different_sizes_get_a_heat_map_each(notebook_bundle):
    """Departure 6 (docs/departures.md): the notebook upsamples one map, to image 1's size,
    and fuses image 2's boxes with it too; spotdiff gives each image a map of its own size."""
    from sdrun.pipeline import Pipeline

    _, out, _ = notebook_bundle
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (200, 260, 3), dtype=np.uint8)
    r = Pipeline.load(out).diff(a, b)
    assert [h.shape for h in r.heatmaps] == [(224, 224), (200, 260)]
