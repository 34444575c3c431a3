"""The export side: model sources, clear errors, local folders, OWL-ViT decoding parity."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import TRAIN_CSV  # noqa: E402

from sdexport.build import build_bundle, resolve_sources  # noqa: E402
from sdexport.context import BuildContext  # noqa: E402
from sdexport.sources import Source, SourceError, parse_source  # noqa: E402
from sdrun.backends.session import OnnxModel  # noqa: E402
from sdrun.bundle.bundle import Bundle  # noqa: E402
from sdrun.bundle.vocab import default_vocabulary, make_prompts  # noqa: E402


def _ctx():
    return BuildContext(vocabulary=["person", "car"], prompt_templates=["{l}"], log=lambda s: None)


def test_parse_source(tmp_path):
    assert parse_source("owlvit", None, None) == Source("owlvit", "hub", "google/owlvit-base-patch32")
    assert parse_source("clip", None, "tiny-random").kind == "preset"
    assert parse_source("gdino", "none", "tiny-random").kind == "none"
    assert parse_source("siamese", str(tmp_path), None).kind == "local"
    with pytest.raises(SourceError, match="only Grounding DINO can be left out"):
        parse_source("owlvit", "none", None)
    with pytest.raises(SourceError, match="folder not found"):
        parse_source("owlvit", "./no/such/folder", None)


def test_offline_hub_ids_name_the_model():
    """With no network, each hub id fails with one message naming the model and the fix."""
    code = textwrap.dedent("""
        from sdexport.context import BuildContext
        from sdexport.sources import Source, SourceError
        from sdexport.models import exporter
        ctx = BuildContext(vocabulary=["person"], prompt_templates=["{l}"])
        for model, hub_id in [("owlvit", "google/owlvit-base-patch32"),
                              ("siamese", "vit_base_patch16_224"),
                              ("clip", "ViT-B-32:laion2b_s34b_b79k")]:
            try:
                exporter(model).load_torch(Source(model, "hub", hub_id), ctx)
                print("LOADED", model)
            except SourceError as e:
                print("ERR", e)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line.startswith(("ERR", "LOADED"))]
    assert len(lines) == 3 and all(line.startswith("ERR") for line in lines), res.stdout
    for line, (title, hub_id) in zip(lines, [("OWL-ViT", "google/owlvit-base-patch32"),
                                             ("Siamese ViT", "vit_base_patch16_224"),
                                             ("CLIP visual", "ViT-B-32:laion2b_s34b_b79k")]):
        assert title in line and hub_id in line
        assert "local folder" in line or "folder" in line
        assert "--preset tiny-random" in line


def test_corrupt_checkpoints_are_named(tiny_bundle, tmp_path):
    import shutil

    from sdexport.models import clip, owlvit, siamese

    for model in ("owlvit", "clip", "siamese"):
        shutil.copytree(tiny_bundle / "source" / model, tmp_path / model)
    (tmp_path / "owlvit" / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(SourceError, match=r"OWL-ViT from .*owlvit"):
        owlvit.load_torch(Source("owlvit", "local", str(tmp_path / "owlvit")), _ctx())
    (tmp_path / "clip" / "open_clip_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(SourceError, match=r"open_clip_model\.safetensors is not a readable"):
        clip.load_torch(Source("clip", "local", str(tmp_path / "clip")), _ctx())
    bad = tmp_path / "bad_ckpt.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SourceError, match=r"--siamese-ckpt .*bad_ckpt\.pt: cannot be read"):
        siamese.load_torch(Source("siamese", "local", str(tmp_path / "siamese")), _ctx(), bad)
    wrong = tmp_path / "wrong.safetensors"
    from safetensors.torch import save_file

    save_file({"head.0.weight": torch.zeros(4, 4)}, str(wrong))
    with pytest.raises(SourceError, match=r"wrong\.safetensors: not a state dict of the notebook's "
                                          r"SiameseViTChange .*missing: backbone\.cls_token.*unexpected"
                                          r"|wrong\.safetensors: .*with another shape: head\.0\.weight"):
        siamese.load_torch(Source("siamese", "local", str(tmp_path / "siamese")), _ctx(), wrong)


def test_torch_load_checkpoint(tiny_bundle, tmp_path):
    """A seed-style `torch.save(model.state_dict())` file loads with weights_only=True."""
    from safetensors.torch import load_file

    from sdexport.models import siamese

    folder = tiny_bundle / "source" / "siamese"
    sd = load_file(str(folder / siamese.CKPT_FILE))
    pt = tmp_path / "siamese.pt"
    torch.save(sd, pt)
    model, _, head_from = siamese.load_torch(Source("siamese", "local", str(folder)), _ctx(), pt)
    assert head_from == str(pt)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0)


def test_local_folders_give_the_preset_outputs(tiny_bundle, tmp_path):
    """A bundle built from the tiny models' local folders reproduces the preset's graphs."""
    src = tiny_bundle / "source"
    sources = resolve_sources(None, {m: str(src / m) for m in ("owlvit", "gdino", "siamese", "clip")})
    assert all(s.kind == "local" for s in sources.values())
    out = build_bundle(tmp_path / "local", sources, default_vocabulary(), gdino_size=(256, 256),
                       log=lambda s: None)
    preset, local = Bundle.load(tiny_bundle), Bundle.load(out)
    for name, entry in preset.models.items():
        for graph, g in entry["graphs"].items():
            a = OnnxModel(preset.path(g["file"]))
            b = OnnxModel(local.path(local.model(name)["graphs"][graph]["file"]))
            golden = preset.arrays(entry["golden_file"])
            feeds = {k.split("__")[-1]: v for k, v in golden.items()
                     if k.startswith(f"image__{graph}__in__")}
            ra, rb = a.run(feeds), b.run(feeds)
            for k in ra:
                np.testing.assert_allclose(rb[k], ra[k], rtol=1e-5, atol=1e-6, err_msg=f"{name}/{k}")
    np.testing.assert_allclose(local.array(local.model("owlvit")["query_embeds_file"]),
                               preset.array(preset.model("owlvit")["query_embeds_file"]), atol=1e-6)


def test_owlvit_graph_reproduces_hf_logits(tiny_bundle):
    """Final-answer parity: logits from the image graph + stored query embeddings equal
    OwlViTForObjectDetection's logits for the same prompts."""
    from sdexport.models import owlvit

    bundle = Bundle.load(tiny_bundle)
    entry = bundle.model("owlvit")
    model, processor = owlvit.load_torch(Source("owlvit", "local", str(tiny_bundle / "source" / "owlvit")),
                                         _ctx())
    prompts = entry["prompts"][:12]
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (150, 120, 3), dtype=np.uint8)
    inputs = processor(text=[prompts], images=image, return_tensors="pt")
    with torch.no_grad():
        hf = model(**inputs).logits[0].numpy()
    out = OnnxModel(bundle.path(entry["graphs"]["image"]["file"])).run(
        {"pixel_values": inputs["pixel_values"].numpy()})
    q = bundle.array(entry["query_embeds_file"])[:12]
    q = q / (np.linalg.norm(q, axis=-1, keepdims=True) + 1e-6)
    logits = (out["class_embeds"][0] @ q.T + out["logit_shift"][0]) * out["logit_scale"][0]
    rel = np.linalg.norm(logits - hf) / np.linalg.norm(hf)
    assert rel < 1e-5, rel
    assert len(np.unique(np.round(1 / (1 + np.exp(-hf)), 6))) > 10  # heads do not saturate


