"""`sdrun triton`: the repository's configs against the ONNX graphs, the python-backend
models in a fake Triton (this process), and the real `tritonserver` (from the
nvidia-pytriton wheel) answering over HTTP and gRPC as `sdrun diff` does."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient")
import fake_triton
from conftest import REAL_PAIRS, ROOT, free_port, sdrun
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from sdrun.apps.synth import write_synthetic_pairs
from sdrun.apps.triton_models import SpotdiffModel, check_tensor_exchange
from sdrun.apps.triton_repo import RepositoryOptions, served_graphs, write_repository
from sdrun.bundle import Bundle, sha256_file
from sdrun.errors import BundleError, SpotdiffError
from sdrun.pipeline import Pipeline

ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 7: "TYPE_INT64", 6: "TYPE_INT32",
                  2: "TYPE_UINT8", 3: "TYPE_INT8", 9: "TYPE_BOOL"}


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def triton_type(value: int) -> str:
    return model_config_pb2.DataType.Name(value)


def real_pairs() -> list[tuple[str, Path, Path]]:
    return [(p, REAL_PAIRS / f"{p}_1.png", REAL_PAIRS / f"{p}_2.png") for p in ("31795", "35333")]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> list[tuple[str, Path, Path]]:
    """The 2 real pairs and 6 synthetic ones."""
    out = tmp_path_factory.mktemp("triton-pairs")
    write_synthetic_pairs(out, 6, seed=11)
    synthetic = [(str(10000 + i), out / "data" / f"{10000 + i}_1.png", out / "data" / f"{10000 + i}_2.png")
                 for i in range(6)]
    return real_pairs() + synthetic


@pytest.fixture(scope="module")
def python_repo(tiny_bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repo"
    result = sdrun("triton", tiny_bundle, "--out", out, "--graphs", "python", "--max-batch", "6")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def expected(tiny_bundle, pairs) -> dict[str, dict]:
    """`sdrun diff --json` of every pair."""
    out = {}
    for pair_id, a, b in pairs:
        result = sdrun("diff", tiny_bundle, a, b, "--json")
        assert result.exit_code == 0, result.output
        out[pair_id] = json.loads(result.output)
    return out


def same_pair(got: dict, want: dict) -> None:
    """Label sets and objects exactly as `sdrun diff` gives them."""
    assert got["error"] is None, got["error"]
    for k in ("added", "removed", "changed", "objects", "change_score", "change_logit", "image_sizes"):
        assert got[k] == want[k], k


def close_pair(got: dict, want: dict) -> None:
    """The same label sets and objects, numbers within float noise: `sdrun diff` under
    numpy 2 against the same code under numpy 1 (a box edge may round the other way)."""
    assert got["error"] is None, got["error"]
    for k in ("added", "removed", "changed", "image_sizes"):
        assert got[k] == want[k], k
    assert got["change_score"] == pytest.approx(want["change_score"], abs=1e-5)
    assert len(got["objects"]) == len(want["objects"])
    for g, w in zip(got["objects"], want["objects"]):
        assert {k: g[k] for k in ("image", "index", "label", "status", "partner")} == \
            {k: w[k] for k in ("image", "index", "label", "status", "partner")}
        assert g["box"] == pytest.approx(w["box"], abs=0.01)
        for k in ("score", "fused_score", "hot_share"):
            assert g[k] == pytest.approx(w[k], abs=1e-5)


# ---- the onnxruntime form ---------------------------------------------------------------
def test_onnxruntime_configs_name_every_input_and_output_of_each_graph(tiny_bundle, tmp_path):
    import onnx

    out = tmp_path / "repo"
    result = sdrun("triton", tiny_bundle, "--out", out)
    assert result.exit_code == 0, result.output
    bundle = Bundle.load(tiny_bundle)
    graphs = served_graphs(bundle)
    assert [f"{m}_{g}" for m, g in graphs] == ["owlvit_image", "gdino_model", "siamese_pair", "clip_visual"]
    for model, graph in graphs:
        name = f"{model}_{graph}"
        config = parse_config(out / name / "config.pbtxt")
        proto = onnx.load(str(out / name / "1" / "model.onnx"), load_external_data=False)
        assert config.name == name and config.platform == "onnxruntime_onnx"
        assert sha256_file(out / name / "1" / "model.onnx") == \
            bundle.manifest["files"][bundle.model(model)["graphs"][graph]["file"]]["sha256"]
        assert config.max_batch_size == 32
        assert config.dynamic_batching.max_queue_delay_microseconds == 5000
        assert [(g.kind, g.count) for g in config.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_GPU, 1)]
        accel = config.optimization.execution_accelerators.gpu_execution_accelerator
        assert [a.name for a in accel] == ["tensorrt"]
        assert dict(accel[0].parameters)["precision_mode"] == "FP32"  # the tiny bundle has no fp16 engine

        for declared, values in ((config.input, proto.graph.input), (config.output, proto.graph.output)):
            initializers = {i.name for i in proto.graph.initializer}
            values = [v for v in values if v.name not in initializers]
            assert [t.name for t in declared] == [v.name for v in values], name
            for t, v in zip(declared, values):
                dims = v.type.tensor_type.shape.dim
                assert dims[0].dim_param and not dims[0].dim_value, f"{name}/{v.name}: first axis is the batch"
                want = [d.dim_value if d.dim_value else -1 for d in dims[1:]]
                assert triton_type(t.data_type) == ONNX_TO_TRITON[v.type.tensor_type.elem_type], (name, v.name)
                if want:
                    assert list(t.dims) == want, (name, v.name)
                else:  # a batch of scalars: Triton's dims [1] reshaped to []
                    assert list(t.dims) == [1] and t.HasField("reshape") and list(t.reshape.shape) == []

    spotdiff = parse_config(out / "spotdiff" / "config.pbtxt")
    assert spotdiff.backend == "python" and spotdiff.max_batch_size == 8
    assert [(i.name, triton_type(i.data_type), i.optional) for i in spotdiff.input] == [
        ("image_a", "TYPE_STRING", False), ("image_b", "TYPE_STRING", False),
        ("params", "TYPE_STRING", True), ("pair_id", "TYPE_STRING", True)]
    assert [(o.name, triton_type(o.data_type)) for o in spotdiff.output] == [("result", "TYPE_STRING")]
    assert spotdiff.parameters["spotdiff_content_id"].string_value == bundle.content_id
    record = json.loads((out / "repository.json").read_text())
    assert record["source_content_id"] == bundle.content_id
    assert sorted(record["files"]) == sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                                             if p.is_file() and p.name != "repository.json")


def bundle_with_engines(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A copy of the tiny bundle whose manifest records TensorRT engines (fake files): an
    fp16 engine of OWL-ViT that passed its check, one of Grounding DINO that failed."""
    root = tmp_path / "with-engines"
    shutil.copytree(tiny_bundle, root)
    manifest = json.loads((root / "manifest.json").read_text())
    key = "sm90-trt10.16.1-fp16"
    engine = root / "trt" / key / "owlvit_image.engine"
    engine.parent.mkdir(parents=True)
    engine.write_bytes(b"not a real engine")
    rel = engine.relative_to(root).as_posix()
    manifest["files"][rel] = {"sha256": sha256_file(engine), "bytes": engine.stat().st_size}
    owl = manifest["models"]["owlvit"]["graphs"]["image"]
    manifest["engines"] = {key: {"precision": "fp16", "graphs": {
        "owlvit/image": {"file": rel, "onnx_file": owl["file"],
                         "onnx_sha256": manifest["files"][owl["file"]]["sha256"],
                         "profiles": {"pixel_values": {"min": [1, 3, 128, 128], "opt": [4, 3, 128, 128],
                                                       "max": [16, 3, 128, 128]}},
                         "check": {"ok": True}},
        "gdino/model": {"failed": "golden check", "check": {"ok": False}}}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_fp16_where_the_bundle_says_so_and_tensorrt_plans_from_its_engines(tiny_bundle, tmp_path):
    root = bundle_with_engines(tiny_bundle, tmp_path)
    bundle = Bundle.load(root)
    out = tmp_path / "ort"
    write_repository(bundle, out)
    precision = {name: dict(parse_config(out / name / "config.pbtxt").optimization.execution_accelerators
                            .gpu_execution_accelerator[0].parameters)["precision_mode"]
                 for name in ("owlvit_image", "gdino_model", "siamese_pair", "clip_visual")}
    assert precision == {"owlvit_image": "FP16", "gdino_model": "FP32", "siamese_pair": "FP32", "clip_visual": "FP32"}

    plans = tmp_path / "plans"
    result = sdrun("triton", root, "--out", plans, "--engines", "sm90-trt10.16.1-fp16")
    assert result.exit_code == 0, result.output
    owl = parse_config(plans / "owlvit_image" / "config.pbtxt")
    assert owl.platform == "tensorrt_plan" and owl.max_batch_size == 16  # the engine's largest profile
    assert (plans / "owlvit_image" / "1" / "model.plan").read_bytes() == b"not a real engine"
    assert not owl.optimization.execution_accelerators.gpu_execution_accelerator
    gdino = parse_config(plans / "gdino_model" / "config.pbtxt")  # its engine failed: onnxruntime
    assert gdino.platform == "onnxruntime_onnx" and (plans / "gdino_model" / "1" / "model.onnx").is_file()
    spot = json.loads((plans / "spotdiff" / "1" / "bundle" / "manifest.json").read_text())
    assert "engines" not in spot and not any(f.startswith("trt/") for f in spot["files"])

    bad = sdrun("triton", root, "--out", tmp_path / "x", "--engines", "sm80-trt10.0.0-fp16")
    assert bad.exit_code != 0 and "no engines under 'sm80-trt10.0.0-fp16'" in bad.output
    assert "Traceback" not in bad.output
    both = sdrun("triton", root, "--out", tmp_path / "y", "--engines", "sm90-trt10.16.1-fp16", "--graphs", "python")
    assert both.exit_code != 0 and "graphs='onnxruntime'" in both.output


def test_the_output_folder_is_never_a_user_folder(tiny_bundle, tmp_path):
    out = tmp_path / "repo"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = sdrun("triton", tiny_bundle, "--out", out, "--graphs", "python")
    assert result.exit_code != 0 and "notes.txt" in result.output
    assert (out / "notes.txt").read_text() == "mine"
    inside = sdrun("triton", tiny_bundle, "--out", tiny_bundle / "triton", "--graphs", "python")
    assert inside.exit_code != 0 and not (tiny_bundle / "triton").exists()

    fresh = tmp_path / "fresh"
    assert sdrun("triton", tiny_bundle, "--out", fresh, "--graphs", "python").exit_code == 0
    first = json.loads((fresh / "repository.json").read_text())["files"]
    again = sdrun("triton", tiny_bundle, "--out", fresh)  # replaces its own earlier repository
    assert again.exit_code == 0, again.output
    assert not (fresh / "owlvit_image" / "1" / "model.py").exists()
    assert len(json.loads((fresh / "repository.json").read_text())["files"]) < len(first)


# ---- the python-backend models, in a fake Triton ------------------------------------------
def request(a: Path | bytes, b: Path | bytes, params: dict | str | None = None, pair_id: str | None = None):
    def data(x):
        return x if isinstance(x, bytes) else Path(x).read_bytes()

    out = {"image_a": np.array([[data(a)]], dtype=object), "image_b": np.array([[data(b)]], dtype=object)}
    if params is not None:
        out["params"] = np.array([[params if isinstance(params, str) else json.dumps(params)]], dtype=object)
    if pair_id is not None:
        out["pair_id"] = np.array([[pair_id.encode()]], dtype=object)
    return out


def answers(response) -> list[dict]:
    assert not response.has_error(), response.error().message()
    result = fake_triton.get_output_tensor_by_name(response, "result").as_numpy()
    return [json.loads(row[0]) for row in result]


def test_python_models_answer_as_sdrun_diff_in_a_fake_triton(monkeypatch, python_repo, pairs, expected, tiny_bundle):
    module = fake_triton.install(monkeypatch)
    server = fake_triton.FakeServer(python_repo, module)
    # several requests in one execute (Triton's dynamic batcher): one pass of the pipeline
    got = [answers(r)[0] for r in server.infer_many("spotdiff", [request(a, b, pair_id=p) for p, a, b in pairs])]
    for (pair_id, _, _), g in zip(pairs, got):
        same_pair(g, expected[pair_id])
        assert g["img_id"] == pair_id
    # 8 pairs = 32 detector views: sent in parts of max_batch_size 6
    assert server.calls["owlvit_image"] == [6, 6, 6, 6, 6, 2]
    assert server.calls["siamese_pair"] == [6, 2]

    # a request with two pairs, one of them broken: the other is still answered
    (pid, a, b), broken = pairs[0], b"\x89PNG\r\n\x1a\n" + b"\0" * 40
    two = {k: np.concatenate([v1, v2]) for (k, v1), v2 in
           zip(request(a, b).items(), request(a, broken).values())}
    first, second = answers(server.infer("spotdiff", two))
    same_pair(first, expected[pid])
    assert second["error"] and "image_b" in second["error"] and second["added"] == []

    # per-request parameters as `sdrun serve` takes them
    strict = answers(server.infer("spotdiff", request(a, b, params={"det_thr": 0.99})))[0]
    want = Pipeline.load(tiny_bundle, params={"det_thr": 0.99}).diff(a, b).to_json()
    assert strict["added"] == want["added"] and strict["objects"] == want["objects"]
    for params, words in (("{not json", "not valid JSON"), ({"det_thr": 7}, "det_thr"),
                          ({"owlvit_score_thr": 0.1}, "only these can be set per request")):
        response = server.infer("spotdiff", request(a, b, params=params))
        assert response.has_error() and words in response.error().message()
    missing = server.models["spotdiff"].execute([fake_triton.Request([fake_triton.Tensor(
        "image_a", np.array([[a.read_bytes()]], dtype=object))])])[0]
    assert missing.has_error() and "image_b" in missing.error().message()


def test_graph_model_joins_requests_and_reports_failures(monkeypatch, python_repo):
    module = fake_triton.install(monkeypatch)
    server = fake_triton.FakeServer(python_repo, module)
    rng = np.random.default_rng(0)
    x = rng.random((3, 2, 3, 224, 224), dtype=np.float32)
    alone = [server.infer("siamese_pair", {"pairs": x[i:i + 1]}) for i in range(3)]
    joined = server.infer_many("siamese_pair", [{"pairs": x[:2]}, {"pairs": x[2:]}])
    for name in ("heat", "logit"):
        together = np.concatenate([fake_triton.get_output_tensor_by_name(r, name).as_numpy() for r in joined])
        one_by_one = np.concatenate([fake_triton.get_output_tensor_by_name(r, name).as_numpy() for r in alone])
        np.testing.assert_array_equal(together, one_by_one)  # the CPU graph is batch-invariant
    wrong = server.infer_many("siamese_pair", [{"pairs": x[:1, :, :, :100]}])[0]
    assert wrong.has_error() and "siamese_pair" in wrong.error().message()


def test_a_repository_with_a_foreign_file_does_not_load(monkeypatch, tiny_bundle, tmp_path):
    fake_triton.install(monkeypatch)
    repo = tmp_path / "repo"
    write_repository(Bundle.load(tiny_bundle), repo, RepositoryOptions(graphs="python"))
    clip = repo / "clip_visual" / "1" / "model.onnx"
    shutil.copyfile(repo / "siamese_pair" / "1" / "model.onnx", clip)  # a graph from elsewhere
    args = {"model_config": json.dumps({"name": "spotdiff", "parameters": {}}),
            "model_repository": str(repo / "spotdiff"), "model_version": "1"}
    with pytest.raises(BundleError, match=r"clip_visual/1/model.onnx: sha256 .* not the .* this repository"):
        SpotdiffModel().initialize(args)
    module = sys.modules["triton_python_backend_utils"]
    with pytest.raises(BundleError, match="clip_visual/1/model.onnx"):
        fake_triton.FakeServer(repo, module)
    shutil.copyfile(tiny_bundle / "clip" / "visual.onnx", clip)
    SpotdiffModel().initialize(args)  # the right graph again: it loads
    params = repo / "spotdiff" / "1" / "bundle" / "params.json"
    params.write_text(params.read_text().replace("0.25", "0.3"))
    with pytest.raises(BundleError, match="params.json: sha256"):
        SpotdiffModel().initialize(args)


def test_a_backend_that_corrupts_numpy_arrays_is_refused(monkeypatch):
    module = fake_triton.install(monkeypatch)

    class Corrupting(fake_triton.Tensor):
        def as_numpy(self):  # Triton 2.51's stub under numpy 2: the first element everywhere
            return np.full_like(self._array, self._array.ravel()[0])

    module.Tensor = Corrupting
    with pytest.raises(SpotdiffError, match="corrupts numpy"):
        check_tensor_exchange(module)
    check_tensor_exchange(fake_triton.install(monkeypatch))  # a sound one passes


# ---- the real server ----------------------------------------------------------------------
def tritonserver_script():
    spec = importlib.util.spec_from_file_location("tritonserver_script", ROOT / "scripts" / "tritonserver.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server_dist():
    """tritonserver from the nvidia-pytriton wheel, kept in the user cache between runs."""
    script = tritonserver_script()
    try:
        return script, script.fetch(log=lambda m: None)
    except Exception as e:  # no package index here: CI has one, so it fails there
        if os.environ.get("CI"):
            raise
        pytest.skip(f"cannot get tritonserver from {script.WHEEL}: {e}")


def test_real_tritonserver_answers_as_sdrun_diff_over_http_and_grpc(server_dist, python_repo, pairs, expected,
                                                                     tiny_bundle, tmp_path):
    """Exactly `sdrun diff` run in the server's python environment (numpy < 2, see
    scripts/tritonserver.py), and within float noise of `sdrun diff` here (numpy 2)."""
    import subprocess

    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    script, dist = server_dist
    backend_python = script.backend_env(dist, log=lambda m: None) / "bin" / "python3"
    in_server_env = {}
    for pair_id, a, b in pairs:
        run = subprocess.run([str(backend_python), "-c", "import sys; from sdrun.cli import main; main()",
                              "diff", str(tiny_bundle), str(a), str(b), "--json"],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        in_server_env[pair_id] = json.loads(run.stdout)
        close_pair(in_server_env[pair_id], expected[pair_id])
    http_port, grpc_port = free_port(), free_port()
    log = tmp_path / "tritonserver.log"
    proc = script.start(python_repo, dist, http_port, grpc_port, log_file=log)
    try:
        try:
            script.wait_ready(proc, http_port, timeout_s=180)
        except RuntimeError as e:
            raise AssertionError(f"{e}\n{log.read_text()[-4000:]}") from None
        def client(protocol: str):
            """A client of its own for each caller: tritonclient's HTTP client is not thread-safe."""
            if protocol == "http":
                return httpclient, httpclient.InferenceServerClient(f"127.0.0.1:{http_port}", network_timeout=300.0)
            return grpcclient, grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")

        def ask(protocol: str, a: Path, b: Path, pair_id: str) -> dict:
            lib, c = client(protocol)
            inputs = []
            for name, value in (("image_a", a.read_bytes()), ("image_b", b.read_bytes()),
                                ("pair_id", pair_id.encode())):
                t = lib.InferInput(name, [1, 1], "BYTES")
                t.set_data_from_numpy(np.array([[value]], dtype=object))
                inputs.append(t)
            kwargs = {"client_timeout": 300.0} if protocol == "grpc" else {}
            try:
                result = c.infer("spotdiff", inputs, **kwargs).as_numpy("result")
            finally:
                c.close()
            return json.loads(result[0, 0])

        _, stats = client("http")
        for protocol in ("http", "grpc"):
            for pair_id, a, b in pairs:
                got = ask(protocol, a, b, pair_id)
                same_pair(got, in_server_env[pair_id])
                close_pair(got, expected[pair_id])
                assert got["img_id"] == pair_id

        # 16 concurrent requests (each pair twice, half over each protocol): all answered
        jobs = [("http" if k % 2 else "grpc", *pairs[k % len(pairs)]) for k in range(16)]
        before = stats.get_inference_statistics("spotdiff")["model_stats"][0]
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda j: ask(j[0], j[2], j[3], j[1]), jobs))
        for (_, pair_id, _, _), g in zip(jobs, got):
            same_pair(g, in_server_env[pair_id])
        after = stats.get_inference_statistics("spotdiff")["model_stats"][0]
        inferences = int(after["inference_count"]) - int(before["inference_count"])
        executions = int(after["execution_count"]) - int(before["execution_count"])
        assert inferences == 16 and executions < 16  # Triton batched pairs of different requests
        stats.close()
    finally:
        rc = script.stop(proc)
    assert proc.poll() is not None, "tritonserver still runs"
    assert rc == 0, log.read_text()[-3000:]
    assert not processes_of(python_repo), "python backend stubs outlived the server"


def processes_of(repo: Path) -> list[int]:
    """Pids of processes whose command line names `repo` (the python backend's stubs)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(repo) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found
