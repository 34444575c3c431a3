"""`sdrun vocab`: another vocabulary without PyTorch, held to a bundle PyTorch built for it.

Bundle A is the session's tiny bundle (the default 42 labels); bundle B is built by
`sdexport build` from A's saved PyTorch weights (its `source/` folders) with vocabulary B.
`sdrun vocab A --out A2 --labels B` runs in a process where importing torch fails, and A2
must equal B: the same prompts, token ids and token -> label map, OWL-ViT query embeddings
and Grounding DINO outputs within the bundles' golden tolerance (relative L2 <= 1e-5), and the
same `sdrun diff` answers on synthetic pairs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import BLOCK_TORCH, run_without_torch, sdrun, snapshot

from sdrun.apps.check import compare, match_slots
from sdrun.bundle.bundle import Bundle

# Vocabulary B: new words (which A's Grounding DINO tokenizer spells in pieces), two words in
# one label, and labels A has too, in an order of the user's.
LABELS_B = ["pallet", "forklift", "traffic cone", "helmet", "car", "person"]
TOLERANCE = 1e-5  # relative L2, the bundles' golden tolerance (manifest "tolerance")
GDINO_OUTPUTS = ["logits", "pred_boxes"]


@pytest.fixture(scope="module")
def bundles(tiny_bundle, tmp_path_factory):
    """(A, B, A2, the labels file): B built with torch from A's weights, A2 by `sdrun vocab`
    without torch."""
    from sdexport.build import build_bundle, resolve_sources

    root = tmp_path_factory.mktemp("vocab")
    a = tiny_bundle
    sources = resolve_sources(None, {m: str(a / "source" / m) for m in ("owlvit", "gdino", "siamese", "clip")})
    b = build_bundle(root / "B", sources, LABELS_B, gdino_size=(256, 256), log=lambda s: None)
    labels = root / "labels.txt"
    labels.write_text("# vocabulary B\n" + "\n".join(LABELS_B) + "\n")
    before = snapshot(a)
    res = run_without_torch(["vocab", str(a), "--out", str(root / "A2"), "--labels", str(labels)])
    assert res.returncode == 0, res.stderr
    assert snapshot(a) == before  # the source bundle is never written
    return a, b, root / "A2", labels


def test_the_new_bundle_has_vocabulary_b(bundles):
    a, b, a2, _ = bundles
    new, want = Bundle.load(a2), Bundle.load(b)
    assert new.vocabulary == want.vocabulary == LABELS_B
    assert new.model("owlvit")["prompts"] == want.model("owlvit")["prompts"]
    assert new.model("gdino")["prompt"] == want.model("gdino")["prompt"] == ". ".join(LABELS_B)
    for rel in ("owlvit/prompt_labels.npy", "gdino/input_ids.npy", "gdino/attention_mask.npy",
                "gdino/token_type_ids.npy", "gdino/token_labels.npy"):
        np.testing.assert_array_equal(new.array(rel), want.array(rel), err_msg=rel)
    change = new.manifest["vocab_changes"][-1]
    assert change["source_content_id"] == Bundle.load(a).content_id
    assert len(change["source_vocabulary"]) == 42
    # unchanged files are hard links of A's; changed ones are new files
    assert os.path.samefile(a / "clip/visual.onnx", a2 / "clip/visual.onnx")
    assert os.path.samefile(a / "owlvit/image.onnx", a2 / "owlvit/image.onnx")
    assert not os.path.samefile(a / "gdino/model.onnx", a2 / "gdino/model.onnx")


def test_query_embeddings_equal_pytorchs(bundles):
    _, b, a2, _ = bundles
    run, ref = Bundle.load(a2).array("owlvit/query_embeds.npy"), Bundle.load(b).array("owlvit/query_embeds.npy")
    _, rel, note = compare(run, ref)
    assert rel <= TOLERANCE, (rel, note)


def test_grounding_dino_outputs_equal_pytorchs(bundles):
    """A2's respecialised graph on B's golden inputs (recorded from PyTorch) gives B's outputs;
    A2's own golden record (same images: same build seed) equals them too."""
    from sdrun.backends.session import OnnxModel

    _, b, a2, _ = bundles
    new, want = Bundle.load(a2), Bundle.load(b)
    graph = OnnxModel(new.path("gdino/model.onnx"))
    ref_golden, own_golden = want.arrays("gdino/golden.npz"), new.arrays("gdino/golden.npz")
    for case in ("random", "image"):
        feeds = {k.split("__")[-1]: v for k, v in ref_golden.items() if k.startswith(f"{case}__model__in__")}
        ref = {n: ref_golden[f"{case}__model__out__{n}"] for n in GDINO_OUTPUTS}
        np.testing.assert_array_equal(own_golden[f"{case}__model__in__pixel_values"], feeds["pixel_values"])
        recorded = {n: own_golden[f"{case}__model__out__{n}"] for n in GDINO_OUTPUTS}
        for outs in (graph.run(feeds), recorded):
            outs, _ = match_slots(outs, ref, GDINO_OUTPUTS)
            for n in GDINO_OUTPUTS:
                _, rel, note = compare(outs[n], ref[n])
                assert rel <= TOLERANCE, (case, n, rel, note)


