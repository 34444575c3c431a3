"""The `sdrun` command line."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import click

from ..backends.cpu import (
    cpu_info,
    graph_max_abs_weight,
    int8_clipping_warning,
    int8_kernel,
    isa_summary,
)
from ..backends.interface import ALL_PROVIDERS
from ..backends.memory import GraphCost, MemoryBudget, format_size
from ..backends.openvino_backend import describe as describe_precision
from ..bundle.bundle import Bundle
from ..csvfile import COLUMNS
from ..errors import SpotdiffError
from ..version import version_option
from . import eval as eval_commands
from . import precision as precision_commands
from . import triton as triton_commands
from . import vocab as vocab_commands
from .options import (
    MAX_PIXELS,
    MEMORY_BUDGET,
    PARAM,
    PROVIDER,
    THREADS,
    VERBOSITY,
    load_pipeline,
    max_pixels,
    memory_budget,
)

if TYPE_CHECKING:
    from ..apps.dataset import PairSource


class _Group(click.Group):
    """Print our own errors as one line, not a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SpotdiffError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@version_option
@VERBOSITY
def main():
    """Run a spotdiff bundle: spot what was added, removed or changed between two images.

    A bundle is built by `sdexport build`; every command here works without PyTorch.
    """


@main.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--provider", default="cpu", show_default=True,
              type=click.Choice(ALL_PROVIDERS),
              help="cpu or cuda (onnxruntime graphs); tensorrt: the bundle's engines for this "
                   "GPU, each against its own recorded tolerance; openvino[:f32|:bf16]: OpenVINO "
                   "on the CPU, f32 within 1e-4, bf16 within the tolerance `sdrun precision` "
                   "measured (else 5e-2).")
@click.option("--model", "models", multiple=True, help="Check only this model (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON lines.")
def check(bundle, provider, models, as_json):
    """Prove the runtime reproduces PyTorch on the bundle's golden samples.

    Runs every graph on the inputs recorded at build time and compares each output
    with PyTorch's (relative L2 and max-abs). Exits 1 if any output is out of tolerance.

    The column "ref" says what each output is compared with: "PyTorch" (recorded by
    `sdexport build`), or "runtime" for the outputs of a bundle made by `sdrun vocab` that
    depend on a prompt PyTorch never ran (recorded by onnxruntime when the vocabulary
    changed; they prove that this machine computes what that machine did).
    """
    b = Bundle.load(bundle)
    from ..apps.check import RUNTIME, check_bundle

    failed = 0
    counts = {"PyTorch": 0, "runtime": 0}
    if not as_json and b.manifest.get("precision") == "int8":
        click.echo(int8_summary(b))
    if not as_json:
        click.echo(f"{'model':8} {'graph':6} {'case':7} {'output':14} {'shape':18} "
                   f"{'max_abs':>10} {'rel_l2':>10} {'tol':>8} {'ref':8} ok")
    for c in check_bundle(b, provider=provider, models=list(models) or None):
        failed += not c.ok
        ref = "runtime" if c.reference == RUNTIME else "PyTorch"
        counts[ref] += 1
        if as_json:
            click.echo(json.dumps({**c.__dict__, "shape": list(c.shape), "ok": c.ok}))
        else:
            click.echo(f"{c.model:8} {c.graph:6} {c.case:7} {c.output:14} {str(c.shape):18} "
                       f"{c.max_abs:10.2e} {c.rel_l2:10.2e} {c.tolerance:8.0e} {ref:8} "
                       f"{'yes' if c.ok else 'NO'}{'  ' + c.note if c.note else ''}")
    if not as_json and counts["runtime"]:
        click.echo(f"{counts['PyTorch']} output(s) checked against PyTorch, {counts['runtime']} against "
                   "the runtime's own record (prompt-dependent; written by `sdrun vocab`)")
    if failed:
        click.echo(f"{failed} output(s) out of tolerance", err=True)
        sys.exit(1)
    if not as_json:
        click.echo("all outputs within tolerance")


