"""Grounding DINO export: the export patches, the tiny bundle against PyTorch, token labels,
local folders and the errors that name what is wrong."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers.models.grounding_dino import modeling_grounding_dino as hf  # noqa: E402

from sdexport.build import DEFAULT_PARAMS  # noqa: E402
from sdexport.context import BuildContext  # noqa: E402
from sdexport.models import gdino  # noqa: E402
from sdexport.sources import Source, SourceError  # noqa: E402
from sdexport.writer import BundleWriter  # noqa: E402
from sdrun.apps.check import check_bundle, compare, match_slots  # noqa: E402
from sdrun.bundle.bundle import Bundle  # noqa: E402
from sdrun.bundle.vocab import default_vocabulary  # noqa: E402

SIZE = (256, 256)


def _ctx(vocabulary=None) -> BuildContext:
    return BuildContext(vocabulary=vocabulary or default_vocabulary(), prompt_templates=["{l}"],
                        gdino_size=SIZE, log=lambda s: None)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A bundle with only the tiny-random Grounding DINO: (root, entry, ctx)."""
    root = tmp_path_factory.mktemp("gdino") / "bundle"
    writer = BundleWriter(root)
    ctx = _ctx()
    entry = gdino.export_model(Source("gdino", "preset", "tiny-random"), writer, ctx)
    writer.finalize({"vocabulary": ctx.vocabulary, "models": {"gdino": entry},
                     "params_file": writer.save_json("params.json", DEFAULT_PARAMS)})
    return root, entry, ctx


def _random_ids(rng, batch, length, p_special):
    ids = rng.integers(0, 1200, (batch, length))
    special = rng.random((batch, length)) < p_special
    ids[special] = rng.choice(hf.SPECIAL_TOKENS, special.sum())
    return torch.from_numpy(ids)


def test_phrase_mask_rewrite_matches_hf():
    rng = np.random.default_rng(0)
    special_tokens = torch.tensor(hf.SPECIAL_TOKENS)
    cases = [_random_ids(rng, b, t, p) for t in (1, 2, 3, 7, 40, 256) for b in (1, 3)
             for p in (0.0, 0.15, 0.5, 1.0)]
    edges = torch.tensor([[101, 5, 6, 1012, 7, 1012, 102], [1012, 5, 1029, 1029, 8, 9, 102]])
    for ids in cases + [edges]:
        want_mask, want_pos = hf.generate_masks_with_special_tokens_and_transfer_map(
            ids, special_tokens)
        mask, pos = gdino.phrase_masks(ids, special_tokens)
        assert mask.dtype == want_mask.dtype and pos.dtype == want_pos.dtype
        assert torch.equal(mask, want_mask) and torch.equal(pos, want_pos), ids


@pytest.mark.parametrize("batch,heads,points", [(1, 8, 4), (2, 2, 3)])
def test_level_weighted_sampling_matches_hf(batch, heads, points):
    """The export's deformable sampling gives HF's outputs (float32 rounding apart), with
    sampling points inside and outside the feature maps."""
    shapes = [(20, 24), (10, 12), (5, 6), (3, 3)]
    hidden, queries = 16, 37
    gen = torch.Generator().manual_seed(batch * 100 + heads)
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, hidden, generator=gen)
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=gen) * 1.2 - 0.1
    weights = torch.softmax(torch.randn(batch, queries, heads, len(shapes) * points,
                                        generator=gen), -1)
    weights = weights.view(batch, queries, heads, len(shapes), points)
    spatial = torch.tensor(shapes)
    start = torch.cat([spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]])
    args = (value, spatial, shapes, start, locations, weights, 64)
    module = hf.MultiScaleDeformableAttention()
    want = module(*args)
    with gdino.patched_deformable_sampling():
        got = module(*args)
    assert got.shape == want.shape == (batch, queries, heads * hidden)
    rel = (torch.linalg.norm(got - want) / torch.linalg.norm(want)).item()
    assert rel < 1e-6, rel


def test_export_patches_are_restored(built):
    from torch.onnx._internal.torchscript_exporter import registration

    original = hf.generate_masks_with_special_tokens_and_transfer_map
    sampling = hf.MultiScaleDeformableAttention.forward
    linspace = registration.registry.get_function_group("aten::linspace")
    with gdino.export_patches(17):
        assert hf.generate_masks_with_special_tokens_and_transfer_map is gdino.phrase_masks
        assert hf.MultiScaleDeformableAttention.forward is gdino.level_weighted_sampling
        assert linspace.get(17) is gdino._linspace_float32
    assert hf.generate_masks_with_special_tokens_and_transfer_map is original
    assert hf.MultiScaleDeformableAttention.forward is sampling
    assert linspace.get(17) is not gdino._linspace_float32