def _diff(bundle: Path, a: Path, b: Path) -> dict:
    res = run_without_torch(["diff", str(bundle), str(a), str(b), "--json"])
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_diff_answers_equal_the_torch_built_bundles(bundles, tmp_path):
    from sdrun.apps.synth import write_synthetic_pairs

    _, b, a2, _ = bundles
    write_synthetic_pairs(tmp_path, 2, seed=3)
    for pair in ("10000", "10001"):
        images = [tmp_path / "data" / f"{pair}_{k}.png" for k in (1, 2)]
        got, want = _diff(a2, *images), _diff(b, *images)
        assert want["objects"], pair  # something to compare
        for col in ("added", "removed", "changed"):
            assert got[col] == want[col], (pair, col)
        assert [(o["image"], o["label"], o["status"]) for o in got["objects"]] == \
            [(o["image"], o["label"], o["status"]) for o in want["objects"]]
        for g, w in zip(got["objects"], want["objects"]):
            np.testing.assert_allclose(g["box"], w["box"], atol=2e-3)  # 2 units of the 3-decimal box
            assert abs(g["fused_score"] - w["fused_score"]) <= 1e-4
        assert {o["label"] for o in got["objects"]} <= set(LABELS_B)


def test_check_says_which_goldens_are_pytorchs(bundles):
    _, _, a2, _ = bundles
    res = run_without_torch(["check", str(a2), "--json"])
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    refs = {(r["model"], r["graph"], r["case"]): r["reference"] for r in rows}
    assert refs[("gdino", "model", "random")] == refs[("gdino", "model", "image")] == "runtime"
    assert refs[("owlvit", "text", "prompts")] == "runtime"  # the new query embeddings
    assert refs[("owlvit", "image", "image")] == refs[("owlvit", "text", "random")] == "pytorch"
    assert {refs[k] for k in refs if k[0] in ("siamese", "clip")} == {"pytorch"}
    res = run_without_torch(["check", str(a2)])
    assert res.returncode == 0 and "against the runtime's own record" in res.stdout
    res = run_without_torch(["info", str(a2)])
    assert res.returncode == 0 and "6 labels" in res.stdout and "set by `sdrun vocab`" in res.stdout


def test_vocab_again_replaces_the_runtime_goldens(bundles, tmp_path):
    """A2 -> A3 with A's labels: the prompt goldens are recorded again, not added twice, and
    the query embeddings come back to A's (PyTorch's)."""
    a, _, a2, _ = bundles
    first = Bundle.load(a).vocabulary
    assert sdrun("vocab", a2, "--out", tmp_path / "A3", "--vocab", ",".join(first)).exit_code == 0
    a3, orig = Bundle.load(tmp_path / "A3"), Bundle.load(a)
    assert a3.vocabulary == first and len(a3.manifest["vocab_changes"]) == 2
    _, rel, _ = compare(a3.array("owlvit/query_embeds.npy"), orig.array("owlvit/query_embeds.npy"))
    assert rel <= TOLERANCE
    cases = {k.split("__")[0] for k in a3.arrays("owlvit/golden.npz")}
    assert cases == {"random", "image", "prompts"}


def test_copy_copies(bundles, tmp_path):
    a, _, _, labels = bundles
    res = sdrun("vocab", a, "--out", tmp_path / "c", "--labels", labels, "--copy")
    assert res.exit_code == 0, res.output
    assert "0 hard-linked" in res.output
    assert not os.path.samefile(a / "clip/visual.onnx", tmp_path / "c" / "clip/visual.onnx")


