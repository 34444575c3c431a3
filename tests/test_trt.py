"""TensorRT engines on the CPU: keys, building, cache lookup, rebuild on mismatch, fp16
pinning, fallback and provider errors, all against a fake `tensorrt` + CUDA runtime
(tests/fake_tensorrt.py) whose engines run the ONNX graphs with onnxruntime CPU."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import fake_tensorrt
import numpy as np
import pytest

from sdrun.bundle.bundle import Bundle, sha256_file
from sdrun.errors import ProviderError

KEY = "sm90-trt10.9.0-fp16"
REAL_PAIR = None


@pytest.fixture
def fake(monkeypatch):
    return fake_tensorrt.install(monkeypatch)


def _copy(src, tmp_path, name="b"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _manifest(root):
    return json.loads((root / "manifest.json").read_text())


def _quiet(_):
    pass


@pytest.fixture(scope="module")
def engine_bundle(tiny_bundle, tmp_path_factory):
    """The tiny bundle with fp16 engines for every graph, built on the fake sm90 + TRT 10.9."""
    from sdexport.engines import build_engines

    root = _copy(tiny_bundle, tmp_path_factory.mktemp("engines"))
    with pytest.MonkeyPatch.context() as mp:
        fake_tensorrt.install(mp)
        results = build_engines(root, "fp16", max_batch=2, log=_quiet)
        builds = list(fake_tensorrt.STATE.builds)
    return root, results, builds


# ---- keys --------------------------------------------------------------------------------
def test_engine_key_from_the_fake_gpu(fake):
    from sdrun.backends import trt

    assert trt.current_key("fp16") == KEY
    fake_tensorrt.STATE.arch = (8, 6)
    assert trt.current_key("fp32") == "sm86-trt10.9.0-fp32"
    assert trt.parse_key("sm120-trt11.4.0-fp16") == ("sm120", "11.4.0", "fp16")
    assert trt.engine_file(KEY, "owlvit", "image") == "trt/sm90-trt10.9.0-fp16/owlvit_image.engine"
    assert trt.gpu_info().name == "Fake H200"
    with pytest.raises(ValueError):
        trt.parse_key("sm90-fp16")
    with pytest.raises(ValueError):
        trt.engine_key("sm90", "10.9.0.34", "int8")


# ---- building ----------------------------------------------------------------------------
def test_build_writes_engines_manifest_and_sha256(engine_bundle):
    root, results, builds = engine_bundle
    assert {r.name for r in results} == {"owlvit/image", "owlvit/text", "gdino/model",
                                         "siamese/pair", "clip/visual"}
    assert all(r.status == "built" for r in results)
    m = _manifest(root)
    section = m["engines"][KEY]
    assert section["gpu"] == "sm90" and section["tensorrt"] == "10.9.0.34"
    assert section["precision"] == "fp16" and section["tolerance"] == {"rel_l2": 0.01}
    for name, e in section["graphs"].items():
        model, graph = name.split("/")
        assert e["file"] == f"trt/{KEY}/{model}_{graph}.engine"
        assert m["files"][e["file"]]["sha256"] == sha256_file(root / e["file"])
        assert m["files"][e["pinned_file"]]["sha256"] == sha256_file(root / e["pinned_file"])
        assert e["onnx_sha256"] == m["files"][e["onnx_file"]]["sha256"]
        assert e["check"]["ok"] and e["check"]["max_rel_l2"] <= 1e-2
    Bundle.load(root)  # every listed file, engines included, verifies
    # profiles: batch axis (1, typical, max) for 2 pairs per call; other axes as in the bundle
    gd = section["graphs"]["gdino/model"]["profiles"]
    assert gd["pixel_values"] == {"min": [1, 3, 256, 256], "opt": [4, 3, 256, 256],
                                  "max": [8, 3, 256, 256]}
    assert set(gd) == {"pixel_values"}  # the prompt and the pixel mask are folded in
    assert section["graphs"]["siamese/pair"]["profiles"]["pairs"]["max"][0] == 2
    assert section["graphs"]["clip/visual"]["profiles"]["crops"]["max"][0] == 64
    # the builds asked for fp16 with TF32 off, and pinned layers obeyed
    assert all("FP16" in b["flags"] and "TF32" not in b["flags"] for b in builds)
    assert any("OBEY_PRECISION_CONSTRAINTS" in b["flags"] for b in builds)


def test_fp16_failure_rebuilds_with_pinned_fp32_layers(engine_bundle):
    """The fake fails fp16 unless normalization layers are pinned: the first build of each
    graph fails its golden check, the second pins them and passes; what was pinned is recorded."""
    root, results, builds = engine_bundle
    assert all(r.stage == "normalization+sampling" for r in results)
    assert len(builds) == 2 * len(results)
    section = _manifest(root)["engines"][KEY]["graphs"]
    clip = section["clip/visual"]
    assert clip["pinned_fp32"] == ["normalization"] and clip["pinned_layers"] >= 1
    layers = json.loads((root / clip["pinned_file"]).read_text())["layers"]
    assert set(layers.values()) == {"normalization"}
    assert "/visual/ln_pre/LayerNormalization" in layers and "/ReduceL2" in layers
    gd = section["gdino/model"]
    assert set(gd["pinned_fp32"]) == {"normalization", "grid_sample", "deformable"}
    gd_layers = json.loads((root / gd["pinned_file"]).read_text())["layers"]
    assert any(n.endswith("GridSample") for n in gd_layers)
    assert gd["pinned_counts"]["grid_sample"] >= 1


def test_pinning_widens_until_the_check_passes(tiny_bundle, tmp_path, fake, monkeypatch):
    from sdexport.engines import build_engines

    root = _copy(tiny_bundle, tmp_path)
    monkeypatch.setattr(fake_tensorrt, "FP16_UNSAFE", {"SOFTMAX"})
    (r,) = build_engines(root, "fp16", max_batch=2, models=["clip"], log=_quiet)
    assert (r.status, r.stage) == ("built", "wide")
    e = _manifest(root)["engines"][KEY]["graphs"]["clip/visual"]
    assert "softmax" in e["pinned_fp32"]
    # a failure only an all-fp32 build avoids
    monkeypatch.setattr(fake_tensorrt, "FP16_UNSAFE", {"CONVOLUTION"})
    (r,) = build_engines(root, "fp16", max_batch=2, models=["clip"], force=True, log=_quiet)
    assert (r.status, r.stage) == ("built", "all")
    assert "FP16" not in fake_tensorrt.STATE.builds[-1]["flags"]
    assert _manifest(root)["engines"][KEY]["graphs"]["clip/visual"]["pinned_fp32"] == ["all"]


def test_graph_failing_every_stage_is_recorded_not_used(tiny_bundle, tmp_path, fake):
    from sdexport.engines import build_engines
    from sdrun.backends.session import open_graph
    from sdrun.backends.trt import EngineError

    root = _copy(tiny_bundle, tmp_path)
    fake_tensorrt.STATE.fail_always = True
    (r,) = build_engines(root, "fp16", max_batch=1, models=["siamese"], log=_quiet)
    assert r.status == "failed"
    e = _manifest(root)["engines"][KEY]["graphs"]["siamese/pair"]
    assert "file" not in e and "golden check failed" in e["failed"]
    assert not list((root / "trt" / KEY).glob("*.engine*"))
    with pytest.raises(EngineError, match="failed its golden check"):
        open_graph(Bundle.load(root), "siamese", "pair", provider="tensorrt")


def test_strongly_typed_tensorrt11_path(tiny_bundle, tmp_path, fake, monkeypatch):
    """TensorRT 11 has no FP16 flag or layer precisions: the ONNX graph is converted to fp16
    with the pinned nodes kept in fp32, then built strongly typed."""
    import onnx

    from sdexport.engines import build_engines

    monkeypatch.delattr(fake_tensorrt.BuilderFlag, "FP16")
    monkeypatch.delattr(fake_tensorrt.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS")
    monkeypatch.setattr(fake_tensorrt, "__version__", "11.4.0.106")
    root = _copy(tiny_bundle, tmp_path)
    (r,) = build_engines(root, "fp16", max_batch=1, models=["clip"], log=_quiet)
    assert (r.status, r.stage) == ("built", "normalization+sampling")
    e = _manifest(root)["engines"]["sm90-trt11.4.0-fp16"]["graphs"]["clip/visual"]
    assert e["typing"] == "strong" and e["pinned_fp32"] == ["normalization"]
    model = onnx.load_from_string(fake_tensorrt.STATE.parsed[-1])
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)


# ---- running engines -----------------------------------------------------------------------
def test_check_bundle_runs_the_engines(engine_bundle, fake):
    from sdrun.apps.check import check_bundle

    root, _, _ = engine_bundle
    results = list(check_bundle(Bundle.load(root), provider="tensorrt"))
    assert {(r.model, r.graph) for r in results} == {
        ("owlvit", "image"), ("owlvit", "text"), ("gdino", "model"), ("siamese", "pair"),
        ("clip", "visual")}
    assert all(r.ok and r.tolerance == 1e-2 for r in results), [r for r in results if not r.ok]
    assert max(r.rel_l2 for r in results) > 1e-6  # fp16 rounding is visible: engines really ran
    assert fake_tensorrt.STATE.streams == 1  # one stream for the whole check


def test_pipeline_on_engines_matches_cpu(engine_bundle, tmp_path, fake):
    """fp32 engines (the fake runs onnxruntime underneath) give the CPU pipeline's answers;
    all engines of a pipeline share one CUDA stream; pinned host buffers are reused."""
    from conftest import REAL_PAIRS

    from sdexport.engines import build_engines
    from sdrun import Pipeline
    from sdrun.backends.trt import TrtModel

    root = _copy(engine_bundle[0], tmp_path)
    build_engines(root, "fp32", max_batch=2, log=_quiet)
    m = _manifest(root)
    assert {KEY, "sm90-trt10.9.0-fp32"} <= set(m["engines"])
    streams = fake_tensorrt.STATE.streams
    pipe = Pipeline.load(root, provider="tensorrt:fp32")
    engine = pipe.models["owlvit"].graph.model  # inside the memory budget's chunking
    assert isinstance(engine, TrtModel) and engine.key == "sm90-trt10.9.0-fp32"
    assert fake_tensorrt.STATE.streams == streams + 1
    cpu = Pipeline.load(root, provider="cpu")
    a, b = REAL_PAIRS / "31795_1.png", REAL_PAIRS / "31795_2.png"
    pairs = [("p1", a, b), ("p2", b, a), ("p3", a, a)]
    got = [r.to_json() for r in pipe.run(pairs, batch_pairs=3)]
    want = [r.to_json() for r in cpu.run(pairs, batch_pairs=3)]
    assert got == want
    # fp16 preferred when no precision is named
    assert Pipeline.load(root, provider="tensorrt").models["clip"].graph.key == KEY


def test_batch_above_the_profile_runs_in_chunks(engine_bundle, fake):
    from sdrun.backends.session import OnnxModel, open_graph

    root, _, _ = engine_bundle
    b = Bundle.load(root)
    sess = open_graph(b, "siamese", "pair", provider="tensorrt")
    assert sess.max_batch == 2
    x = np.random.default_rng(0).standard_normal((5, 2, 3, 224, 224)).astype(np.float32)
    fake_tensorrt.STATE.executions.clear()
    out = sess.run({"pairs": x})
    assert [e["pairs"][0] for e in fake_tensorrt.STATE.executions] == [2, 2, 1]
    ref = OnnxModel(b.path("siamese/pair.onnx")).run({"pairs": x})
    for k in ("heat", "logit"):
        assert out[k].shape == ref[k].shape
        assert np.linalg.norm(out[k] - ref[k]) / np.linalg.norm(ref[k]) < 1e-2
    sess.close()
    assert not fake_tensorrt.STATE.device  # device buffers freed


def test_pipeline_is_thread_safe_on_engines(engine_bundle, fake):
    from concurrent.futures import ThreadPoolExecutor

    from sdrun.backends.session import open_graph

    root, _, _ = engine_bundle
    sess = open_graph(Bundle.load(root), "clip", "visual", provider="tensorrt")
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((n, 3, 224, 224)).astype(np.float32) for n in (1, 3, 2, 4)]
    refs = [sess.run({"crops": x})["embeds"] for x in xs]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda x: sess.run({"crops": x})["embeds"], xs * 3))
    for o, r in zip(outs, refs * 3):
        np.testing.assert_array_equal(o, r)


# ---- cache lookup, mismatch, rebuild, fallback ------------------------------------------------
def test_mismatched_gpu_or_tensorrt_is_a_clear_error(engine_bundle, fake, monkeypatch):
    from sdrun.backends.session import open_graph
    from sdrun.backends.trt import EngineError

    root, _, _ = engine_bundle
    b = Bundle.load(root)
    fake_tensorrt.STATE.arch = (8, 6)
    with pytest.raises(EngineError) as e:
        open_graph(b, "clip", "visual", provider="tensorrt")
    msg = str(e.value)
    for part in ("sm86-trt10.9.0-fp16", f"{KEY} (5 graphs)", "sdexport engines",
                 "--precision fp16", "--allow-onnx-fallback"):
        assert part in msg, msg
    fake_tensorrt.STATE.arch = (9, 0)
    monkeypatch.setattr(fake_tensorrt, "__version__", "10.16.1.11")
    with pytest.raises(EngineError, match="sm90-trt10.16.1-fp16"):
        open_graph(b, "clip", "visual", provider="tensorrt")


def test_engine_that_does_not_deserialize_is_a_clear_error(engine_bundle, fake, monkeypatch):
    """Same key, but this TensorRT build cannot load the file (another build number)."""
    from sdrun.backends.session import open_graph
    from sdrun.backends.trt import EngineError

    root, _, _ = engine_bundle
    monkeypatch.setattr(fake_tensorrt, "__version__", "10.9.0.99")
    engine = open_graph(Bundle.load(root), "clip", "visual", provider="tensorrt")  # opens lazily
    with pytest.raises(EngineError, match="cannot load this engine"):
        engine.open()


def test_onnx_fallback_only_when_allowed(engine_bundle, fake, monkeypatch):
    import onnxruntime as ort

    from sdrun.backends.session import OnnxModel, open_graph
    from sdrun.backends.trt import EngineFallbackWarning

    root, _, _ = engine_bundle
    b = Bundle.load(root)
    fake_tensorrt.STATE.arch = (8, 9)
    # onnxruntime here is the CPU build: the fallback is impossible, and says so
    with pytest.raises(ProviderError, match="fallback is not possible either.*onnxruntime-gpu"):
        open_graph(b, "clip", "visual", provider="tensorrt", allow_onnx_fallback=True)
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.warns(EngineFallbackWarning, match=r"sm89-trt10.9.0-fp16.*onnxruntime CUDA"):
        sess = open_graph(b, "clip", "visual", provider="tensorrt", allow_onnx_fallback=True)
    assert isinstance(sess, OnnxModel) and sess.provider == "cuda"  # the GPU, never the CPU
    assert sess.path == b.path("clip/visual.onnx")


def test_stale_engine_is_not_used(engine_bundle, tmp_path, fake):
    from sdrun.backends.session import open_graph
    from sdrun.backends.trt import EngineError

    root = _copy(engine_bundle[0], tmp_path)
    m = _manifest(root)
    m["engines"][KEY]["graphs"]["clip/visual"]["onnx_sha256"] = "0" * 64
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="stale: it was built from another version of clip/visual.onnx"):
        open_graph(Bundle.load(root), "clip", "visual", provider="tensorrt")


def test_engines_command_caches_and_rebuilds_on_mismatch(engine_bundle, tmp_path, fake):
    from sdexport.engines import build_engines

    root = _copy(engine_bundle[0], tmp_path)
    before = _manifest(root)["engines"][KEY]
    # same GPU and TensorRT: every graph is cached, nothing is built
    res = build_engines(root, "fp16", max_batch=2, log=_quiet)
    assert {r.status for r in res} == {"cached"} and not fake_tensorrt.STATE.builds
    # another GPU: its key is built, the sm90 engines stay (files and sha256 untouched)
    fake_tensorrt.STATE.arch = (8, 6)
    res = build_engines(root, "fp16", max_batch=2, models=["clip", "siamese"], log=_quiet)
    assert {r.status for r in res} == {"built"}
    m = _manifest(root)
    assert set(m["engines"]) == {KEY, "sm86-trt10.9.0-fp16"}
    assert m["engines"][KEY]["graphs"] == before["graphs"]
    assert (root / f"trt/{KEY}/clip_visual.engine").is_file()
    assert (root / "trt/sm86-trt10.9.0-fp16/clip_visual.engine").is_file()
    Bundle.load(root)
    # a stale engine of this key (its ONNX changed) and another batch size are rebuilt
    m["engines"]["sm86-trt10.9.0-fp16"]["graphs"]["clip/visual"]["onnx_sha256"] = "0" * 64
    (root / "manifest.json").write_text(json.dumps(m))
    n = len(fake_tensorrt.STATE.builds)
    res = {r.name: r.status for r in build_engines(root, "fp16", max_batch=2,
                                                    models=["clip", "siamese"], log=_quiet)}
    assert res == {"clip/visual": "built", "siamese/pair": "cached"}
    res = {r.name: r.status for r in build_engines(root, "fp16", max_batch=3,
                                                    models=["siamese"], log=_quiet)}
    assert res == {"siamese/pair": "built"} and len(fake_tensorrt.STATE.builds) > n
    m = _manifest(root)
    assert m["engines"]["sm86-trt10.9.0-fp16"]["graphs"]["siamese/pair"]["profiles"]["pairs"]["max"][0] == 3
    Bundle.load(root)


def test_engine_files_are_verified_by_bundle_load(engine_bundle, tmp_path):
    from sdrun.errors import BundleError

    root = _copy(engine_bundle[0], tmp_path)
    f = root / f"trt/{KEY}/clip_visual.engine"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="clip_visual.engine: sha256"):
        Bundle.load(root)


# ---- providers that are absent ----------------------------------------------------------------
def test_absent_gpu_providers_are_errors_never_cpu(engine_bundle, monkeypatch):
    from sdrun.backends.session import open_graph

    b = Bundle.load(engine_bundle[0], verify=False)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ProviderError, match="TensorRT's Python package.*pip install tensorrt"):
        open_graph(b, "clip", "visual", provider="tensorrt")
    with pytest.raises(ProviderError, match="pip install onnxruntime-gpu"):
        open_graph(b, "clip", "visual", provider="cuda")
    with pytest.raises(ProviderError, match="unknown provider"):
        open_graph(b, "clip", "visual", provider="gpu")
    fake_tensorrt.install(monkeypatch, cuda=False)
    with pytest.raises(ProviderError, match="cuda-python or CuPy.*pip install cuda-python"):
        open_graph(b, "clip", "visual", provider="tensorrt")
    fake_tensorrt.install(monkeypatch)
    fake_tensorrt.STATE.device_count = 0
    with pytest.raises(ProviderError, match="no usable CUDA device.*cudaErrorNoDevice"):
        open_graph(b, "clip", "visual", provider="tensorrt", allow_onnx_fallback=True)


def test_cli_errors_and_fallback_flag(engine_bundle, fake):
    from click.testing import CliRunner
    from conftest import REAL_PAIRS

    from sdrun.cli import main

    root, _, _ = engine_bundle
    a, b = str(REAL_PAIRS / "31795_1.png"), str(REAL_PAIRS / "31795_2.png")
    runner = CliRunner()
    res = runner.invoke(main, ["diff", str(root), a, b, "--provider", "tensorrt:fp16"])
    assert res.exit_code == 0, res.output
    assert "added" in res.output
    fake_tensorrt.STATE.arch = (8, 6)
    res = runner.invoke(main, ["diff", str(root), a, b, "--provider", "tensorrt"])
    assert res.exit_code == 2 and "no usable TensorRT engine" in res.output
    assert "sdexport engines" in res.output and "Traceback" not in res.output
    res = runner.invoke(main, ["diff", str(root), a, b, "--provider", "tensorrt",
                               "--allow-onnx-fallback"])
    assert res.exit_code == 2 and "fallback is not possible either" in res.output
    res = runner.invoke(main, ["check", str(root), "--provider", "cuda"])
    assert res.exit_code == 2 and "onnxruntime-gpu" in res.output


def test_sdexport_engines_cli(tiny_bundle, tmp_path, fake):
    from click.testing import CliRunner

    from sdexport.cli import main

    root = _copy(tiny_bundle, tmp_path)
    res = CliRunner().invoke(main, ["engines", str(root), "--precision", "fp32", "--model", "clip",
                                    "--max-batch", "1"])
    assert res.exit_code == 0, res.output
    assert "sm90-trt10.9.0-fp32" in res.output and "clip/visual" in res.output
    fake_tensorrt.STATE.fail_always = True
    res = CliRunner().invoke(main, ["engines", str(root), "--precision", "fp16", "--model",
                                    "siamese"])
    assert res.exit_code == 1 and "failed their golden check" in res.output


# ---- without TensorRT at all ------------------------------------------------------------------
BLOCK = textwrap.dedent("""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "transformers", "timm", "open_clip", "sdexport",
                                      "tensorrt", "cuda", "cupy", "pycuda"}:
                raise ImportError(f"blocked in this test: {name}")
    sys.meta_path.insert(0, _Block())
