"""The OpenVINO backend (`--provider openvino`): the same answers as onnxruntime in f32, the
compiled-model cache, the precision policy and `sdrun precision`.

These run wherever OpenVINO is installed (CI installs the `openvino` extra). bf16 itself
runs only on CPUs with avx512_bf16 or AMX; elsewhere OpenVINO runs a bf16 request in f32,
and the tests assert nothing about bf16 drift or speed.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("openvino")

from conftest import REAL_PAIRS, run_without_torch

from sdrun.apps.check import check_bundle
from sdrun.apps.precision import Trial, choose_policy, graph_keys, parts_of
from sdrun.apps.synth import make_pair, pair_rng
from sdrun.backends import openvino_backend as ovb
from sdrun.backends.session import OnnxModel, open_graph
from sdrun.bundle.bundle import Bundle, golden_cases
from sdrun.cli import main as sdrun_main
from sdrun.errors import BundleError, ProviderError
from sdrun.pipeline import Pipeline
from sdrun.stages.images import load_image

NO_BF16 = frozenset({"avx2", "fma"})
ZEN4 = frozenset({"avx2", "avx512f", "avx512_bf16"})
SAPPHIRE_RAPIDS = frozenset({"avx2", "avx512f", "amx_bf16", "amx_int8"})


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Every test compiles into its own cache folder (no test sees another's blobs)."""
    monkeypatch.setenv("SPOTDIFF_CACHE_DIR", str(tmp_path / "cache"))


# ---- providers and precisions ------------------------------------------------------------------
def test_provider_names():
    assert ovb.parse_provider("openvino") is None
    assert ovb.parse_provider("openvino:f32") == "f32"
    assert ovb.parse_provider("openvino:bf16") == "bf16"
    for bad in ("openvino:fp16", "openvino:int8", "openvin"):
        with pytest.raises(ProviderError, match="openvino:f32"):
            ovb.parse_provider(bad)


def test_bf16_is_the_default_only_where_the_cpu_has_it():
    assert ovb.default_precision(NO_BF16) == "f32"
    assert ovb.default_precision(ZEN4) == "bf16"
    assert ovb.default_precision(SAPPHIRE_RAPIDS) == "bf16"


def test_graph_precision_follows_the_bundles_policy(tiny_bundle):
    b = Bundle.load(tiny_bundle)
    assert ovb.graph_precision(b, "owlvit", "image", "f32", ZEN4) == "f32"
    assert ovb.graph_precision(b, "owlvit", "image", "bf16", NO_BF16) == "bf16"  # asked for: given
    assert ovb.graph_precision(b, "owlvit", "image", None, NO_BF16) == "f32"  # no bf16 here
    assert ovb.graph_precision(b, "owlvit", "image", None, ZEN4) == "bf16"  # no policy: all bf16
    split = {"backbone": "bf16", "encoder": "bf16", "decoder": "f32", "heads": "f32"}
    with_policy = Bundle(root=b.root, manifest={**b.manifest, "openvino": {"policy": {
        "owlvit/image": "bf16", "gdino/model": split}}})
    assert ovb.graph_precision(with_policy, "owlvit", "image", None, ZEN4) == "bf16"
    assert ovb.graph_precision(with_policy, "gdino", "model", None, ZEN4) == split
    assert ovb.graph_precision(with_policy, "clip", "visual", None, ZEN4) == "f32"  # not measured


def test_kept_parts_name_real_nodes_of_grounding_dino(tiny_bundle):
    """Each part of Grounding DINO a policy can keep in f32 marks nodes of the real graph."""
    model = ovb.core().read_model(str(Path(tiny_bundle) / "gdino" / "model.onnx"))
    counts = {part: ovb.mark_f32(model, subs) for part, subs in ovb.PARTS["gdino"].items()}
    assert all(n > 50 for n in counts.values()), counts
    marked = sum(1 for n in model.get_ops() if "disable_fp16_compression_0" in n.get_rt_info())
    assert marked == sum(counts.values())  # the parts do not overlap
    hint, keep = ovb.kept_f32("gdino", {"backbone": "bf16", "encoder": "f32", "decoder": "bf16", "heads": "f32"})
    assert hint == "bf16" and set(keep) == set(ovb.PARTS["gdino"]["encoder"] + ovb.PARTS["gdino"]["heads"])
    assert ovb.kept_f32("gdino", dict.fromkeys(ovb.PARTS["gdino"], "f32")) == ("f32", ())
    with pytest.raises(BundleError, match="unknown part"):
        ovb.kept_f32("gdino", {"neck": "f32"})


