"""CI smoke test of the benchmark scripts on the tiny bundle: 2 pairs, 1 repeat, results in a
temporary folder (never benchmarks/results/)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("ensemble_boxes")

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _run(script: str, *args: str, timeout: float = 300) -> str:
    p = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, f"{script} failed:\n{p.stderr[-4000:]}"
    return p.stdout


@pytest.fixture(scope="module")
def latency(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    stdout = _run("latency.py", "--bundle", str(tiny_bundle), "--pairs", "2", "--repeats", "1",
                  "--warmup", "1", "--out-dir", str(out))
    return out, stdout, json.loads((out / f"latency_{tiny_bundle.name}.json").read_text())


def test_latency_smoke(latency, tiny_bundle):
    out, stdout, data = latency
    assert "| contender |" in stdout and "| stage |" in stdout  # the tables, printed last
    for ext in ("md", "png"):
        assert (out / f"latency_{tiny_bundle.name}.{ext}").stat().st_size > 0
    names = ["reference", "torch", "sdrun-fp32", "sdrun-int8", "sdrun-ov32", "sdrun-bf16"]
    s = data["summary"]
    assert list(s["per_contender"]) == names
    assert len(data["runs"]) == 2 * len(names)
    for n in names:
        assert s["per_contender"][n]["wall_s"]["median"] > 0
        assert s["per_contender"][n]["cpu_s"]["median"] > 0
        st = s["stages"][n]
        for stage in ("OWL-ViT", "Grounding DINO", "Siamese", "WBF", "preprocess"):
            assert st[stage]["median_s"] > 0, (n, stage)
        if s["per_contender"][n]["clip_crops"]["median"] > 0:
            assert st["CLIP"]["median_s"] > 0 and st["CLIP"]["gflop_per_pair"] > 0
        assert st["Grounding DINO"]["gflop_per_pair"] > 0 and st["Grounding DINO"]["gflops_per_s"] > 0
    assert s["ratios"]["reference/sdrun-fp32"]["median_paired"] > 0
    assert data["flops"]["peak"]["fp32_gflops"] > 0
    assert all(g["gflop"] > 0 for g in data["flops"]["graphs"].values())
    # the seed re-encodes its prompts: its OWL-ViT stage costs more FLOPs per pair
    assert (s["stages"]["reference"]["OWL-ViT"]["gflop_per_pair"]
            > s["stages"]["sdrun-fp32"]["OWL-ViT"]["gflop_per_pair"])
    assert data["machine"]["OMP_WAIT_POLICY"] == "PASSIVE"


def test_accuracy_smoke(tiny_bundle, tmp_path):
    stdout = _run("accuracy.py", "--bundle", str(tiny_bundle), "--pairs", "2",
                  "--contenders", "torch,sdrun-fp32,sdrun-int8", "--out-dir", str(tmp_path))
    assert "label sets identical" in stdout
    data = json.loads((tmp_path / f"accuracy_{tiny_bundle.name}.json").read_text())
    s = data["summary"]
    assert set(s) == {"torch", "sdrun-fp32", "sdrun-int8"}
    for name in ("torch", "sdrun-fp32"):  # fp32 answers equal the reference's
        assert s[name]["pairs"] == 2 and s[name]["identical_share"] == 1.0, s[name]
        assert s[name]["objects_ref"] > 0 and s[name]["iou_mean"] > 0.9
    assert 0.0 <= s["sdrun-int8"]["identical_share"] <= 1.0
    assert (tmp_path / f"accuracy_{tiny_bundle.name}.png").stat().st_size > 0


def test_accuracy_from_latency(latency, tiny_bundle, tmp_path):
    out, _, _ = latency
    _run("accuracy.py", "--bundle", str(tiny_bundle), "--from-latency",
         str(out / f"latency_{tiny_bundle.name}.json"), "--out-dir", str(tmp_path))
    s = json.loads((tmp_path / f"accuracy_{tiny_bundle.name}.json").read_text())["summary"]
    assert set(s) == {"torch", "sdrun-fp32", "sdrun-int8", "sdrun-ov32", "sdrun-bf16"}
    assert s["sdrun-ov32"]["identical_share"] == 1.0, s["sdrun-ov32"]  # OpenVINO f32: the reference's


def test_accuracy_against_sdrun_fp32(latency, tiny_bundle, tmp_path):
    """OpenVINO's contenders judged against onnxruntime fp32's answers (issue 25)."""
    out, _, _ = latency
    stdout = _run("accuracy.py", "--bundle", str(tiny_bundle), "--from-latency",
                  str(out / f"latency_{tiny_bundle.name}.json"), "--against", "sdrun-fp32",
                  "--out-dir", str(tmp_path), "--name", "acc32")
    assert "Accuracy against sdrun-fp32" in stdout
    data = json.loads((tmp_path / "acc32.json").read_text())
    assert data["against"] == "sdrun-fp32" and "sdrun-fp32" not in data["summary"]
    assert data["summary"]["sdrun-ov32"]["identical_share"] == 1.0
    assert data["summary"]["sdrun-ov32"]["score_diff_max"] < 1e-4


def test_coldstart_smoke(tiny_bundle, tmp_path):
    stdout = _run("coldstart.py", "--bundle", str(tiny_bundle), "--repeats", "1",
                  "--variants", "sdrun,torch,sdrun openvino", "--out-dir", str(tmp_path))
    assert "peak RSS" in stdout
    data = json.loads((tmp_path / f"coldstart_{tiny_bundle.name}.json").read_text())
    for v in ("sdrun", "torch", "sdrun openvino"):
        x = data["summary"][v]
        assert x["import_s"]["median"] > 0 and x["load_s"]["median"] > 0
        assert x["peak_rss_load_mib"]["median"] > 50
    assert data["ratios"]["peak_rss_sdrun_over_torch"] > 0


def test_graph_speed_smoke(tiny_bundle, tmp_path):
    from sdexport.quantize import quantize_bundle
    from sdrun.backends.cpu import int8_kernel

    int8 = quantize_bundle(tiny_bundle, tmp_path / "tiny-int8", log=lambda s: None)
    stdout = _run("graph_speed.py", "--fp32", str(tiny_bundle), "--int8", str(int8),
                  "--repeats", "2", "--model", "clip", "--model", "siamese", "--out-dir", str(tmp_path))
    assert "| graph |" in stdout and "int8 kernel" in stdout
    data = json.loads((tmp_path / f"graph_speed_tiny-int8_{int8_kernel()}.json").read_text())
    assert set(data["graphs"]) == {"clip/visual", "siamese/pair"}
    assert data["machine"]["isa"] and data["machine"]["int8_kernel"] == int8_kernel()
    for g in data["graphs"].values():
        assert len(g["fp32_s"]) == len(g["int8_s"]) == 2 and min(g["fp32_over_int8_paired"]) > 0


def test_flop_formulas():
    sys.path.insert(0, str(BENCH))
    try:
        import flops
    finally:
        sys.path.remove(str(BENCH))
    mm = flops.node_flops("MatMul", [{"float": [2, 10, 8]}, {"float": [8, 4]}], [{"float": [2, 10, 4]}])
    assert mm == 2 * 2 * 10 * 4 * 8
    conv = flops.node_flops("Conv", [{"float": [1, 3, 32, 32]}, {"float": [16, 3, 4, 4]}],
                            [{"float": [1, 16, 8, 8]}])
    assert conv == 2 * 16 * 8 * 8 * 3 * 4 * 4
    assert flops.node_flops("Add", [{"float": [4]}], [{"float": [4]}]) == 0


def test_gpu_script_is_valid_bash():
    p = subprocess.run(["bash", "-n", str(BENCH / "gpu.sh")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_update_docs_fills_only_the_marked_block(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text("# x\n\nbefore\n<!-- benchmarks:begin -->\nold table\n<!-- benchmarks:end -->\nafter\n")
    res = BENCH / "results"
    name = sorted(p.stem for p in res.glob("*.md"))[0]  # any committed result
    p = subprocess.run([sys.executable, str(BENCH / "update_docs.py"), name, "--page", str(page)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    text = page.read_text()
    assert text.startswith("# x\n\nbefore\n<!-- benchmarks:begin -->\n")
    assert text.endswith("<!-- benchmarks:end -->\nafter\n")
    assert "old table" not in text and (res / f"{name}.md").read_text().strip() in text
    p = subprocess.run([sys.executable, str(BENCH / "update_docs.py"), "no_such_result",
                        "--page", str(page)], capture_output=True, text=True)
    assert p.returncode != 0 and "no_such_result.md: missing" in p.stderr


def test_train_change_benchmark_smoke(tmp_path):
    pytest.importorskip("albumentations")
    _run("train_change.py", "--train-pairs", "20", "--heldout-pairs", "12", "--epochs", "1",
         "--batch-size", "8", "--backbone", "tiny-random", "--contenders", "patch-diff",
         "--tune-pairs", "8", "--timing", "tiny-random", "--timing-steps", "1", "--out-dir", str(tmp_path))
    report = json.loads((tmp_path / "train_change.json").read_text())
    run = report["contenders"]["patch-diff"]
    assert [e["epoch"] for e in run["epochs"]] == [0, 1] and report["heldout_pairs"] == 12
    assert 0.0 <= run["epochs"][1]["heldout"]["auc"] <= 1.0 and run["epochs"][1]["train_loss"] > 0
    assert {h["mode"] for h in report["tune"]["heads"]} == {"off", "detectors", "heads"}
    assert sum(report["tune"]["pairs"].values()) == 8
    assert report["step_seconds"]["tiny-random"] > 0
    assert (tmp_path / "train_change.md").is_file() and (tmp_path / "train_change.png").is_file()


def test_serve_load_benchmark_smoke(tiny_bundle, tmp_path):
    pytest.importorskip("fastapi")
    _run("serve_load.py", "--bundle", str(tiny_bundle), "--pairs", "3", "--clients", "3",
         "--requests", "6", "--settings", "default", "4", "--param", "det_thr=0.3",
         "--out-dir", str(tmp_path), "--name", "serve")
    report = json.loads((tmp_path / "serve.json").read_text())
    assert report["params"] == {"det_thr": 0.3}
    for setting in ("default", "4"):
        r = report["settings"][setting]
        assert r["sent"] == 6 and r["lost"] == 0 and r["wrong"] == 0
        assert 0 < r["rss_ready_gib"] <= r["rss_peak_gib"] and r["rss_after_gib"] > 0
    assert report["settings"]["default"]["mean_pairs"] == 1.0  # one pair per batch on CPU


def test_triton_load_benchmark_smoke(tiny_bundle, tmp_path):
    pytest.importorskip("tritonclient")
    _run("triton_load.py", "--bundle", str(tiny_bundle), "--pairs", "3", "--clients", "2",
         "--out-dir", str(tmp_path), "--name", "triton")
    report = json.loads((tmp_path / "triton.json").read_text())
    answers = report["sequential"] + report["concurrent"]
    assert len(report["sequential"]) == 3 and len(report["concurrent"]) == 3
    assert all(a["same_label_sets"] and a["same_objects"] and a["error"] is None for a in answers)
    assert 0 < report["server_rss_ready_bytes"] <= report["server_rss_peak_bytes"]
    assert report["sdrun_diff_peak_bytes"] > 0 and report["stop_rc"] == 0


def test_gridsample_benchmark_smoke(tmp_path):
    _run("gridsample_vs_gather.py", "--repeats", "1", "--out-dir", str(tmp_path))
    report = json.loads((tmp_path / "gridsample_vs_gather.json").read_text())
    assert all(v["max_abs_diff"] < 1e-4 for v in report["levels"].values())


def test_run_memory_and_graph_memory_benchmarks_smoke(tiny_bundle, tmp_path):
    from sdrun.apps.synth import write_synthetic_pairs

    write_synthetic_pairs(tmp_path / "pairs", 3, seed=2)
    _run("run_memory.py", "--bundle", str(tiny_bundle), "--data", str(tmp_path / "pairs"), "--batch-pairs", "3",
         "--param", "det_thr=0.3", "--memory-budget", "1", "--out-dir", str(tmp_path), "--name", "runmem")
    report = json.loads((tmp_path / "runmem.json").read_text())
    assert report["pairs"] == 3 and report["same_as_sdrun_diff"] == 3 and report["run_peak_rss_gib"] > 0
    _run("graph_memory.py", "--bundle", str(tiny_bundle), "--timing-rounds", "1", "--out-dir", str(tmp_path),
         "--name", "graphmem")
    report = json.loads((tmp_path / "graphmem.json").read_text())
    shrink = report["results"]["gdino/model"]["shrink"]
    assert shrink["per_input_bytes"] > 0 and shrink["measured"]["arena"] == "shrink"
    assert set(report["timing"]["seconds"]) == {"arena", "shrink"}