""")


def test_import_and_cpu_run_without_tensorrt_or_cuda(engine_bundle, tmp_path):
    """A bundle with engines still runs on the CPU where tensorrt, cuda-python and CuPy
    cannot even be imported; `import sdrun` does not import them."""
    from conftest import REAL_PAIRS

    data = tmp_path / "data"
    data.mkdir()
    for k in (1, 2):
        shutil.copy(REAL_PAIRS / f"31795_{k}.png", data / f"31795_{k}.png")
    code = BLOCK + textwrap.dedent(f"""
        import sdrun, sdrun.backends.session, sdrun.backends.trt, sdrun.apps.check
        assert not any(m.split(".")[0] in ("tensorrt", "cuda", "cupy") for m in sys.modules)
        sys.argv = ["sdrun", "run", {str(engine_bundle[0])!r}, "--data", {str(tmp_path)!r},
                    "--out", {str(tmp_path / "sub.csv")!r}, "--quiet"]
        from sdrun.cli import main
        main()
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "sub.csv").read_text().startswith("img_id,added_objs")


def test_sdexport_build_target_trt(tiny_bundle, tmp_path, fake, monkeypatch):
    """`sdexport build --target trt` exports, then builds this GPU's engines; without TensorRT
    it stops before the (long) export."""
    from click.testing import CliRunner

    import sdexport.build
    from sdexport.cli import main

    exported = []

    def fake_export(out, *args, **kwargs):  # the export itself is tested in test_export.py
        exported.append(out)
        shutil.copytree(tiny_bundle, out)
        return out

    monkeypatch.setattr(sdexport.build, "build_bundle", fake_export)
    out = tmp_path / "b"
    res = CliRunner().invoke(main, ["build", "--preset", "tiny-random", "--out", str(out),
                                    "--target", "trt", "--precision", "fp32", "--max-batch", "1"])
    assert res.exit_code == 0, res.output
    assert set(_manifest(out)["engines"]) == {"sm90-trt10.9.0-fp32"}
    Bundle.load(out)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    res = CliRunner().invoke(main, ["build", "--preset", "tiny-random", "--out",
                                    str(tmp_path / "c"), "--target", "trt"])
    assert res.exit_code == 2 and "pip install tensorrt" in res.output
    assert len(exported) == 1


def test_unknown_model_is_named(tiny_bundle, fake):
    from sdexport.engines import EngineBuildError, build_engines

    with pytest.raises(EngineBuildError, match="no model or graph owlvit/imag .*owlvit/image"):
        build_engines(tiny_bundle, models=["owlvit/imag"], log=_quiet)
