"""The `sdrun` command line."""
from __future__ import annotations

import json
import sys

import click

from .bundle import Bundle
from .errors import SpotdiffError


class _Group(click.Group):
    """Print our own errors as one line, not a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SpotdiffError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="spotdiff")
def main():
    """Run a spotdiff bundle: spot what was added, removed or changed between two images.

    A bundle is built by `sdexport build`; every command here works without PyTorch.
    """


@main.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--provider", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--model", "models", multiple=True, help="Check only this model (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON lines.")
def check(bundle, provider, models, as_json):
    """Prove the runtime reproduces PyTorch on the bundle's golden samples.

    Runs every graph on the inputs recorded at build time and compares each output
    with PyTorch's (relative L2 and max-abs). Exits 1 if any output is out of tolerance.
    """
    b = Bundle.load(bundle)
    from .check import check_bundle

    failed = 0
    if not as_json:
        click.echo(f"{'model':8} {'graph':6} {'case':6} {'output':14} {'shape':18} "
                   f"{'max_abs':>10} {'rel_l2':>10} {'tol':>8}  ok")
    for c in check_bundle(b, provider=provider, models=list(models) or None):
        failed += not c.ok
        if as_json:
            click.echo(json.dumps({**c.__dict__, "shape": list(c.shape), "ok": c.ok}))
        else:
            click.echo(f"{c.model:8} {c.graph:6} {c.case:6} {c.output:14} {str(c.shape):18} "
                       f"{c.max_abs:10.2e} {c.rel_l2:10.2e} {c.tolerance:8.0e}  "
                       f"{'yes' if c.ok else 'NO'}{'  ' + c.note if c.note else ''}")
    if failed:
        click.echo(f"{failed} output(s) out of tolerance", err=True)
        sys.exit(1)
    if not as_json:
        click.echo("all outputs within tolerance")


@main.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest.")
def info(bundle, as_json):
    """Print what a bundle holds: models, sources, graphs, vocabulary, parameters."""
    b = Bundle.load(bundle, verify=False)
    m = b.manifest
    if as_json:
        click.echo(json.dumps(m, indent=2))
        return
    click.echo(f"bundle      {b.root}")
    click.echo(f"schema      {m['schema_version']}   built {m.get('created', '?')}")
    tools = m.get("tools", {})
    click.echo("tools       " + ", ".join(f"{k} {v}" for k, v in tools.items()))
    click.echo(f"vocabulary  {len(m['vocabulary'])} labels: {' '.join(m['vocabulary'])}")
    for name, e in b.models.items():
        src = e.get("source", {})
        click.echo(f"\n[{name}] {src.get('kind', '?')}: {src.get('id', '')}")
        for g, ge in e.get("graphs", {}).items():
            size = m["files"][ge["file"]]["bytes"] / 1e6
            ins = ", ".join(f"{i['name']}{i['shape']}" for i in ge.get("inputs", []))
            outs = ", ".join(f"{o['name']}{o['shape']}" for o in ge.get("outputs", []))
            click.echo(f"  {g:6} {ge['file']} ({size:.1f} MB)\n         in: {ins}\n         out: {outs}")
        if "preprocess" in e:
            click.echo(f"  preprocess {json.dumps(e['preprocess'])}")
    click.echo(f"\nparameters  {json.dumps(b.params)}")
    total = sum(f["bytes"] for f in m["files"].values())
    click.echo(f"files       {len(m['files'])}, {total / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