@main.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest.")
@MEMORY_BUDGET
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
    for change in m.get("vocab_changes", []):
        click.echo(f"            set by `sdrun vocab` {change.get('created', '?')} from "
                   f"{change.get('source_bundle', '?')} ({len(change.get('source_vocabulary', []))} labels)")
    budget = MemoryBudget.resolve(memory_budget())
    if m.get("precision") == "int8":
        click.echo(int8_summary(b))
    for name, e in b.models.items():
        src = e.get("source", {})
        click.echo(f"\n[{name}] {src.get('kind', '?')}: {src.get('id', '')}")
        for g, ge in e.get("graphs", {}).items():
            size = m["files"][ge["file"]]["bytes"] / 1e6
            ins = ", ".join(f"{i['name']}{i['shape']}" for i in ge.get("inputs", []))
            outs = ", ".join(f"{o['name']}{o['shape']}" for o in ge.get("outputs", []))
            click.echo(f"  {g:6} {ge['file']} ({size:.1f} MB)\n         in: {ins}\n         out: {outs}")
            cost = GraphCost.of(name, ge)
            click.echo(f"         memory per call: {format_size(cost.fixed_bytes)} + "
                       f"{format_size(cost.per_input_bytes)} per input ({cost.source}); at most "
                       f"{budget.max_batch(cost)} input(s) per call in {budget}"
                       + ("" if cost.batch_invariant else "; on CPU one input per call (its outputs "
                          "depend on the batch)"))
            if "quantization" in ge:
                q = ge["quantization"]
                click.echo(f"         int8: {q.get('weight_type')} weights up to "
                           f"|{graph_max_abs_weight(ge)}|, per channel {q.get('per_channel')}, "
                           f"tolerance rel_l2 {ge.get('tolerance', {}).get('rel_l2')}")
        if "prompt" in e:
            click.echo(f"  prompt     {e['prompt']!r}")
        if "class_heads" in e:
            click.echo(f"  class heads: {e['class_heads']['labels']} labels x "
                       f"{'/'.join(e['class_heads']['columns'])} (class_probs in each pair's details)")
        if "preprocess" in e:
            click.echo(f"  preprocess {json.dumps(e['preprocess'])}")
    for key, eng in m.get("engines", {}).items():
        graphs = eng.get("graphs", {})
        ok = sum(1 for g in graphs.values() if g.get("check", {}).get("ok"))
        click.echo(f"\n[engines {key}] {eng.get('gpu_name', '')}, {ok}/{len(graphs)} graphs passed "
                   f"their check (rel_l2 <= {eng.get('tolerance', {}).get('rel_l2')})")
        for name, g in graphs.items():
            state = "FAILED: " + g["failed"] if "failed" in g else g.get("file", "")
            pinned = f", fp32-pinned: {', '.join(g['pinned_fp32'])}" if g.get("pinned_fp32") else ""
            click.echo(f"  {name:14} {state}{pinned}")
    ov = m.get("openvino")
    if isinstance(ov, dict) and ov.get("policy"):
        measured = ov.get("measured", {})
        click.echo(f"\n[openvino precision] measured on {measured.get('cpu', '?')} "
                   f"({'bf16' if measured.get('bf16') else 'no bf16'}), {measured.get('pairs', '?')} pairs")
        for key, precision in ov["policy"].items():
            tol = ov.get("tolerance", {}).get(key)
            click.echo(f"  {key:14} {describe_precision(precision)}" + (f"  (check rel_l2 <= {tol})" if tol else ""))
    click.echo(f"\nparameters  {json.dumps(b.params)}")
    total = sum(f["bytes"] for f in m["files"].values())
    click.echo(f"files       {len(m['files'])}, {total / 1e6:.1f} MB")


