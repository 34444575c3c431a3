"""The CPU facts behind int8 bundles, and start-up: `import sdrun` and `sdrun --help` load
none of the heavy libraries."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from sdrun.backends.cpu import (
    EXACT_WEIGHT_LIMIT,
    graph_max_abs_weight,
    int8_clipping_warning,
    int8_kernel,
    int8_saturates,
    isa_summary,
)

XEON_VNNI = frozenset("avx2 fma avx512f avx512bw avx512_vnni".split())
SKYLAKE_X = frozenset("avx2 fma avx512f avx512bw".split())
EPYC_ZEN2 = frozenset("avx2 fma f16c".split())
ALDER_LAKE = frozenset("avx2 fma avx_vnni".split())


def test_int8_kernel_per_cpu():
    assert int8_kernel(XEON_VNNI, "x86_64") == "vnni"
    assert int8_kernel(ALDER_LAKE, "x86_64") == "vnni"
    assert int8_kernel(SKYLAKE_X, "x86_64") == "avx512bw"
    assert int8_kernel(EPYC_ZEN2, "x86_64") == "avx2"
    assert int8_kernel(frozenset({"asimd", "asimddp"}), "aarch64") == "arm64"
    assert int8_kernel(frozenset({"sse4_2"}), "x86_64") == "other"
    assert isa_summary(EPYC_ZEN2) == "avx2 fma f16c"
    assert int8_kernel() in ("vnni", "avx512bw", "avx2", "arm64", "other")  # this machine


def emulate_u8s8_pairwise_int16(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """a (M,K) uint8 @ w (K,N) int8 the way AVX2's vpmaddubsw + vpmaddwd do it: adjacent
    products along K summed into a saturating int16, then into int32."""
    k = a.shape[1] + a.shape[1] % 2
    a = np.pad(a.astype(np.int32), ((0, 0), (0, k - a.shape[1])))
    w = np.pad(w.astype(np.int32), ((0, k - w.shape[0]), (0, 0)))
    pairs = a[:, 0::2, None] * w[None, 0::2, :] + a[:, 1::2, None] * w[None, 1::2, :]
    return np.clip(pairs, -32768, 32767).sum(axis=1)


@pytest.mark.parametrize("limit, exact", [(127, False), (EXACT_WEIGHT_LIMIT, True)])
def test_pairwise_int16_kernel_is_exact_only_for_7_bit_weights(limit, exact):
    rng = np.random.default_rng(0)
    a = rng.integers(200, 256, size=(8, 64), dtype=np.uint8)  # large activations, as after GELU
    w = rng.integers(limit // 2, limit + 1, size=(64, 16)).astype(np.int8)
    exact_product = a.astype(np.int64) @ w.astype(np.int64)
    assert np.array_equal(emulate_u8s8_pairwise_int16(a, w), exact_product) is exact
    assert int8_saturates("avx2", limit) is not exact
    assert not int8_saturates("vnni", limit) and not int8_saturates("arm64", limit)


def test_clipping_warning_names_the_graph():
    full = {"precision": "int8", "quantization": {"reduce_range": False}}  # an older bundle
    seven = {"precision": "int8", "quantization": {"reduce_range": True, "max_abs_weight": 64}}
    assert graph_max_abs_weight(full) == 127 and graph_max_abs_weight(seven) == 64
    assert graph_max_abs_weight({"precision": "fp32"}) is None
    msg = int8_clipping_warning(full, "owlvit/image", kernel="avx2")
    assert "owlvit/image" in msg and "avx2" in msg and "7-bit" in msg
    assert int8_clipping_warning(full, "owlvit/image", kernel="vnni") is None
    assert int8_clipping_warning(seven, "owlvit/image", kernel="avx2") is None


HEAVY = ("scipy", "scipy.optimize", "onnxruntime", "cv2", "torch", "tokenizers")


def loaded_modules(code: str) -> set[str]:
    code += "\nimport sys\nprint('\\nMODULES', *sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    return set(out.rsplit("MODULES", 1)[1].split())


def test_import_sdrun_loads_no_heavy_library():
    mods = loaded_modules("import sdrun")
    assert not mods & set(HEAVY), sorted(mods & set(HEAVY))
    assert "numpy" not in mods


def test_pipeline_import_leaves_scipy_until_matching():
    mods = loaded_modules("from sdrun import Pipeline")
    assert "scipy.optimize" not in mods and "onnxruntime" not in mods
    mods = loaded_modules("from sdrun.stages.matching import match_objects\n"
                          "import numpy as np\n"
                          "match_objects(np.zeros((1, 4)), ['car'], np.ones((1, 2)), np.zeros((1, 4)), "
                          "['car'], np.ones((1, 2)), alpha=0.5, iou_thr=0.1)")
    assert "scipy.optimize" in mods  # the solver still is scipy's, loaded on first use


def test_sdrun_help_loads_no_heavy_library():
    code = ("import sys\nsys.argv = ['sdrun', '--help']\nfrom sdrun.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass")
    mods = loaded_modules(code)
    assert not mods & {"scipy", "onnxruntime", "cv2", "torch"}, sorted(mods & set(HEAVY))
