"""Model calls that fit the memory they can get.

A graph's call costs about `fixed + batch * per_input` bytes beyond what the process holds
when idle (its activations). `sdexport build` measures both numbers for every graph the
pipeline runs and records them in the manifest (`graphs[g]["memory"]`); bundles built
before that get the conservative `FALLBACK_COSTS` of the model's kind.

A `MemoryBudget` is the number of bytes the model calls of one `Pipeline` may use at once:
given (`--memory-budget`, `Pipeline(memory_budget=...)`) or a share of what the process can
get (`available_memory`: the cgroup's limit or MemAvailable on CPU, free device memory on
a GPU). `BudgetedModel` splits every call into chunks of at most `max_batch` inputs and
reserves their bytes from the budget while they run, so threads sharing a pipeline never
exceed it together. Splitting never changes an answer: each input's outputs are the same
bits whatever else shares its call (tests/test_memory.py).
"""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import SpotdiffError
from .interface import runs_on_cpu

# Shares of the memory the process can get that its model calls may use by default. On a
# CPU a batch larger than a few inputs gains nothing (the cores are busy at batch 1), so
# the budget only has to leave room for the weights, the images and other processes; on a
# GPU batches pay off, and the device memory is the graphs' alone.
CPU_SHARE = 0.25
GPU_SHARE = 0.6
# When nothing can be read (no /proc, no cgroup, no nvidia-smi): assume this much is there.
UNKNOWN_AVAILABLE = 8 * 2**30

# Bytes per call of graphs whose bundle records no measurement (built before it was
# measured; `sdexport measure-memory` adds it), per model kind: twice the full-size models'
# measured costs (onnxruntime CPU, fp32, arena shrunk after each run, AMD EPYC:
# benchmarks/results/graph_memory_full_epyc-avx2.md). Larger than a smaller model needs,
# which only makes its chunks smaller than they could be.
FALLBACK_COSTS = {  # model: (fixed_bytes, per_input_bytes)
    "owlvit": (64 * 2**20, 112 * 2**20),
    "gdino": (300 * 2**20, 840 * 2**20),
    "siamese": (32 * 2**20, 52 * 2**20),
    "clip": (16 * 2**20, 8 * 2**20),
}
DEFAULT_FALLBACK = (300 * 2**20, 840 * 2**20)
# Whether a graph's outputs for an input keep their bits whatever else shares the call,
# for bundles that record no measurement (Grounding DINO's and the Siamese ViT's do not on
# onnxruntime CPU).
FALLBACK_INVARIANT = {"owlvit": True, "siamese": False, "clip": True}


class MemoryBudgetError(SpotdiffError):
    """A memory budget that cannot be read or used."""


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str | int | float, source: str = "--memory-budget") -> int:
    """Bytes from '6G', '6GB', '6GiB', '512M', '0.5g' (powers of 1024) or a plain number of bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
        if not math.isfinite(value) or value <= 0:
            raise MemoryBudgetError(f"{source}: {text!r} must be a positive number of bytes")
        return int(value)
    m = _SIZE.match(str(text))
    if not m:
        raise MemoryBudgetError(f"{source}: {text!r} is not a size; write e.g. 6G, 512M or a number of bytes")
    value = float(m.group(1)) * 1024 ** " kmgt".index((m.group(2) or " ").lower())
    if value < 1:
        raise MemoryBudgetError(f"{source}: {text!r} must be more than 0 bytes")
    return int(value)


def format_size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


# ---- what the process can get -------------------------------------------------------------
def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def cgroup_headroom(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes the cgroup of this process may still use (limit - usage), None if unlimited
    or unknown. cgroup v2 first, then v1's memory controller."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        limit, usage = _read_int(root / limit_file), _read_int(root / usage_file)
        if limit is not None and usage is not None and limit < 2**60:  # v1 says "no limit" with ~2^63
            return max(0, limit - usage)
    return None


def mem_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def device_free_memory(device: int = 0) -> int | None:
    """Free memory of GPU `device` in bytes (nvidia-smi), None when it cannot be read."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=memory.free", "--format=csv,noheader,nounits",
                              f"--id={device}"], capture_output=True, text=True, timeout=10, check=True)
        return int(float(out.stdout.strip().splitlines()[0])) * 2**20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def available_memory(provider: str = "cpu", device: int = 0) -> tuple[int, str]:
    """(bytes this process can still get, where that number comes from)."""
    if not runs_on_cpu(provider):
        free = device_free_memory(device)
        if free is not None:
            return free, f"free memory of GPU {device}"
        return UNKNOWN_AVAILABLE, "GPU memory unknown (no nvidia-smi): assumed"
    found = [(v, what) for v, what in ((cgroup_headroom(), "the cgroup's limit less its usage"),
                                       (mem_available(), "MemAvailable"))
             if v is not None]
    if not found:
        return UNKNOWN_AVAILABLE, "memory unknown (no /proc/meminfo, no cgroup): assumed"
    return min(found)


# ---- what a call costs ----------------------------------------------------------------------
@dataclass(frozen=True)
class GraphCost:
    """Bytes one call of a graph takes beyond the idle process: fixed + batch * per_input."""

    fixed_bytes: int
    per_input_bytes: int
    source: str  # "measured" (the manifest) or "fallback" (FALLBACK_COSTS)
    batch_invariant: bool = True  # an input's outputs have the same bits in any batch

    def bytes_for(self, batch: int) -> int:
        return self.fixed_bytes + batch * self.per_input_bytes

    @classmethod
    def of(cls, model: str, graph_entry: dict) -> "GraphCost":
        m = graph_entry.get("memory")
        if isinstance(m, dict):
            fixed, per = m.get("fixed_bytes"), m.get("per_input_bytes")
            invariant = m.get("batch_invariant", FALLBACK_INVARIANT.get(model, False))
            if isinstance(fixed, int) and isinstance(per, int) and fixed >= 0 and per > 0:
                return cls(fixed, per, "measured", invariant is True)
        fixed, per = FALLBACK_COSTS.get(model, DEFAULT_FALLBACK)
        return cls(fixed, per, "fallback", FALLBACK_INVARIANT.get(model, False))