def test_stored_tokenizer_matches_hf(tiny_bundle):
    """The bundle's tokenizer.json (read with `tokenizers`, no transformers) gives HF's ids."""
    from tokenizers import Tokenizer

    from sdexport.models import owlvit

    bundle = Bundle.load(tiny_bundle)
    entry = bundle.model("owlvit")
    tok = Tokenizer.from_file(str(bundle.path(entry["tokenizer_file"])))
    _, processor = owlvit.load_torch(Source("owlvit", "preset", "tiny-random"), _ctx())
    prompts = entry["prompts"] + ["a very long prompt with many many words that will be cut off"]
    ref = owlvit.tokenize(processor, prompts)["input_ids"]
    for p, ids in zip(prompts, ref):
        enc = tok.encode(p).ids[:entry["text_length"]]
        if len(enc) == entry["text_length"]:
            enc[-1] = ids[-1]  # truncation keeps the end token in HF
        enc = enc + [entry["pad_token_id"]] * (entry["text_length"] - len(enc))
        assert enc == ids.tolist(), p


def test_prompts_and_vocabulary(tiny_bundle):
    m = Bundle.load(tiny_bundle).manifest
    assert m["vocabulary"] == default_vocabulary() and len(m["vocabulary"]) == 42
    entry = m["models"]["owlvit"]
    assert len(entry["prompts"]) == 42 * 6
    prompts, labels = make_prompts(default_vocabulary(), m["prompt_templates"])
    assert entry["prompts"] == prompts
    assert np.load(tiny_bundle / entry["prompt_labels_file"]).tolist() == labels


# The vocabulary the seed notebook prints ("Vocab: [...]") after normalising train.csv.
SEED_VOCAB = ["animal", "baby", "bag", "baggage", "bicycle", "bicyclist", "box", "building", "car",
              "cart", "case", "chair", "child", "cone", "container", "couple", "dog", "dolly",
              "driver", "gate", "girl", "group", "individual", "item", "kid", "ladder", "lady",
              "luggage", "motorcycle", "object", "person", "personal", "pole", "scooter", "shadow",
              "sign", "stroller", "traffic", "truck", "umbrella", "vehicle", "vest"]


def test_vocab_from_train_csv_is_the_notebooks():
    from sdrun.bundle.vocab import default_vocabulary, normalize_label, parse_vocabulary

    assert parse_vocabulary(str(TRAIN_CSV)) == SEED_VOCAB
    assert default_vocabulary() == SEED_VOCAB
    # the notebook's map: man/guy/worker/... -> person, auto -> car, pickup -> truck; no plurals
    assert [normalize_label(w) for w in ("Man", "guy", "people", "auto", "pickup", "bike", "fence")] == \
        ["person", "person", "person", "car", "truck", "bicycle", "barrier"]
    assert normalize_label("men") == "men" and normalize_label("kid") == "kid"
    # the richer map is an option, never the default
    assert normalize_label("Men", "rich") == "person" and normalize_label("sedans", "rich") == "car"
    rich = parse_vocabulary(str(TRAIN_CSV), "rich")
    assert len(rich) < 42 and "kid" not in rich and "person" in rich
    assert parse_vocabulary("car, person ,car") == ["car", "person"]


def test_random_presets_are_deterministic(tmp_path):
    from sdexport.models import clip, siamese

    for mod in (siamese, clip):
        a = mod.load_torch(Source(mod.__name__.rsplit(".")[-1], "preset", "tiny-random"), _ctx())[0]
        b = mod.load_torch(Source(mod.__name__.rsplit(".")[-1], "preset", "tiny-random"), _ctx())[0]
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(v, w, rtol=0, atol=0, msg=k)