def test_tiny_export_passes_check(built):
    root, entry, _ = built
    checks = list(check_bundle(Bundle.load(root)))
    assert {(c.case, c.output) for c in checks} == {
        (case, out) for case in ("random", "image") for out in ("logits", "pred_boxes")}
    for c in checks:
        assert c.rel_l2 <= 1e-5, c
    outputs = {o["name"]: o["shape"] for o in entry["graphs"]["model"]["outputs"]}
    assert outputs == {"logits": ["batch", entry["num_queries"], entry["max_text_len"]],
                       "pred_boxes": ["batch", entry["num_queries"], 4]}


def test_graph_takes_any_batch_and_another_prompt(built, tmp_path):
    """The prompt-specialised graph at batch 1 and 3, and re-specialised to another prompt
    at batch 2 with what the bundle holds (tokenizer.json read by `tokenizers`, the text
    graph, onnx tooling; no transformers, no PyTorch), against PyTorch."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from sdrun.bundle.specialise import respecialise

    root, entry, ctx = built
    model, processor = gdino.load_torch(Source("gdino", "local", str(root / "source/gdino")), ctx)
    graph = root / entry["graphs"]["model"]["file"]
    assert [i["name"] for i in entry["graphs"]["model"]["inputs"]] == ["pixel_values"]
    assert entry["prompt_folding"]["where_removed"] > 0  # the masked_fills of uniform masks
    rng = np.random.default_rng(1)
    labels = ctx.vocabulary
    full = gdino.tokenize_prompt(processor.tokenizer, labels, 256)
    short = gdino.tokenize_prompt(processor.tokenizer, labels[3:6], 256)
    enc = Tokenizer.from_file(str(root / entry["tokenizer_file"])).encode(
        gdino.make_prompt(labels[3:6]))
    assert enc.ids == short["input_ids"][0].tolist()
    assert enc.type_ids == short["token_type_ids"][0].tolist()
    np.testing.assert_array_equal(gdino.token_label_map(enc.offsets, gdino.label_spans(labels[3:6])),
                                  short["token_labels"])
    other = tmp_path / "short.onnx"
    shapes = respecialise(graph, root / entry["prompt_folding"]["text_graph"], other,
                          gdino.fixed_inputs(short, SIZE))
    assert any(short["input_ids"].shape[1] in s for s in shapes.values())
    pixels = {b: rng.standard_normal((b, 3, *SIZE), dtype=np.float32) for b in (1, 2, 3)}
    cases = [(graph, gdino.graph_inputs(pixels[1], full)),
             (graph, gdino.graph_inputs(pixels[3], full)),
             (other, gdino.graph_inputs(pixels[2], short))]
    for path, feeds in cases:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ref = gdino.run_torch(model, feeds)
        image_feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
        run = dict(zip(gdino.OUTPUT_NAMES, session.run(gdino.OUTPUT_NAMES, image_feeds)))
        run, _ = match_slots(run, ref, gdino.OUTPUT_NAMES)
        for name in gdino.OUTPUT_NAMES:
            _, rel, note = compare(run[name], ref[name])
            assert rel <= 1e-5, (path.name, name, feeds["input_ids"].shape, rel, note)


def test_token_labels_follow_label_spans(built):
    root, entry, ctx = built
    bundle = Bundle.load(root)
    ids = bundle.array(entry["input_ids_file"])[0]
    token_labels = bundle.array(entry["token_labels_file"])
    _, processor = gdino.load_torch(Source("gdino", "local", str(root / "source/gdino")), ctx)
    assert entry["prompt"] == ". ".join(ctx.vocabulary)  # the notebook's text, no final period
    assert ids.shape == token_labels.shape and 100 not in ids  # no [UNK]
    assert set(ids[token_labels == -1].tolist()) == {101, 102, 1012}
    for i, label in enumerate(ctx.vocabulary):
        assert processor.tokenizer.decode(ids[token_labels == i]) == label


def test_token_labels_of_multi_piece_labels():
    vocab = gdino.wordpiece_vocab(["traffic light", "car"], 1030)
    tokenizer = gdino.preset_processor(vocab).tokenizer
    labels = ["traffic light", "car", "xq7"]  # two words; a word made of character pieces
    text = gdino.tokenize_prompt(tokenizer, labels, 256)
    ids, token_labels = text["input_ids"][0], text["token_labels"]
    assert 100 not in ids
    for i, label in enumerate(labels):
        assert tokenizer.decode(ids[token_labels == i]) == label
    assert token_labels.tolist().count(0) == 2 and token_labels.tolist().count(2) == 3


def test_local_folder_round_trip(built):
    """The saved source folder loads into the same model: identical PyTorch outputs."""
    root, _, ctx = built
    preset, _ = gdino.load_torch(Source("gdino", "preset", "tiny-random"), ctx)
    queries = preset.model.query_position_embeddings.weight
    assert torch.equal(queries, queries[:1].expand_as(queries))  # see share_query_embedding
    local, _ = gdino.load_torch(Source("gdino", "local", str(root / "source/gdino")), ctx)
    golden = Bundle.load(root).arrays("gdino/golden.npz")
    feeds = {n: golden[f"image__model__in__{n}"] for n in gdino.INPUT_NAMES}
    want, got = gdino.run_torch(preset, feeds), gdino.run_torch(local, feeds)
    for name in gdino.OUTPUT_NAMES:
        np.testing.assert_array_equal(got[name], want[name])
        np.testing.assert_allclose(got[name], golden[f"image__model__out__{name}"], rtol=1e-5,
                                   atol=1e-5)


def test_offline_hub_id_names_the_model():
    code = textwrap.dedent("""
        from sdexport.context import BuildContext
        from sdexport.models import gdino
        from sdexport.sources import Source, SourceError
        try:
            gdino.load_torch(Source("gdino", "hub", "IDEA-Research/grounding-dino-base"),
                             BuildContext(vocabulary=["car"], prompt_templates=["{l}"]))
            print("LOADED")
        except SourceError as e:
            print("ERR", e)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    line = next(x for x in res.stdout.splitlines() if x.startswith(("ERR", "LOADED")))
    assert line.startswith("ERR")
    assert "Grounding DINO" in line and "IDEA-Research/grounding-dino-base" in line