def int8_summary(b: Bundle) -> str:
    """Where an int8 bundle was quantised, what this CPU's int8 kernel is, and whether that
    kernel computes the bundle's weights exactly."""
    q = b.manifest.get("build", {}).get("quantized_on", {})
    here = int8_kernel()
    where = (f"{q.get('cpu', '?')} ({q.get('isa', '?')}; int8 kernel {q.get('int8_kernel', '?')})"
             if q else "a CPU the bundle does not record (quantised by an older spotdiff)")
    lines = [f"int8        quantised on {where}",
             f"            this CPU: {cpu_info().get('model', '?')} ({isa_summary()}; int8 kernel {here})"]
    warnings = [w for name, e in b.models.items() for g, ge in e.get("graphs", {}).items()
                if (w := int8_clipping_warning(ge, f"{name}/{g}", here))]
    lines += [f"            WARNING {w}" for w in warnings] or [
        "            every int8 weight is computed exactly by this CPU's kernel"]
    return "\n".join(lines)


def check_run_paths(bundle: str | Path, pairs: Sequence[PairSource], csv_path: str | None, out: Path,
                    details: Path, viz_dir: Path | None) -> None:
    """Refuse (OutputPathError) outputs of `sdrun run` that would overwrite an input image,
    the ids CSV, a file of the bundle, or each other."""

    from ..apps.dataset import pair_inputs
    from ..apps.runner import run_record_path, viz_picture_path
    from ..files import check_output_paths

    outputs = {"--out": out, "--details": details,
               "the run record of --details": run_record_path(details)}
    if viz_dir is not None:
        outputs.update({f"the --viz picture of pair {p.pair_id}": viz_picture_path(viz_dir, p.pair_id)
                        for p in pairs if not p.problem})
    inputs = pair_inputs(pairs)
    if csv_path:
        inputs.append(("the --csv file", Path(csv_path)))
    check_output_paths(outputs, inputs, [("the bundle", Path(bundle))])


@main.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--data", required=True, type=click.Path(file_okay=False),
              help="Folder with data/{id}_1.png and data/{id}_2.png (or the images directly).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False),
              help="Run only the ids of this CSV's img_id column, in its order.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Submission CSV to write (img_id, added_objs, removed_objs, changed_objs).")
@click.option("--details", type=click.Path(dir_okay=False),
              help="One JSON line per pair: label sets, every kept object, change score, errors. "
                   "Default: OUT with .details.jsonl.")
@click.option("--viz", "viz_dir", type=click.Path(file_okay=False),
              help="Write a picture of every pair here (boxes by status, heatmap).")
@click.option("--batch-pairs", default=1, show_default=True, type=click.IntRange(1),
              help="Pairs per model call (each pair is 4 detector views).")
@click.option("--resume", is_flag=True,
              help="Keep the pairs already in the details file and run the rest (and the ones "
                   "that failed). The details file must come from the same bundle, parameters "
                   "and spotdiff version: DETAILS.run.json records them.")
@click.option("--force-rerun", is_flag=True,
              help="With --resume: when the details file was written with other settings, "
                   "rerun every pair instead of stopping with an error.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this process; ray: the batches on a Ray cluster (the ray extra), same files.")
@click.option("--address", help="--engine ray: the cluster (auto, ray://host:10001); default: a local one.")
@click.option("--actors", default=1, show_default=True, type=click.IntRange(1),
              help="--engine ray: actors, each loading the bundle once.")
