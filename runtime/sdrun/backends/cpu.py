"""What this CPU is, as far as onnxruntime's kernels care: its model name, its
instruction-set flags and which integer kernel runs an int8 MatMul.

onnxruntime's x86 int8 GEMM (MLAS, u8 activations x s8 weights) has two families:

- VNNI (AVX512-VNNI, AVX-VNNI) and AMX multiply and add four u8*s8 products straight
  into int32: exact for any weights.
- AVX2 and AVX-512 without VNNI use `vpmaddubsw`, which adds two u8*s8 products into a
  *saturating int16* first: with 8-bit weights, 255*127*2 = 64770 overflows int16 and the
  result is silently clipped. 7-bit weights ("reduce_range", |w| <= 64) keep every pair
  within 255*64*2 = 32640, so the sum is exact there too.

aarch64's dot-product kernels accumulate in int32 and are exact.
"""
from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

# The largest |weight| for which every x86 int8 kernel is exact (see above).
EXACT_WEIGHT_LIMIT = 64
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@lru_cache(maxsize=1)
def cpu_info() -> dict[str, str]:
    """{"model": ..., "flags": "sorted space-separated flags"} from /proc/cpuinfo ({} elsewhere)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model", "CPU part") and "model" not in info:
                info["model"] = value.strip()
            elif key in ("flags", "Features") and "flags" not in info:
                info["flags"] = " ".join(sorted(value.split()))
    except OSError:
        pass
    return info


def default_threads() -> int:
    """Threads per model call when none is given: SDRUN_THREADS, else 0 (the runtime picks:
    one per physical core)."""
    env = os.environ.get("SDRUN_THREADS")
    return int(env) if env else 0


def cpu_flags() -> frozenset[str]:
    return frozenset(cpu_info().get("flags", "").split())


def int8_kernel(flags: frozenset[str] | None = None, machine: str | None = None) -> str:
    """The family of int8 GEMM kernel onnxruntime picks here: 'vnni' (exact), 'avx512bw' or
    'avx2' (pairwise int16 saturation unless the weights are 7-bit), 'arm64' (exact) or
    'other'."""
    flags = cpu_flags() if flags is None else flags
    machine = (machine or platform.machine()).lower()
    if machine in ("aarch64", "arm64"):
        return "arm64"
    if any(f in flags for f in _VNNI_FLAGS):
        return "vnni"
    if "avx512bw" in flags:
        return "avx512bw"
    if "avx2" in flags:
        return "avx2"
    return "other"


def int8_saturates(kernel: str, max_abs_weight: int) -> bool:
    """Whether int8 weights as large as `max_abs_weight` can be clipped by `kernel`."""
    return kernel in ("avx2", "avx512bw") and max_abs_weight > EXACT_WEIGHT_LIMIT


def isa_summary(flags: frozenset[str] | None = None) -> str:
    """The flags that decide onnxruntime's kernels, e.g. 'avx2 avx512f avx512bw avx512_vnni'."""
    flags = cpu_flags() if flags is None else flags
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
              "avx512_bf16", "amx_bf16", "amx_int8", "asimd", "asimddp", "sve")
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/neon"


def graph_max_abs_weight(graph_entry: dict) -> int | None:
    """The largest |int8 weight| an int8 graph entry of a manifest records (older bundles
    record only `reduce_range`: 64 with it, 127 without); None for a float graph."""
    if graph_entry.get("precision") != "int8":
        return None
    q = graph_entry.get("quantization", {})
    if "max_abs_weight" in q:
        return int(q["max_abs_weight"])
    return EXACT_WEIGHT_LIMIT if q.get("reduce_range") else 127


def int8_clipping_warning(graph_entry: dict, name: str, kernel: str | None = None) -> str | None:
    """A warning when this CPU's int8 kernel clips the graph's weights, else None."""
    peak = graph_max_abs_weight(graph_entry)
    kernel = kernel or int8_kernel()
    if peak is None or not int8_saturates(kernel, peak):
        return None
    return (f"{name}: int8 weights up to |{peak}| on a CPU without VNNI ({kernel}): onnxruntime's "
            f"int8 kernel clips them here and the outputs drift far from fp32; re-quantise the "
            f"bundle with 7-bit weights (the default of `python -m sdexport.quantize`) or use fp32")
