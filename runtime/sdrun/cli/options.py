"""Options and helpers that several `sdrun` commands share."""
from __future__ import annotations

import click


def parse_params(values: tuple[str, ...]) -> dict:
    """--param NAME=VALUE values, checked (sdrun.bundle.params)."""
    from ..bundle.params import parse_overrides

    return parse_overrides(values)


_FALLBACK_KEY = "sdrun.allow_onnx_fallback"


def _remember_fallback(ctx, param, value):
    ctx.meta[_FALLBACK_KEY] = value
    return value


def PROVIDER(f):  # noqa: N802  (used like the other option decorators)
    """--provider and --allow-onnx-fallback (read by `load_pipeline` from the click context)."""
    f = click.option("--allow-onnx-fallback", is_flag=True, expose_value=False,
                     callback=_remember_fallback,
                     help="With --provider tensorrt: when the bundle has no engine for this "
                          "GPU/TensorRT, run the ONNX graph with onnxruntime CUDA on the same "
                          "GPU (with a warning) instead of failing.")(f)
    return click.option("--provider", default="cpu", show_default=True,
                        type=click.Choice(["cpu", "cuda", "tensorrt", "tensorrt:fp16",
                                           "tensorrt:fp32"]),
                        help="cpu or cuda (onnxruntime), or tensorrt: the bundle's engines for "
                             "this GPU (fp16 preferred; tensorrt:fp32 for fp32 engines). A GPU "
                             "provider that is absent is an error, never a CPU run.")(f)


THREADS = click.option("--threads", type=int, default=None,
                       help="onnxruntime intra-op threads (default: one per core).")

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


def load_pipeline(bundle, provider, threads, params=()):
    """The Pipeline the options ask for; sessions open at their first use
    (`.open_sessions()` opens them all now)."""
    from ..pipeline import Pipeline

    ctx = click.get_current_context(silent=True)
    fallback = bool(ctx and ctx.meta.get(_FALLBACK_KEY))
    return Pipeline.load(bundle, provider=provider, threads=threads, params=parse_params(params),
                         allow_onnx_fallback=fallback, memory_budget=memory_budget())
