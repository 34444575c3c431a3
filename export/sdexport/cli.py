"""The `sdexport` command line."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from sdrun.cli.options import VERBOSITY
from sdrun.errors import SpotdiffError
from sdrun.version import version_option

from .sources import DEFAULT_HUB_IDS, MODEL_PRESETS, PRESETS


def _size(value: str) -> tuple[int, int]:
    parts = value.lower().split("x")
    try:
        h, w = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected N or HxW, e.g. 800 or 800x800") from None
    if h < 32 or w < 32:
        raise click.BadParameter(f"{value!r}: too small")
    return h, w


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@version_option
@VERBOSITY
def main():
    """Export spot-the-difference models (OWL-ViT, Grounding DINO, Siamese ViT, CLIP) to a bundle."""


SOURCE_HELP = ("a hub id (default {default}), a local folder, a preset ({presets}){extra}. "
               "Defaults to --preset when given.")


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Bundle folder to write (replaced if it is a bundle), e.g. engines/tiny.")
@click.option("--preset", type=click.Choice(PRESETS),
              help="Random weights from configs, no network: tiny-random (small, for tests and "
                   "demos) or full-random (the real architectures, for benchmarks).")
@click.option("--owlvit", help=SOURCE_HELP.format(default=DEFAULT_HUB_IDS["owlvit"],
                                                 presets="|".join(PRESETS), extra=""))
@click.option("--gdino", help=SOURCE_HELP.format(default=DEFAULT_HUB_IDS["gdino"],
                                                presets="|".join(PRESETS),
                                                extra=", or 'none' to leave it out"))
@click.option("--siamese", help=SOURCE_HELP.format(default="timm " + DEFAULT_HUB_IDS["siamese"],
                                                  presets="|".join((*PRESETS, *MODEL_PRESETS["siamese"])),
                                                  extra=""))
@click.option("--siamese-ckpt", type=click.Path(dir_okay=False),
              help="SiameseViTChange state dict (backbone.*, head.*): .safetensors or a torch "
                   "checkpoint (loaded with weights_only=True).")
@click.option("--clip", help=SOURCE_HELP.format(default="open_clip " + DEFAULT_HUB_IDS["clip"],
                                               presets="|".join(PRESETS), extra=""))
@click.option("--vocab", help="Labels: a comma-separated list or a train.csv (labels normalised "
                              "with the synonym map, sorted). Default: the notebook's 42 labels.")
@click.option("--synonyms", type=click.Choice(["seed", "rich"]), default="seed", show_default=True,
              help="Synonym map for --vocab CSV: the notebook's (seed), or a wider one that also "
                   "merges child/kid/baby/lady into person and strips plurals (rich).")
@click.option("--prompt-templates", help="OWL-ViT prompt templates separated by '|', each with "
                                         "{l} for the label. Default: the seed's six.")
@click.option("--gdino-size", default="800", show_default=True, callback=lambda c, p, v: _size(v),
              help="Grounding DINO's fixed canvas, N or HxW (one graph per size).")
@click.option("--seed", default=0, show_default=True, help="Seed for random presets and golden inputs.")
@click.option("--no-check", is_flag=True, help="Skip the golden check after building.")
@click.option("--target", type=click.Choice(["onnx", "trt"]), default="onnx", show_default=True,
              help="trt: then also build TensorRT engines for this GPU (as `sdexport engines`).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
              help="--target onnx: the graphs' precision, fp32 (default) or int8 (onnxruntime "
                   "dynamic quantisation of every graph, e.g. owlvit/image.int8.onnx, checked "
                   "against PyTorch fp32 with its own tolerances). --target trt: the engines' "
                   "precision, fp16 (default) or fp32.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1),
              help="With --target trt: pairs per call the engines serve without splitting.")
def build(out, preset, owlvit, gdino, siamese, siamese_ckpt, clip, vocab, synonyms, prompt_templates,
          gdino_size, seed, no_check, target, precision, max_batch):
    """Export the models to ONNX with a manifest and golden samples, then check the bundle.

    \b
    Examples:
      sdexport build --preset tiny-random --out engines/tiny
      sdexport build --preset full-random --gdino none --out engines/full-owl
      sdexport build --preset full-random --precision int8 --out engines/full-int8
      sdexport build --out engines/real --owlvit ./owlvit-folder --gdino none
    """
    from sdrun.bundle.vocab import parse_vocabulary

    from .build import build_bundle, resolve_sources

    try:
        sources = resolve_sources(preset, {"owlvit": owlvit, "gdino": gdino,
                                           "siamese": siamese, "clip": clip})
        labels = parse_vocabulary(vocab, synonyms)
        templates = None
        if prompt_templates:
            templates = [t.strip() for t in prompt_templates.split("|") if t.strip()]
            bad = [t for t in templates if "{l}" not in t]
            if bad:
                raise click.BadParameter(f"template(s) without {{l}}: {bad}")
        if target == "trt":
            precision = precision or "fp16"
            if precision == "int8":
                raise click.BadParameter("int8 is an ONNX precision (--target onnx); TensorRT "
                                         "engines are fp16 or fp32", param_hint="--precision")
        else:
            precision = precision or "fp32"
            if precision == "fp16":
                raise click.BadParameter("fp16 is a TensorRT engine precision (--target trt); "
                                         "ONNX graphs are fp32 or int8", param_hint="--precision")
        if target == "trt":
            from sdrun.backends.trt import cuda_api, gpu_info, import_tensorrt

            import_tensorrt()  # before a long export: TensorRT and a GPU must be there
            gpu_info(cuda_api())
        build_bundle(out, sources, labels, templates, seed=seed, gdino_size=gdino_size,
                     siamese_ckpt=siamese_ckpt, check=not no_check, log=click.echo,
                     precision=precision if target == "onnx" else "fp32",
                     inputs=[("--vocab", vocab)] if vocab and Path(vocab).exists() else [])
        if target == "trt":
            _engines(out, precision, max_batch, (), False, 8.0, None)
    except (SpotdiffError, ValueError, FileNotFoundError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


@main.command()
@click.argument("bundle", type=click.Path(file_okay=False, exists=True))
@click.option("--precision", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True,
              help="fp16 engines are checked with rel_l2 <= 1e-2 and rebuilt with LayerNorm, "
                   "GridSample and deformable attention (then more) pinned to fp32 while they "
                   "fail; fp32 engines (TF32 off) with rel_l2 <= 1e-4.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1),
              help="Pairs per call (sdrun --batch-pairs) the engines serve without splitting: "
                   "detectors get 4 views per pair, CLIP up to 64 crops.")
@click.option("--model", "models", multiple=True,
              help="Only this model's graphs, or one graph as MODEL/GRAPH (repeatable).")
@click.option("--force", is_flag=True, help="Rebuild this GPU's engines even when cached.")
@click.option("--workspace-gb", default=8.0, show_default=True, help="TensorRT workspace limit.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=None,
              help="TensorRT builder optimisation level (default: TensorRT's, 3); lower builds faster.")
def engines(bundle, precision, max_batch, models, force, workspace_gb, opt_level):
    """Build TensorRT engines of every graph of BUNDLE for the GPU this runs on.

    Engines are stored under a key of GPU architecture, TensorRT version and
    precision (e.g. trt/sm90-trt10.16.1-fp16/), recorded in the manifest with their
    sha256, profiles, fp32-pinned layers and golden-check result. Engines of other
    keys are kept; this key's engines are reused when up to date. Exits 1 if a graph
    fails its golden check even in fp32.
    """
    try:
        _engines(bundle, precision, max_batch, models, force, workspace_gb, opt_level)
    except SpotdiffError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


def _engines(bundle, precision, max_batch, models, force, workspace_gb, opt_level):
    from .engines import build_engines

    results = build_engines(bundle, precision=precision, max_batch=max_batch,
                            models=list(models) or None, force=force, workspace_gb=workspace_gb,
                            opt_level=opt_level, log=click.echo)
    for r in results:
        click.echo(f"  {r.name:14} {r.status:7} stage {r.stage or '-':24} pinned {r.pinned:5} "
                   f"max rel_l2 {r.check.get('max_rel_l2', '-')}")
    failed = [r.name for r in results if r.status == "failed"]
    if failed:
        click.echo(f"{len(failed)} graph(s) failed their golden check: {', '.join(failed)}", err=True)
        sys.exit(1)


@main.command("measure-memory")
@click.argument("bundle", type=click.Path(file_okay=False, exists=True))
def measure_memory(bundle):
    """Measure what each graph's call costs in memory and record it in BUNDLE's manifest.

    `sdexport build` does this for every bundle it writes; run it on a bundle built
    before, or after moving a bundle to another kind of machine. sdrun splits each model
    call to fit its memory budget with these numbers (without them it assumes a
    conservative table). Each graph runs in a fresh process at batch 1, 2, 8, ... until a
    call stands out of the noise; the graphs' files and the bundle's content id are
    unchanged.
    """
    from .memory import record_graph_memory

    try:
        record_graph_memory(bundle, log=click.echo)
    except SpotdiffError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


@main.command("train-change")
@click.option("--data", required=True, type=click.Path(file_okay=False),
              help="Folder with data/{id}_1.png and data/{id}_2.png (the competition layout).")
@click.option("--csv", "csv_path", required=True, type=click.Path(dir_okay=False),
              help="Labels: img_id,added_objs,removed_objs,changed_objs (e.g. train.csv). The "
                   "weak label of a pair is 1 when any column names a label.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run folder: config.json, split.json, metrics.jsonl, last.pt, best.safetensors. "
                   "New or empty; a folder of an earlier run only with --resume.")
@click.option("--backbone", default=DEFAULT_HUB_IDS["siamese"], show_default=True,
              help="The ViT, as --siamese of `sdexport build`: a timm name, a local timm folder, "
                   "or a preset of random weights, no network: tiny-random (tests), small-random "
                   "(ViT-Ti width, 4 blocks: trains from scratch on a CPU), full-random (B/16).")
@click.option("--heads", type=click.Choice(["change", "per-class"]), default="change", show_default=True,
              help="change: the notebook's change logit; per-class: also 3 x V logits (label v "
                   "added / removed / changed) trained on the CSV's category labels.")
@click.option("--head", type=click.Choice(["notebook", "patch-diff"]), default="notebook", show_default=True,
              help="notebook: an MLP on the mean of all tokens of each image (the notebook's). "
                   "patch-diff: per-patch features of a - b, |a - b| and a * b, max- and mean-pooled: sees "
                   "where the images differ (docs/departures.md).")
@click.option("--loss", type=click.Choice(["focal", "bce"]), default="focal", show_default=True,
              help="focal: the notebook's focal loss (alpha 0.25, gamma 2); bce: plain binary "
                   "cross-entropy, whose probabilities are calibrated (docs/departures.md).")
@click.option("--sampler", type=click.Choice(["balanced", "shuffle"]), default="balanced", show_default=True,
              help="balanced: draw changed and unchanged pairs equally often (with replacement); "
                   "shuffle: every pair once per epoch, in a random order.")
@click.option("--vocab", help="per-class heads: the labels (a comma-separated list or a CSV); "
                              "default: every label of --csv, normalised and sorted (the notebook's).")
@click.option("--epochs", default=5, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=1e-4, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="AdamW's peak learning rate (linear warm-up over 10% of the steps, then cosine).")
@click.option("--weight-decay", default=0.05, show_default=True, type=click.FloatRange(min=0))
@click.option("--val-frac", default=0.2, show_default=True, type=float,
              help="Share of the pairs held out for validation (a split drawn from --seed).")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--workers", default=0, show_default=True, type=click.IntRange(0),
              help="DataLoader worker processes (0: load images in this process).")
@click.option("--resume", is_flag=True, help="Continue the run in --out after its last finished epoch "
                                             "(an error when --out holds no run).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train_change(data, csv_path, out, backbone, heads, head, loss, sampler, vocab, epochs, batch_size, lr,
                 weight_decay, val_frac, seed, device, workers, resume, quiet):
    """Train the notebook's Siamese change model (its dataset, augmentations, weak label and
    focal loss; a class-balanced sampler; AdamW, warm-up + cosine) on labelled pairs.

    Per epoch: train loss, validation loss, ROC-AUC and best F1 of the change logit, into
    OUT/metrics.jsonl. The best epoch (by validation AUC) is OUT/best.safetensors:

    \b
      sdexport build --out engines/trained --siamese-ckpt OUT/best.safetensors ...
      sdrun tune engines/trained --data DIR --csv train.csv
      sdrun run engines/trained --data TEST --out submission.csv
    """
    from sdrun.bundle.vocab import parse_vocabulary

    from .train.loop import TrainConfig
    from .train.loop import train_change as run

    try:
        if vocab is not None and heads != "per-class":
            raise click.UsageError("--vocab names the labels of per-class heads: add --heads "
                                   "per-class, or leave --vocab out")
        cfg = TrainConfig(data=data, csv=csv_path, backbone=backbone, heads=heads, head=head, loss=loss,
                          sampler=sampler, epochs=epochs,
                          batch_size=batch_size, lr=lr, weight_decay=weight_decay, val_frac=val_frac,
                          seed=seed, vocab=parse_vocabulary(vocab) if vocab is not None else None)
        vocab_file = [("--vocab", vocab)] if vocab is not None and Path(vocab).exists() else []
        best = run(cfg, out, resume=resume, device=device, workers=workers, progress=not quiet,
                   log=lambda m: click.echo(m, err=True), inputs=vocab_file)
    except (SpotdiffError, ValueError, OSError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if best:
        auc = "n/a (one class in validation)" if best.get("val_auc") is None else f"{best['val_auc']:.3f}"
        click.echo(f"best epoch {best['epoch']}: val AUC {auc}, best F1 "
                   f"{best['val_best_f1']:.3f} -> {out}/best.safetensors")


if __name__ == "__main__":
    main()
