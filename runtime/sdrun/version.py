"""spotdiff's version, from one source: the installed distribution's metadata (the static
`version` of pyproject.toml). An uninstalled checkout (PYTHONPATH=runtime:export) reads
pyproject.toml itself. Also `sdrun.__version__`, `sdexport.__version__` and `--version`;
recorded in run records (`--resume` compares it) and in manifests.

Looked up on first use (`version()` or the `__version__` attribute): importlib.metadata
costs tens of milliseconds that `import sdrun` and `sdrun --help` do not pay.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)

DISTRIBUTION = "spotdiff"
UNKNOWN = "0+unknown"  # neither installed nor a checkout with its pyproject.toml


@lru_cache(maxsize=1)
def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version(DISTRIBUTION)
    except PackageNotFoundError:
        pass
    try:  # runtime/sdrun/version.py -> pyproject.toml at the checkout's root
        text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    except OSError:
        return UNKNOWN
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    found = project and re.search(r"^version\s*=\s*[\"']([^\"']+)[\"']", project.group(1), re.M)
    return found.group(1) if found else UNKNOWN


def version_option(f: F) -> F:
    """click's `--version` for `sdrun` and `sdexport` (same output as click.version_option),
    from `version()`, read only when asked."""
    import click

    def show(ctx, param, value):
        if value and not ctx.resilient_parsing:
            click.echo(f"{ctx.find_root().info_name}, version {version()}", color=ctx.color)
            ctx.exit()

    return click.option("--version", is_flag=True, expose_value=False, is_eager=True,
                        callback=show, help="Show the version and exit.")(f)


def __getattr__(name: str):
    if name == "__version__":
        return version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
