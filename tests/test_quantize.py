"""int8 bundles: dynamic quantisation of every graph, checked against PyTorch fp32 with
their own tolerances."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

from click.testing import CliRunner

from sdexport.cli import main as sdexport_main
from sdexport.quantize import (
    INT8_TOLERANCE,
    int8_name,
    max_abs_int8_weight,
    quantize_bundle,
)
from sdrun.apps.check import DEFAULT_REL_L2, check_bundle
from sdrun.backends.cpu import EXACT_WEIGHT_LIMIT, int8_kernel, isa_summary
from sdrun.bundle.bundle import Bundle


def test_int8_name():
    assert int8_name("owlvit/image.onnx") == "owlvit/image.int8.onnx"
    assert int8_name("gdino/model.onnx") == "gdino/model.int8.onnx"


@pytest.fixture(scope="module")
def int8_bundle(tiny_bundle, tmp_path_factory):
    return quantize_bundle(tiny_bundle, tmp_path_factory.mktemp("q") / "tiny-int8", log=lambda s: None)


def test_int8_bundle_manifest(int8_bundle, tiny_bundle):
    import onnx

    b = Bundle.load(int8_bundle)  # every sha256 verifies
    assert b.manifest["precision"] == "int8"
    fp32 = Bundle.load(tiny_bundle, verify=False)
    for model, entry in b.models.items():
        for graph, g in entry["graphs"].items():
            assert g["file"].endswith(".int8.onnx")
            assert g["precision"] == "int8"
            assert g["tolerance"]["rel_l2"] == INT8_TOLERANCE[(model, graph)]
            assert g["quantization"]["weight_type"] == "qint8"
            # 7-bit weights: exact on every x86 int8 kernel, VNNI or not (sdrun/backends/cpu.py)
            assert g["quantization"]["reduce_range"] is True
            assert g["quantization"]["max_abs_weight"] == max_abs_int8_weight(b.path(g["file"]))
            assert 0 < g["quantization"]["max_abs_weight"] <= EXACT_WEIGHT_LIMIT
            fp32_file = fp32.model(model)["graphs"][graph]["file"]
            assert fp32_file not in b.manifest["files"]  # no fp32 graphs in an int8 bundle
            assert not (int8_bundle / fp32_file).exists()
            ops = {n.op_type for n in onnx.load(str(b.path(g["file"]))).graph.node}
            assert ops & {"DynamicQuantizeMatMul", "MatMulInteger", "DynamicQuantizeLinear"}, (model, graph)
    host = b.manifest["build"]["quantized_on"]
    assert host["int8_kernel"] == int8_kernel() and host["isa"] == isa_summary()
    # the fp32 bundle is untouched
    assert fp32.manifest.get("precision", "fp32") == "fp32"
    Bundle.load(tiny_bundle)


def test_int8_check_uses_its_own_tolerance(int8_bundle):
    checks = list(check_bundle(Bundle.load(int8_bundle)))
    assert checks and all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert all(c.precision == "int8" and c.tolerance > DEFAULT_REL_L2 for c in checks)
    assert all("int8" in c.note for c in checks)
    # the drift is real: fp32's tolerance would fail it
    assert max(c.rel_l2 for c in checks) > DEFAULT_REL_L2


def test_sdrun_check_cli_prints_int8_tolerance(int8_bundle):
    from conftest import run_without_torch

    p = run_without_torch(["check", str(int8_bundle), "--json"])
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert rows and all(r["precision"] == "int8" and r["ok"] for r in rows)
    assert {r["tolerance"] for r in rows} <= set(INT8_TOLERANCE.values())


def test_info_says_where_int8_was_quantised(int8_bundle, tiny_bundle, tmp_path):
    from conftest import run_without_torch

    p = run_without_torch(["info", str(int8_bundle)])
    assert p.returncode == 0, p.stderr
    assert f"int8 kernel {int8_kernel()}" in p.stdout and "quantised on" in p.stdout
    assert "computed exactly by this CPU's kernel" in p.stdout
    assert "weights up to |" in p.stdout

    # an older int8 bundle with 8-bit weights warns on a CPU whose kernel clips them
    old = tmp_path / "old"
    quantize_bundle(tiny_bundle, old, log=lambda s: None, reduce_range=False)
    p = run_without_torch(["info", str(old)])
    clips = int8_kernel() in ("avx2", "avx512bw")
    assert ("WARNING" in p.stdout) is clips, p.stdout


def test_build_precision_option_checks_target(tmp_path):
    r = CliRunner().invoke(sdexport_main, ["build", "--preset", "tiny-random", "--precision", "fp16",
                                           "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "fp16" in r.output
    assert not (tmp_path / "x").exists()
    r = CliRunner().invoke(sdexport_main, ["build", "--help"])
    assert "int8" in r.output
