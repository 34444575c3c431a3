"""The packages' imports point one way and form no cycle (read from the source with ast,
so an import inside a function counts as much as one at the top).

runtime/sdrun, from the top down; a module may import its own layer and the layers
below it, never one above (`cli -> apps -> pipeline -> backends, stages, bundle`):

    cli/                the command line
    apps/               jobs on the pipeline
    pipeline            batches the model calls
    models/             the model kinds: adapters behind one registry
    backends/           onnxruntime, TensorRT  (may read the bundle)
    stages/, bundle/    numpy stages; the bundle folder (neither imports the other)
    errors, files, csvfile, version, logs   used by every layer, import only each other

`sdrun/__init__.py` (the public face) may name anything: it imports on first use.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"sdrun": ROOT / "runtime" / "sdrun", "sdexport": ROOT / "export" / "sdexport"}

LAYER_OF_PACKAGE = {"cli": "cli", "apps": "apps", "models": "models", "backends": "backends",
                    "stages": "stages", "bundle": "bundle"}
BASE = {"errors", "files", "csvfile", "version", "logs"}
ALLOWED = {  # layer -> the layers it may import
    "cli": {"cli", "apps", "pipeline", "models", "backends", "stages", "bundle", "base"},
    "apps": {"apps", "pipeline", "models", "backends", "stages", "bundle", "base"},
    "pipeline": {"models", "backends", "stages", "bundle", "base"},
    "models": {"models", "backends", "stages", "bundle", "base"},
    "backends": {"backends", "bundle", "base"},
    "stages": {"stages", "base"},
    "bundle": {"bundle", "base"},
    "base": {"base"},
}


def modules(package: str) -> dict[str, Path]:
    root = PACKAGES[package]
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that module `name` imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    found = set()

    def add(target: str):
        # `from pkg import mod` names a module; `from mod import func` names the module
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            for alias in node.names:
                full = f"{prefix}.{alias.name}"
                add(full if full in known else prefix)
    return found


def graph(package: str) -> dict[str, set[str]]:
    mods = modules(package)
    known = set(mods)
    return {m: imports_of(m, p, known) for m, p in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for dep in sorted(g.get(m, ())):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(g):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def layer(module: str) -> str | None:
    parts = module.split(".")[1:]
    if not parts:
        return None  # sdrun/__init__: the public face
    if parts[0] in LAYER_OF_PACKAGE:
        return LAYER_OF_PACKAGE[parts[0]]
    if parts[0] == "pipeline":
        return "pipeline"
    if parts[0] in BASE:
        return "base"
    if parts[0] == "data":
        return "base"
    raise AssertionError(f"{module}: in no layer; place it in one of {sorted(ALLOWED)}")


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycle(package):
    g = graph(package)
    assert len(g) > 5  # the walk found the package
    cycle = find_cycle(g)
    assert cycle is None, f"import cycle in {package}: {' -> '.join(cycle)}"


def test_runtime_imports_point_down():
    g = graph("sdrun")
    wrong = []
    for m, deps in g.items():
        src = layer(m)
        if src is None:
            continue
        for d in deps:
            dst = layer(d)
            if dst is not None and dst not in ALLOWED[src]:
                wrong.append(f"{m} ({src}) imports {d} ({dst})")
    assert not wrong, ("imports against the direction cli -> apps -> pipeline -> backends/stages/bundle:\n"
                       + "\n".join(sorted(wrong)))


def test_apps_and_cli_never_reach_into_a_model_adapter():
    """apps/ and cli/ know the model kinds only through `sdrun.models` (the registry and the
    role interfaces), never an adapter module (sdrun.models.owlvit, ...)."""
    g = graph("sdrun")
    wrong = sorted(f"{m} imports {d}" for m, deps in g.items() if layer(m) in ("apps", "cli")
                   for d in deps if d.startswith("sdrun.models."))
    assert not wrong, "\n".join(wrong)


def test_the_rules_after_the_models_live_in_one_module_each():
    """The kept-box rule, the matching cost and the label-set rule are written once."""
    rules = {"kept-box rule": r">= det_thr", "matching cost": r"1.0 - affinity",
             "label-set rule": r"not in in_b"}
    root = PACKAGES["sdrun"]
    for what, pattern in rules.items():
        where = sorted(str(p.relative_to(root)) for p in root.rglob("*.py") if pattern in p.read_text())
        assert len(where) == 1, f"the {what} ({pattern!r}) is written in {where}"
    assert "def kept(" in (root / "stages" / "decide.py").read_text()


def test_the_walk_sees_relative_and_function_level_imports():
    g = graph("sdrun")
    assert "sdrun.backends.trt" in g["sdrun.backends.session"]  # imported inside open_graph
    assert "sdrun.stages.heatmap" in g["sdrun.pipeline"]  # from .stages import heatmap
    assert "sdrun.apps.runner" in g["sdrun.cli.main"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert layer("sdrun.apps.tune") == "apps" and layer("sdrun.errors") == "base"


def test_public_names_still_import():
    import sdrun
    from sdrun import Bundle, Pipeline  # noqa: F401
    from sdrun.bundle import Bundle as B2
    from sdrun.cli import main  # noqa: F401  (the console script's entry point)

    assert B2 is sdrun.Bundle
    assert sdrun.__version__