@click.option("--cpus-per-actor", default=1.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="--engine ray: CPUs per actor (its onnxruntime threads).")
@click.option("--gpus-per-actor", default=0.0, show_default=True, type=click.FloatRange(0))
@PROVIDER
@THREADS
@MEMORY_BUDGET
@MAX_PIXELS
@PARAM
def run(bundle, data, csv_path, out, details, viz_dir, batch_pairs, resume, force_rerun, quiet,
        engine, address, actors, cpus_per_actor, gpus_per_actor, provider, threads, params):
    """Run the pipeline on a folder of pairs and write a submission.

    A pair that cannot be read (missing, empty, truncated or non-image file) is
    reported on stderr and in the details file, gets 'none' in the submission, and
    the run goes on; the exit status is then 1. A killed run loses nothing:
    run again with --resume.
    """
    from pathlib import Path

    from ..apps.dataset import list_pairs
    from ..apps.runner import run_dataset

    pairs = list_pairs(data, csv_path)
    if not pairs:
        raise click.UsageError(f"no pairs found in {data} (expected data/{{id}}_1.png, {{id}}_2.png)")
    out = Path(out)
    details = Path(details) if details else out.with_suffix(".details.jsonl")
    viz = Path(viz_dir) if viz_dir else None
    check_run_paths(bundle, pairs, csv_path, out, details, viz)
    execute = None
    if engine == "ray":
        if viz is not None:
            raise click.UsageError("--viz draws in this process: not with --engine ray")
        from ..apps.ray_run import init_ray, ray_executor

        pipe = load_pipeline(bundle, provider, threads, params)  # sessions open in the actors
        init_ray(address)
        execute = ray_executor(bundle, pipe.params, actors=actors, cpus_per_actor=cpus_per_actor,
                               gpus_per_actor=gpus_per_actor, provider=provider,
                               memory_budget=memory_budget(),
                               warn=lambda m: click.echo(m, err=True))
    else:
        pipe = load_pipeline(bundle, provider, threads, params).open_sessions()
    summary = run_dataset(pipe, pairs, out, details, batch_pairs=batch_pairs, resume=resume,
                          viz_dir=viz, progress=not quiet, force_rerun=force_rerun, execute=execute)
    click.echo(f"{summary.total} pairs ({summary.done_before} done before), "
               f"{len(summary.failed)} failed -> {out}, {details}", err=True)
    if summary.failed or summary.duplicates:
        sys.exit(1)


@main.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.argument("image_a", type=click.Path(dir_okay=False))
@click.argument("image_b", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON.")
@click.option("--viz", type=click.Path(dir_okay=False), help="Write a picture of the result (PNG).")
@PROVIDER
@THREADS
@MEMORY_BUDGET
@MAX_PIXELS
@PARAM
def diff(bundle, image_a, image_b, as_json, viz, provider, threads, params):
    """What changed from IMAGE_A to IMAGE_B: added, removed and changed labels."""
    from pathlib import Path

    from ..files import check_output_paths
    from ..stages.images import load_image

    if viz:
        check_output_paths({"--viz": Path(viz)}, [("IMAGE_A", Path(image_a)), ("IMAGE_B", Path(image_b))],
                           [("the bundle", Path(bundle))])
    pipe = load_pipeline(bundle, provider, threads, params).open_sessions()
    a, b = load_image(image_a, max_pixels=max_pixels()), load_image(image_b, max_pixels=max_pixels())
    r = pipe.diff(a, b)
    if viz:
        from ..apps.viz import save_pair_viz

        save_pair_viz(viz, a, b, r)
    if as_json:
        click.echo(json.dumps(r.to_json(), indent=2))
        return
    for name in COLUMNS:
        click.echo(f"{name:8} {' '.join(getattr(r, name)) or 'none'}")
    click.echo(f"change   score {r.change_score:.3f}, logit {r.change_logit:.3f}")
    for o in r.objects:
        partner = "" if o["partner"] is None else f" <-> #{o['partner']}"
        click.echo(f"  image {o['image']} #{o['index']:<3} {o['status']:8} {o['label']:12} "
                   f"score {o['score']:.3f} fused {o['fused_score']:.3f} box "
                   f"{[round(v, 1) for v in o['box']]}{partner}")


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder to write data/{id}_1.png, data/{id}_2.png and labels.csv into.")
@click.option("--pairs", "n_pairs", default=20, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True)
@click.option("--size", default=224, show_default=True, type=click.IntRange(32),
              help="Square image size in pixels.")
@click.option("--overwrite", is_flag=True,
              help="Delete the images already in OUT/data first (without it, a folder holding "
                   "other images is refused).")
def synth(out, n_pairs, seed, size, overwrite):
    """Make synthetic labelled pairs: simple objects added, removed, moved or recoloured,
    with brightness and blocky compression-like distractors."""
    from ..apps.synth import write_synthetic_pairs

    labels = write_synthetic_pairs(out, n_pairs, seed=seed, size=(size, size), overwrite=overwrite)
    click.echo(f"{n_pairs} pairs -> {labels.parent / 'data'}, labels in {labels}")


@main.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-batch-pairs", default=None, type=click.IntRange(1),
              help="Most requests run together in one model batch. Default: 1 on CPU (a "
                   "batch serves no more per second there and makes callers wait for each "
                   "other), 8 on a GPU; each model call is bounded by --memory-budget anyway.")