class MemoryBudget:
    """Bytes the model calls of a pipeline may use at once, shared by its threads."""

    def __init__(self, total_bytes: int, source: str = "given"):
        if total_bytes <= 0:
            raise MemoryBudgetError(f"a memory budget must be positive, not {total_bytes}")
        self.total = int(total_bytes)
        self.source = source
        self._used = 0
        self._cond = threading.Condition()
        self.peak_reserved = 0

    @classmethod
    def resolve(cls, budget: "MemoryBudget | int | str | None", provider: str = "cpu",
                device: int = 0) -> "MemoryBudget":
        """`budget` as given (bytes, '6G'), or by default a share of what is available."""
        if isinstance(budget, MemoryBudget):
            return budget
        if budget is not None:
            return cls(parse_size(budget), "given")
        env = os.environ.get("SDRUN_MEMORY_BUDGET")
        if env:
            return cls(parse_size(env, "SDRUN_MEMORY_BUDGET"), "SDRUN_MEMORY_BUDGET")
        avail, where = available_memory(provider, device)
        share = CPU_SHARE if runs_on_cpu(provider) else GPU_SHARE
        return cls(max(int(share * avail), 1), f"{share:.0%} of {format_size(avail)} ({where})")

    def max_batch(self, cost: GraphCost) -> int:
        """The most inputs one call may take (at least 1: a graph that cannot fit runs one
        input at a time, alone)."""
        return max(1, (self.total - cost.fixed_bytes) // cost.per_input_bytes)

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Hold `nbytes` of the budget while the block runs; waits while other threads hold
        too much. A call larger than the whole budget waits until it runs alone."""
        want = min(int(nbytes), self.total)
        with self._cond:
            while self._used and self._used + want > self.total:
                self._cond.wait()
            self._used += want
            self.peak_reserved = max(self.peak_reserved, self._used)
        try:
            yield
        finally:
            with self._cond:
                self._used -= want
                self._cond.notify_all()

    def __repr__(self) -> str:
        return f"MemoryBudget({format_size(self.total)}, {self.source})"


def batch_size(feeds: dict[str, np.ndarray], names: list[str]) -> int | None:
    """The batch of a call: the first axis its inputs share, None when they have none."""
    sizes = {np.shape(feeds[n])[0] for n in names if n in feeds and np.ndim(feeds[n])}
    return sizes.pop() if len(sizes) == 1 else None


def run_in_chunks(run_once: Callable[[dict], dict], feeds: dict[str, np.ndarray], names: list[str],
                  step: int, on_chunk: Callable[[int], object] | None = None) -> dict[str, np.ndarray]:
    """`run_once` over slices of at most `step` inputs along the batch axis, outputs joined.
    `on_chunk(n)` (optional) is a context manager entered around each chunk of n inputs."""
    n = batch_size(feeds, names)
    if n is None or n <= step:
        return _guarded(run_once, feeds, n or 1, on_chunk)
    parts = [_guarded(run_once, {k: v[i:i + step] for k, v in feeds.items() if k in names},
                      min(step, n - i), on_chunk) for i in range(0, n, step)]
    out = {}
    for k in parts[0]:
        if any(np.ndim(p[k]) == 0 or np.shape(p[k])[0] != min(step, n - i)
               for p, i in zip(parts, range(0, n, step))):
            raise SpotdiffError(f"output {k!r} is not batch-major; this graph cannot be run in chunks")
        out[k] = np.concatenate([p[k] for p in parts])
    return out


def _guarded(run_once, feeds, n, on_chunk):
    if on_chunk is None:
        return run_once(feeds)
    with on_chunk(n):
        return run_once(feeds)


class BudgetedModel:
    """A model whose calls are split to fit a `MemoryBudget` (same interface as the model).

    `exact`: a graph that is not batch-invariant (`GraphCost.batch_invariant`) runs one
    input per call, so that its answers never depend on how inputs were grouped (on CPU,
    where a larger batch is no faster anyway)."""

    def __init__(self, model, cost: GraphCost, budget: MemoryBudget, label: str = "",
                 exact: bool = True):
        self.model = model
        self.cost = cost
        self.budget = budget
        self.label = label
        self.max_batch = 1 if exact and not cost.batch_invariant else budget.max_batch(cost)
        self.calls = 0  # model calls made (chunks), for tests and benchmarks

    @property
    def check_tolerance(self) -> float | None:
        return self.model.check_tolerance

    @property
    def input_names(self) -> list[str]:
        return self.model.input_names

    @property
    def output_names(self) -> list[str]:
        return self.model.output_names

    def open(self) -> "BudgetedModel":
        self.model.open()
        return self

    def __getattr__(self, name):  # session, provider, ... of the wrapped model
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def _chunk(self, n: int):
        self.calls += 1
        return self.budget.reserve(self.cost.bytes_for(n))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run_in_chunks(self.model.run, feeds, self.input_names, self.max_batch, self._chunk)


# ---- this process's own memory ------------------------------------------------------------
def proc_status_kib(field: str, pid: int | str = "self") -> int | None:
    """A field of /proc/PID/status in KiB (VmRSS, VmHWM), None when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_bytes() -> int | None:
    """This process's resident memory now (Linux), None elsewhere."""
    kib = proc_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory since it started or since `reset_peak_rss`."""
    kib = proc_status_kib("VmHWM")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Start the peak (`peak_rss_bytes`) afresh from the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