def test_tokens_from_tokenizer_json_equal_the_hf_processors(tiny_bundle):
    """`sdrun.bundle.prompts` (the `tokenizers` library on the bundle's tokenizer.json) gives
    the ids and masks of the HF processors the export side uses, truncation included."""
    pytest.importorskip("transformers")
    from sdexport.context import BuildContext
    from sdexport.models import gdino, owlvit
    from sdexport.sources import Source
    from sdrun.bundle.prompts import gdino_tokens, load_tokenizer, owlvit_tokens
    from sdrun.bundle.vocab import default_prompt_templates, make_prompts

    bundle = Bundle.load(tiny_bundle)
    entry = bundle.model("owlvit")
    ctx = BuildContext(vocabulary=LABELS_B, prompt_templates=default_prompt_templates())
    _, processor = owlvit.load_torch(Source("owlvit", "preset", "tiny-random"), ctx)
    prompts = make_prompts(LABELS_B, default_prompt_templates())[0] + [
        "a very long prompt with many many words that will be cut off at sixteen tokens", "x"]
    got = owlvit_tokens(load_tokenizer(bundle.path(entry["tokenizer_file"])), prompts,
                        entry["text_length"], entry["pad_token_id"])
    want = owlvit.tokenize(processor, prompts)
    for k in ("input_ids", "attention_mask"):
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)

    entry = bundle.model("gdino")
    _, processor = gdino.load_torch(Source("gdino", "local", str(tiny_bundle / "source/gdino")), ctx)
    got = gdino_tokens(load_tokenizer(bundle.path(entry["tokenizer_file"])), LABELS_B, 256)
    want = gdino.tokenize_prompt(processor.tokenizer, LABELS_B, 256)
    for k in ("input_ids", "attention_mask", "token_type_ids", "token_labels"):
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# ---- what it refuses --------------------------------------------------------------------

def test_out_must_be_new_and_outside_the_bundle(bundles, tmp_path):
    a, _, a2, labels = bundles
    before = snapshot(a)
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    for out, words in ((a, "inside BUNDLE"), (a / "sub", "inside BUNDLE"), (full, "holds files"),
                       (a2, "holds files")):
        res = sdrun("vocab", a, "--out", out, "--labels", labels)
        assert res.exit_code == 2, (out, res.output)
        assert words in res.output and "--out" in res.output and "Traceback" not in res.output
    assert snapshot(a) == before and (full / "notes.txt").read_text() == "mine"
    res = sdrun("vocab", a, "--out", a.parent, "--labels", labels)  # BUNDLE inside --out
    assert res.exit_code == 2 and "lies inside it" in res.output


def test_labels_are_given_once_and_well(bundles, tmp_path):
    a, _, _, labels = bundles
    out = tmp_path / "o"
    for args, words in ((["--labels", labels, "--vocab", "car"], "exactly one of"),
                        ([], "exactly one of"),
                        (["--vocab", "car,st. bernard"], "may not hold '.'"),
                        (["--labels", tmp_path / "none.txt"], "does not exist")):
        res = sdrun("vocab", a, "--out", out, *args)
        assert res.exit_code == 2, (args, res.output)
        assert words in res.output, (args, res.output)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    res = sdrun("vocab", a, "--out", out, "--labels", empty)
    assert res.exit_code == 2 and "no labels" in res.output
    assert not out.exists()


def test_too_long_a_prompt_says_how_many_labels_fit(bundles, tmp_path):
    from sdrun.bundle.prompts import labels_that_fit

    a, _, _, _ = bundles
    words = [f"xq{i}zz" for i in range(80)]  # spelled in pieces: about 6 tokens + "." each
    res = sdrun("vocab", a, "--out", tmp_path / "o", "--vocab", ",".join(words))
    assert res.exit_code == 2
    assert "Grounding DINO reads at most 256 prompt tokens; the 80 labels make" in res.output
    fit = int(res.output.split("labels make")[1].split(":")[1].split("label")[0])
    assert 20 < fit < 80
    assert sdrun("vocab", a, "--out", tmp_path / "fits", "--vocab", ",".join(words[:fit])).exit_code == 0
    assert sdrun("vocab", a, "--out", tmp_path / "over", "--vocab", ",".join(words[:fit + 1])).exit_code == 2
    assert labels_that_fit(lambda k: 3 * k + 2, 100, 256) == 84 and labels_that_fit(lambda k: 300, 5, 256) == 0


def _block(names: set[str]) -> str:
    return BLOCK_TORCH + textwrap.dedent(f"""
        class _BlockMore:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {sorted(names)!r}:
                    raise ImportError(f"blocked in this test: {{name}}", name=name.split(".")[0])
        sys.meta_path.insert(0, _BlockMore())
    """)