def test_int8_graphs_are_refused(tiny_bundle):
    b = Bundle.load(tiny_bundle)
    manifest = json.loads(json.dumps(b.manifest))
    manifest["models"]["clip"]["graphs"]["visual"]["precision"] = "int8"
    with pytest.raises(ProviderError, match="int8"):
        open_graph(Bundle(root=b.root, manifest=manifest), "clip", "visual", "openvino:f32")


# ---- answers -----------------------------------------------------------------------------------
def test_check_passes_on_openvino(tiny_bundle):
    """Every graph's golden outputs (PyTorch's) within 1e-4 under OpenVINO f32, Grounding
    DINO's included: compiled for batch 1, its proposal grid folds exactly (see the module)."""
    checks = list(check_bundle(Bundle.load(tiny_bundle), provider="openvino:f32"))
    assert {c.model for c in checks} == {"owlvit", "gdino", "siamese", "clip"}
    bad = [(c.model, c.graph, c.case, c.output, c.rel_l2) for c in checks if not c.ok]
    assert not bad, bad
    assert max(c.rel_l2 for c in checks) < 1e-4


def test_openvino_division_is_within_one_ulp(tmp_path):
    """Why Grounding DINO compiles for batch 1: OpenVINO's run-time division is not
    IEEE-exact, only within 1 ulp (a constant-folded one is exact)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Div", ["x", "w"], ["y"])], "div",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64]),
                               helper.make_tensor_value_info("w", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "div.onnx"
    onnx.save(model, str(path))
    x = np.random.default_rng(0).uniform(0.1, 100, (8, 64)).astype(np.float32)
    w = np.random.default_rng(1).uniform(0.1, 100, (8, 64)).astype(np.float32)
    got = ovb.OpenVinoModel(path, "f32", 1).run({"x": x, "w": w})["y"]
    want = x / w
    ulps = np.abs(got.view(np.int32).astype(np.int64) - want.view(np.int32).astype(np.int64))
    assert ulps.max() <= 1
    print(f"\nOpenVINO division: {np.mean(ulps > 0):.0%} of quotients 1 ulp off")


def test_dynamic_batch_gives_each_rows_answer(tiny_bundle):
    b = Bundle.load(tiny_bundle)
    model = open_graph(b, "owlvit", "image", "openvino:f32")
    rows = np.random.default_rng(3).normal(size=(3, 3, 128, 128)).astype(np.float32)
    together = model.run({"pixel_values": rows})
    for n in (1, 2, 3, 1):  # the same compiled model, calls of changing batch
        part = model.run({"pixel_values": rows[:n]})
        for k, v in part.items():
            np.testing.assert_allclose(v, together[k][:n], rtol=1e-5, atol=1e-6)
    reference = OnnxModel(b.path("owlvit/image.onnx")).run({"pixel_values": rows})
    for k, v in reference.items():
        assert np.linalg.norm(together[k] - v) <= 1e-4 * np.linalg.norm(v), k


def test_grounding_dino_runs_row_by_row_at_batch_one(tiny_bundle):
    b = Bundle.load(tiny_bundle)
    model = open_graph(b, "gdino", "model", "openvino:f32").open()
    assert model.static_batch
    golden = golden_cases(b.arrays(b.model("gdino")["golden_file"]))
    io = golden[("random", "model")]
    assert len(io["in"]["pixel_values"]) == 2
    out = model.run({"pixel_values": io["in"]["pixel_values"]})  # two rows: two calls
    assert out["pred_boxes"].shape == io["out"]["pred_boxes"].shape


def test_openvino_after_onnxruntime_in_one_thread(tiny_bundle):
    """onnxruntime's denormals-as-zero on the calling thread used to break OpenVINO's shape
    inference ("Broadcast ... Value -1 not in range") in the same process."""
    b = Bundle.load(tiny_bundle)
    OnnxModel(b.path("clip/visual.onnx")).open()
    x = np.zeros((2, 3, 128, 128), np.float32)
    assert open_graph(b, "owlvit", "image", "openvino:f32").run({"pixel_values": x})["pred_boxes"].shape[0] == 2


def test_pipeline_answers_equal_onnxruntimes(tiny_bundle):
    """Label sets under OpenVINO f32 equal onnxruntime fp32's on 12 synthetic pairs and both
    real ones."""
    pairs = [(f"s{i}", *make_pair(pair_rng(7, i))[:2]) for i in range(12)]
    pairs += [(p, load_image(REAL_PAIRS / f"{p}_1.png"), load_image(REAL_PAIRS / f"{p}_2.png"))
              for p in ("31795", "35333")]
    ort = Pipeline.load(tiny_bundle)
    ov = Pipeline.load(tiny_bundle, provider="openvino:f32")
    differ, kept = [], 0
    for pair_id, a, b in pairs:
        x, y = ort.diff(a, b, pair_id), ov.diff(a, b, pair_id)
        kept += len(x.objects)
        if (x.added, x.removed, x.changed) != (y.added, y.removed, y.changed):
            differ.append(pair_id)
    assert not differ, differ
    assert kept > 30  # not vacuous


def test_sdrun_run_on_openvino_without_torch(tiny_bundle, tmp_path):
    """`sdrun run --provider openvino:f32` in a process where torch cannot be imported
    writes the submission onnxruntime writes."""
    outs = {}
    for provider in ("cpu", "openvino:f32"):
        out = tmp_path / f"{provider.replace(':', '-')}.csv"
        res = run_without_torch(["run", str(tiny_bundle), "--data", str(REAL_PAIRS), "--out", str(out),
                                 "--provider", provider, "--quiet"])
        assert res.returncode == 0, res.stderr
        outs[provider] = out.read_text()
    assert outs["cpu"] == outs["openvino:f32"]
    assert outs["cpu"].count("\n") == 3  # header + both real pairs


# ---- the compiled-model cache ---------------------------------------------------------------------
def test_compiled_models_are_cached_per_graph_version_precision_and_cpu(tiny_bundle, tmp_path):
    b = Bundle.load(tiny_bundle)
    x = {"pixel_values": np.random.default_rng(0).normal(size=(1, 3, 128, 128)).astype(np.float32)}
    first = open_graph(b, "owlvit", "image", "openvino:f32")
    out1 = first.run(x)
    folders = sorted((tmp_path / "cache" / ovb.CACHE_SUBDIR).iterdir())
    assert len(folders) == 1
    name = folders[0].name
    sha = b.manifest["files"]["owlvit/image.onnx"]["sha256"]
    assert name.startswith(sha[:32]) and f"-ov{ovb.ov_version()}-" in name and "-f32-" in name
    assert name.endswith(f"-cpu{ovb.cpu_signature()}")
    assert any(folders[0].iterdir())  # OpenVINO wrote its blob
    again = open_graph(b, "owlvit", "image", "openvino:f32").run(x)  # from the blob
    for k in out1:
        np.testing.assert_array_equal(out1[k], again[k])
    open_graph(b, "gdino", "model", "openvino:f32").open()
    keys = {f.name for f in (tmp_path / "cache" / ovb.CACHE_SUBDIR).iterdir()}
    assert any(k.endswith(f"-b1-cpu{ovb.cpu_signature()}") for k in keys)  # batch 1: its own key


def test_a_damaged_cache_entry_never_stops_a_run(tiny_bundle, tmp_path):
    b = Bundle.load(tiny_bundle)
    x = {"pixel_values": np.zeros((1, 3, 128, 128), np.float32)}
    want = open_graph(b, "owlvit", "image", "openvino:f32").run(x)
    for blob in (tmp_path / "cache" / ovb.CACHE_SUBDIR).rglob("*"):
        if blob.is_file():
            blob.write_bytes(b"not a compiled model")
    got = open_graph(b, "owlvit", "image", "openvino:f32").run(x)
    for k in want:
        np.testing.assert_array_equal(want[k], got[k])


def test_a_damaged_cached_graph_never_stops_a_run(tiny_bundle, tmp_path):
    """Grounding DINO (batch fixed) is compiled from an IR saved in the cache; a damaged one
    is dropped and the bundle's graph used."""
    b = Bundle.load(tiny_bundle)
    shape = b.model("gdino")["graphs"]["model"]["inputs"][0]["shape"]
    x = {"pixel_values": np.zeros((1, *shape[1:]), np.float32)}
    want = open_graph(b, "gdino", "model", "openvino:f32").run(x)
    irs = list((tmp_path / "cache" / ovb.CACHE_SUBDIR).rglob("graph.*"))
    assert {p.name for p in irs} == {"graph.xml", "graph.bin"}
    for p in (tmp_path / "cache" / ovb.CACHE_SUBDIR).rglob("*"):
        if p.is_file():
            p.write_bytes(b"<damaged")
    with pytest.warns(RuntimeWarning, match="cached graph unusable"):
        got = open_graph(b, "gdino", "model", "openvino:f32").run(x)
    for k in want:
        np.testing.assert_array_equal(want[k], got[k])


