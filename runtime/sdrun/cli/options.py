"""Options and helpers that several `sdrun` commands share."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

import click

from ..backends.interface import ALL_PROVIDERS

if TYPE_CHECKING:
    from ..pipeline import Pipeline

F = TypeVar("F", bound=Callable)


def parse_params(values: tuple[str, ...]) -> dict:
    """--param NAME=VALUE values, checked (sdrun.bundle.params)."""
    from ..bundle.params import parse_overrides

    return parse_overrides(values)


_FALLBACK_KEY = "sdrun.allow_onnx_fallback"


def _remember_fallback(ctx, param, value):
    ctx.meta[_FALLBACK_KEY] = value
    return value


def PROVIDER(f: F) -> F:  # used like the other option decorators
    """--provider and --allow-onnx-fallback (read by `load_pipeline` from the click context)."""
    f = click.option("--allow-onnx-fallback", is_flag=True, expose_value=False,
                     callback=_remember_fallback,
                     help="With --provider tensorrt: when the bundle has no engine for this "
                          "GPU/TensorRT, run the ONNX graph with onnxruntime CUDA on the same "
                          "GPU (with a warning) instead of failing.")(f)
    return click.option("--provider", default="cpu", show_default=True,
                        type=click.Choice(ALL_PROVIDERS),
                        help="cpu or cuda (onnxruntime); tensorrt: the bundle's engines for "
                             "this GPU (fp16 preferred; tensorrt:fp32 for fp32 engines); openvino: "
                             "OpenVINO on the CPU (extra 'openvino'), openvino:f32 / openvino:bf16 "
                             "or plain openvino (the bundle's measured per-graph policy where the "
                             "CPU has bf16, else f32). A GPU provider that is absent is an error, "
                             "never a CPU run.")(f)


THREADS = click.option("--threads", type=click.IntRange(1), default=None,
                       help="Threads per model call (onnxruntime's intra-op, OpenVINO's inference "
                            "threads), at least 1 (default: one per core).")

_BUDGET_KEY = "sdrun.memory_budget"


def _remember_budget(ctx, param, value):
    if value is not None:
        from ..backends.memory import MemoryBudgetError, parse_size

        try:
            value = parse_size(value)
        except MemoryBudgetError as e:
            raise click.BadParameter(str(e).split(": ", 1)[-1]) from None
    ctx.meta[_BUDGET_KEY] = value
    return value


MEMORY_BUDGET = click.option(
    "--memory-budget", metavar="SIZE", expose_value=False, callback=_remember_budget,
    help="Memory the model calls may use at once, e.g. 6G or 512M (powers of 1024); a "
         "larger call runs in chunks, with the same answers. Default: a quarter of the "
         "memory available (cgroup limit or MemAvailable) on CPU, 60% of the GPU's free "
         "memory on a GPU; SDRUN_MEMORY_BUDGET sets it too.")


def memory_budget() -> int | None:
    """The --memory-budget of the current command (bytes), None for the default."""
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get(_BUDGET_KEY) if ctx else None
PARAM = click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
                     help="Override a bundle parameter for this run (repeatable), e.g. det_thr=0.3.")


def load_pipeline(bundle: str | Path, provider: str, threads: int | None,
                  params: tuple[str, ...] = ()) -> Pipeline:
    """The Pipeline the options ask for; sessions open at their first use
    (`.open_sessions()` opens them all now)."""
    from ..pipeline import Pipeline

    ctx = click.get_current_context(silent=True)
    fallback = bool(ctx and ctx.meta.get(_FALLBACK_KEY))
    return Pipeline.load(bundle, provider=provider, threads=threads, params=parse_params(params),
                         allow_onnx_fallback=fallback, memory_budget=memory_budget(),
                         max_pixels=max_pixels())


def _pixels(ctx, param, value):
    if value is None or str(value).strip().lower() in ("none", "off", "0"):
        return None
    text = str(value).strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
    try:
        n = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise click.BadParameter(f"{value!r}: give a number of pixels like 50M or 40000000, or 'none'") from None
    if n < 1:
        raise click.BadParameter(f"{value!r}: at least 1 pixel, or 'none' for no limit")
    return int(n)


def _default_max_pixels() -> str:
    from ..stages.images import DEFAULT_MAX_PIXELS

    return f"{DEFAULT_MAX_PIXELS // 10**6}M"


_PIXELS_KEY = "sdrun.max_pixels"


def _remember_pixels(ctx, param, value):
    ctx.meta[_PIXELS_KEY] = value = _pixels(ctx, param, value)
    return value


def max_pixels() -> int | None:
    """The --max-pixels of the current command (None: no limit; the default when the
    command has no such option)."""
    from ..stages.images import DEFAULT_MAX_PIXELS

    ctx = click.get_current_context(silent=True)
    return ctx.meta.get(_PIXELS_KEY, DEFAULT_MAX_PIXELS) if ctx else DEFAULT_MAX_PIXELS


MAX_PIXELS = click.option(
    "--max-pixels", default=_default_max_pixels, show_default=True, callback=_remember_pixels, metavar="N",
    expose_value=False,
    help="Refuse an image of more pixels (width x height, read from its header before "
         "decoding), e.g. 50M; 'none': no limit. A 60 KB file can claim 8000x8000 pixels.")


def _set_verbosity(ctx, param, value):
    from ..logs import setup_logging

    key = "sdrun.verbosity"
    ctx.meta[key] = ctx.meta.get(key, 0) + (value if param.name == "verbose" else -int(value))
    setup_logging(ctx.meta[key])
    return value


def VERBOSITY(f: F) -> F:  # used like the other option decorators
    """-v/--verbose and -q/--quiet of a command group: the level of its log messages."""
    f = click.option("-q", "--quiet", "quiet_logs", is_flag=True, expose_value=False, is_eager=True,
                     callback=_set_verbosity, help="Only warnings and errors on stderr.")(f)
    return click.option("-v", "--verbose", count=True, expose_value=False, is_eager=True,
                        callback=_set_verbosity, help="More detail on stderr (-v: debug messages).")(f)