def _sdrun_blocked(argv: list[str], names: set[str]) -> subprocess.CompletedProcess:
    code = _block(names) + f"sys.argv = ['sdrun'] + {argv!r}\nfrom sdrun.cli import main\nmain()\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


def test_without_the_extra_the_error_names_it(bundles, tmp_path):
    a, _, _, labels = bundles
    for missing in ("onnx", "tokenizers"):
        res = _sdrun_blocked(["vocab", str(a), "--out", str(tmp_path / "o"), "--labels", str(labels)], {missing})
        assert res.returncode == 2, res.stderr
        assert f"({missing} is missing): pip install 'spotdiff[vocab]'" in res.stderr
        assert "Traceback" not in res.stderr


def test_a_plain_run_needs_neither_onnx_nor_tokenizers(bundles, tmp_path):
    """onnx and tokenizers are the vocab extra's: `sdrun diff` and `check` of a bundle made by
    `sdrun vocab` run without them (and without torch)."""
    from sdrun.apps.synth import write_synthetic_pairs

    _, _, a2, _ = bundles
    write_synthetic_pairs(tmp_path, 1, seed=5)
    images = [str(tmp_path / "data" / f"10000_{k}.png") for k in (1, 2)]
    for argv in (["diff", str(a2), *images], ["check", str(a2), "--model", "owlvit"]):
        res = _sdrun_blocked(argv, {"onnx", "tokenizers"})
        assert res.returncode == 0, res.stderr


# ---- per-class change heads ---------------------------------------------------------------

@pytest.fixture(scope="module")
def heads_bundle(tmp_path_factory):
    """A tiny bundle (no Grounding DINO) whose Siamese graph has per-class change heads for
    three labels (untrained: only the graph's shape matters here)."""
    pytest.importorskip("torch")
    from safetensors.torch import save_file

    from sdexport.build import build_bundle, resolve_sources
    from sdexport.models.siamese import SiameseViTChange, backbone_for
    from sdexport.sources import Source

    root = tmp_path_factory.mktemp("heads")
    vocab = ["bag", "car", "person"]
    model = SiameseViTChange(backbone_for(Source("siamese", "preset", "tiny-random")), n_labels=len(vocab))
    ckpt = root / "heads.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(ckpt),
              metadata={"vocabulary": json.dumps(vocab)})
    out = build_bundle(root / "bundle", resolve_sources("tiny-random", {"gdino": "none"}), vocab,
                       siamese_ckpt=str(ckpt), log=lambda s: None)
    params = json.loads((out / "params.json").read_text())
    from sdrun.bundle.bundle import write_params

    write_params(out, {**params, "class_mode": "heads", "class_thr_added": 0.4}, backup=False)
    return out


def test_class_heads_refuse_another_vocabulary_unless_dropped(heads_bundle, tmp_path):
    from sdrun.pipeline import Pipeline

    assert Bundle.load(heads_bundle).has_class_heads
    res = run_without_torch(["vocab", str(heads_bundle), "--out", str(tmp_path / "no"), "--vocab", "pallet,car"])
    assert res.returncode == 2 and "per-class change heads" in res.stderr and "--drop-class-heads" in res.stderr
    assert not (tmp_path / "no").exists()
    res = run_without_torch(["vocab", str(heads_bundle), "--out", str(tmp_path / "new"), "--vocab", "pallet,car",
                             "--drop-class-heads"])
    assert res.returncode == 0, res.stderr
    assert "per-class change heads" in res.stdout  # named among what was left out
    new = Bundle.load(tmp_path / "new")
    assert not new.has_class_heads and new.vocabulary == ["pallet", "car"]
    assert "class_mode" not in new.params or new.params["class_mode"] == "detectors"
    assert [o["name"] for o in new.model("siamese")["graphs"]["pair"]["outputs"]] == ["heat", "logit"]
    res = run_without_torch(["check", str(tmp_path / "new"), "--model", "siamese"])
    assert res.returncode == 0, res.stdout + res.stderr  # heat and logit: still PyTorch's
    pipe = Pipeline.load(tmp_path / "new")
    img = np.full((64, 64, 3), 127, np.uint8)
    assert pipe.diff(img, img).class_probs is None
    # the same labels need nothing dropped
    assert sdrun("vocab", heads_bundle, "--out", tmp_path / "same", "--vocab", "bag,car,person").exit_code == 0
    assert Bundle.load(tmp_path / "same").has_class_heads