def test_cache_off(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("SPOTDIFF_GRAPH_CACHE", "0")
    open_graph(Bundle.load(tiny_bundle), "clip", "visual", "openvino:f32").open()
    assert not (tmp_path / "cache" / ovb.CACHE_SUBDIR).exists()


# ---- the policy ---------------------------------------------------------------------------------
def _judge(fails):
    """A trial judge: a policy fails if any (graph, part-or-None) in `fails` runs bf16."""
    def trial(policy):
        bad = False
        for key, prec in policy.items():
            for part_key, part in fails:
                if part_key != key:
                    continue
                if prec == "bf16" or (isinstance(prec, dict) and (part is None or prec.get(part) == "bf16")):
                    bad = True
        return Trial(dict(policy), 0 if bad else 5, 5)
    return trial


def test_all_bf16_is_one_trial_when_it_holds():
    policy, trials = choose_policy(["gdino/model", "owlvit/image"], parts_of, _judge([]))
    assert policy == {"gdino/model": "bf16", "owlvit/image": "bf16"} and len(trials) == 1


def test_a_graph_that_changes_answers_stays_f32():
    policy, trials = choose_policy(["owlvit/image", "clip/visual", "siamese/pair"], parts_of,
                                   _judge([("clip/visual", None)]))
    assert policy == {"owlvit/image": "bf16", "clip/visual": "f32", "siamese/pair": "bf16"}
    assert len(trials) == 4  # all at once, then one graph at a time


def test_grounding_dino_is_split_into_parts_when_it_fails_whole():
    policy, _ = choose_policy(["gdino/model", "owlvit/image"], parts_of, _judge([("gdino/model", "decoder")]))
    assert policy["owlvit/image"] == "bf16"
    assert policy["gdino/model"] == {"backbone": "bf16", "encoder": "bf16", "decoder": "f32", "heads": "bf16"}


def test_graph_keys_largest_first(tiny_bundle):
    b = Bundle.load(tiny_bundle)
    keys = graph_keys(b)
    sizes = [b.manifest["files"][b.model(k.split("/")[0])["graphs"][k.split("/")[1]]["file"]]["bytes"] for k in keys]
    assert sizes == sorted(sizes, reverse=True)
    assert len(keys) == sum(len(e["graphs"]) for e in b.models.values())


def test_precision_refuses_a_cpu_without_bf16(tiny_bundle, monkeypatch):
    monkeypatch.setattr(ovb, "has_bf16", lambda flags=None: False)
    r = CliRunner().invoke(sdrun_main, ["precision", str(tiny_bundle)])
    assert r.exit_code == 1 and "no bf16 arithmetic" in r.output and "--force" in r.output


def test_precision_writes_a_policy_that_check_and_run_follow(tiny_bundle, tmp_path):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    before = {p.name: p.read_bytes() for p in bundle.rglob("*") if p.is_file() and p.name != "manifest.json"}
    r = CliRunner().invoke(sdrun_main, ["precision", str(bundle), "--synthetic", "3", "--force", "--write",
                                      "--data", str(REAL_PAIRS), "--threads", "1"])
    assert r.exit_code == 0, r.output
    b = Bundle.load(bundle)  # still verifies: only the manifest changed
    assert {p.name: p.read_bytes() for p in bundle.rglob("*") if p.is_file() and p.name != "manifest.json"} == before
    section = b.manifest["openvino"]
    assert set(section["policy"]) == set(graph_keys(b))
    assert section["measured"]["pairs"] == 5 and section["measured"]["bf16"] == ovb.has_bf16()
    for key, prec in section["policy"].items():
        assert prec in ("f32", "bf16") or isinstance(prec, dict)
        if prec != "f32":
            assert key in section["tolerance"]
    if not ovb.has_bf16():  # bf16 runs in f32 here: nothing gains, everything stays f32
        assert set(section["policy"].values()) == {"f32"}
    info = CliRunner().invoke(sdrun_main, ["info", str(bundle)])
    assert "[openvino precision]" in info.output
    check = CliRunner().invoke(sdrun_main, ["check", str(bundle), "--provider", "openvino"])
    assert check.exit_code == 0, check.output


def test_measure_policy_runs_its_trials_end_to_end(tiny_bundle, monkeypatch):
    """The search with real pipelines (bf16 pretended here: where the CPU lacks it OpenVINO
    runs f32, so every trial keeps the answers and all-bf16 holds in one trial)."""
    import sdrun.apps.precision as precision

    monkeypatch.setattr(ovb, "has_bf16", lambda flags=None: True)
    monkeypatch.setattr(precision, "has_bf16", lambda flags=None: True)
    b = Bundle.load(tiny_bundle)
    pairs = [(f"s{i}", *make_pair(pair_rng(5, i))[:2]) for i in range(2)]
    report = precision.measure_policy(b, pairs, threads=1, min_speedup=0.0)
    assert len(report.trials) == 1 and report.trials[0].ok and report.trials[0].total == 2
    assert set(report.policy.values()) == {"bf16"}
    assert set(report.tolerance) == set(report.policy)
    assert all(t >= ovb.TOLERANCE["f32"] for t in report.tolerance.values())
    assert all(report.drift[k] for k in report.policy)