@click.option("--max-wait-ms", default=10.0, show_default=True, type=click.FloatRange(0),
              help="How long the first request of a batch waits for others.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(1),
              help="Requests that may wait; beyond it the service answers 503 with Retry-After.")
@click.option("--max-bytes", default=32 * 2**20, show_default=True, type=click.IntRange(1),
              help="Largest request body; bigger is 413.")
@MAX_PIXELS
@click.option("--read-timeout", default=30.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds a request's head, and then its body, may take to arrive; a slower "
                   "head closes the connection, a slower body is 408.")
@click.option("--shutdown-timeout", default=60.0, show_default=True, type=click.FloatRange(0),
              help="On SIGTERM: seconds the batch in flight may take to finish before the "
                   "service exits anyway (queued requests are answered 503 at once).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@PROVIDER
@THREADS
@MEMORY_BUDGET
def serve(bundle, host, port, max_batch_pairs, max_wait_ms, max_queue, max_bytes,
          read_timeout, shutdown_timeout, log_level, provider, threads):
    """Serve BUNDLE over HTTP: POST /v1/diff with two images, batched across callers.

    \b
      curl -F image_a=@a.png -F image_b=@b.png http://127.0.0.1:8000/v1/diff
      curl -F image_a=@a.png -F image_b=@b.png -F 'params={"det_thr": 0.3}' ...
      curl -o diff.png -F image_a=@a.png -F image_b=@b.png '.../v1/diff?viz=1'

    Also GET /healthz, /readyz (503 while the bundle loads: the socket opens at once),
    /metrics (Prometheus) and /v1/info. SIGTERM or Ctrl-C: stop accepting, answer the
    queued requests 503, finish the batch in flight, exit. Needs the `serve` extra:
    pip install 'spotdiff[serve]'.
    """
    from ..bundle.bundle import Bundle

    Bundle.load(bundle)  # a broken bundle is an error here, not a server that never gets ready
    try:
        from ..apps.serve import ServeConfig
        from ..apps.serve import serve as run_server
    except ImportError as e:
        raise click.UsageError(f"sdrun serve needs the serve extra ({e.name} is missing): "
                               "pip install 'spotdiff[serve]'") from None
    run_server(ServeConfig(bundle=bundle, provider=provider, threads=threads,
                           memory_budget=memory_budget(),
                           max_batch_pairs=max_batch_pairs, max_wait_ms=max_wait_ms,
                           max_queue=max_queue, max_bytes=max_bytes, max_pixels=max_pixels(),
                           read_timeout_s=read_timeout, shutdown_timeout_s=shutdown_timeout),
               host=host, port=port, log_level=log_level)


eval_commands.register(main)  # score, eval, tune
precision_commands.register(main)  # precision
vocab_commands.register(main)  # vocab
triton_commands.register(main)  # triton

if __name__ == "__main__":
    main()
