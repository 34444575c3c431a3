"""`sdrun triton`: a Triton Inference Server model repository from a bundle."""
from __future__ import annotations

import click


def register(group: click.Group) -> None:
    """Add this module's command to the `sdrun` group."""

    @group.command()
    @click.argument("bundle", type=click.Path(file_okay=False))
    @click.option("--out", required=True, type=click.Path(file_okay=False),
                  help="The repository folder to write (absent or empty; one written by `sdrun triton` "
                       "before is replaced whole).")
    @click.option("--graphs", type=click.Choice(["onnxruntime", "python"]), default="onnxruntime",
                  show_default=True,
                  help="onnxruntime: graph models for Triton's onnxruntime backend (GPU servers; "
                       "TensorRT accelerator on). python: python-backend models that run each graph "
                       "with sdrun (servers without the onnxruntime backend, CPU).")
    @click.option("--engines", metavar="KEY",
                  help="With --graphs onnxruntime: the bundle's TensorRT engines of this key "
                       "(e.g. sm90-trt10.16.1-fp16) as tensorrt_plan models; graphs without a usable "
                       "engine stay onnxruntime. `sdrun info` lists the keys.")
    @click.option("--max-batch", default=32, show_default=True, type=click.IntRange(1),
                  help="Largest batch Triton forms for a graph model (views, pairs or crops).")
    @click.option("--max-batch-pairs", default=8, show_default=True, type=click.IntRange(1),
                  help="Largest batch of pairs the spotdiff model takes at once.")
    @click.option("--queue-delay-us", default=5000, show_default=True, type=click.IntRange(0),
                  help="Dynamic batching: how long a request may wait for others (microseconds).")
    @click.option("--instances", default=1, show_default=True, type=click.IntRange(1),
                  help="Instances of each graph model (per GPU for onnxruntime).")
    @click.option("--pipeline-instances", default=1, show_default=True, type=click.IntRange(1),
                  help="Processes of the spotdiff (pipeline) model.")
    @click.option("--no-ort-tensorrt", is_flag=True,
                  help="onnxruntime graph models without onnxruntime's TensorRT accelerator (CUDA only).")
    def triton(bundle, out, graphs, engines, max_batch, max_batch_pairs, queue_delay_us, instances,
               pipeline_instances, no_ort_tensorrt):
        """Write a Triton Inference Server model repository of BUNDLE.

        One model per graph the pipeline runs (owlvit_image, gdino_model, siamese_pair,
        clip_visual) and `spotdiff`, a python-backend model that runs sdrun's stages and
        calls the graph models through BLS, so Triton batches every graph across requests.
        Its inputs: image_a, image_b (encoded image bytes), optional params (JSON) and
        pair_id; its output `result`: the pair's JSON as `sdrun run` writes it.
        The python models import sdrun: start tritonserver with a Python that has
        spotdiff's runtime installed (see the README the repository holds).

        \b
        Example:
          sdrun triton engines/full --out triton-repo
          tritonserver --model-repository triton-repo
        """
        from ..apps.triton_repo import RepositoryOptions, write_repository
        from ..bundle.bundle import Bundle

        b = Bundle.load(bundle)
        opts = RepositoryOptions(graphs=graphs, max_batch=max_batch, max_batch_pairs=max_batch_pairs,
                                 queue_delay_us=queue_delay_us, graph_instances=instances,
                                 pipeline_instances=pipeline_instances, engines=engines,
                                 ort_tensorrt=not no_ort_tensorrt)
        record = write_repository(b, out, opts, progress=lambda s: click.echo(f"  {s}", err=True))
        keys = sorted((b.manifest.get("engines") or {}))
        click.echo(f"wrote {out}: {', '.join(record['models'])} ({len(record['files'])} files)")
        if keys and not engines and graphs == "onnxruntime":
            click.echo(f"the bundle has TensorRT engines ({', '.join(keys)}): --engines KEY serves them "
                       "as tensorrt_plan models")
        click.echo(f"start it: tritonserver --model-repository {out}   (see {out}/README.md)")