def test_corrupt_weights_are_named(built, tmp_path):
    root, _, ctx = built
    folder = tmp_path / "gdino"
    shutil.copytree(root / "source" / "gdino", folder)
    (folder / "model.safetensors").write_bytes(b"garbage" * 100)
    with pytest.raises(SourceError, match=r"Grounding DINO .*model\.safetensors"):
        gdino.load_torch(Source("gdino", "local", str(folder)), ctx)


def test_missing_files_are_named(built, tmp_path):
    root, _, ctx = built
    no_config, no_tokenizer = tmp_path / "no_config", tmp_path / "no_tokenizer"
    for folder in (no_config, no_tokenizer):
        shutil.copytree(root / "source" / "gdino", folder)
    (no_config / "config.json").unlink()
    with pytest.raises(SourceError, match=r"no config\.json"):
        gdino.load_torch(Source("gdino", "local", str(no_config)), ctx)
    # without tokenizer.json transformers silently loads a 5-token vocabulary
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(SourceError, match=r"tokenizer does not fit"):
        gdino.load_torch(Source("gdino", "local", str(no_tokenizer)), ctx)


def test_hf_post_processing_has_no_phrases_key(built):
    """Departure 1 (docs/departures.md): the notebook labels Grounding DINO boxes from
    `results.get('phrases', ['object'] * n)`; Hugging Face never returns `phrases`, so the
    notebook's boxes are all `object`. spotdiff labels them from the token -> label map."""
    root, entry, ctx = built
    model, processor = gdino.load_torch(Source("gdino", "local", str(root / "source/gdino")), ctx)
    image = np.random.default_rng(0).integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    inputs = processor(images=image, text=entry["prompt"], return_tensors="pt",
                       size={"height": SIZE[0], "width": SIZE[1]})
    with torch.no_grad():
        out = model(**inputs)
    res = processor.post_process_grounded_object_detection(
        out, inputs.input_ids, threshold=0.0, text_threshold=0.0, target_sizes=[SIZE])[0]
    assert len(res["boxes"]) > 0 and "phrases" not in res
    notebook_labels = res.get("phrases", ["object"] * len(res["boxes"]))
    assert set(notebook_labels) == {"object"}
    token_labels = Bundle.load(root).array(entry["token_labels_file"])
    assert len(set(token_labels[token_labels >= 0].tolist())) == len(ctx.vocabulary)  # one per label


def test_the_notebook_feeds_each_image_at_its_own_size(built):
    """Departure 2 (docs/departures.md): the notebook's processor call resizes every image to
    its own canvas (shortest edge 800, longest at most 1333), so its Grounding DINO input
    shape follows the image; a bundle runs one fixed canvas for every image."""
    root, entry, ctx = built
    _, processor = gdino.load_torch(Source("gdino", "local", str(root / "source/gdino")), ctx)
    shapes = set()
    for h, w in ((200, 260), (320, 240), (224, 224)):
        image = np.zeros((h, w, 3), np.uint8)
        shapes.add(tuple(processor(images=image, text=entry["prompt"], return_tensors="pt")
                         ["pixel_values"].shape[2:]))
    assert len(shapes) == 3  # the notebook: one input size per image shape
    assert tuple(entry["image_size"]) == SIZE  # the bundle: one canvas
