"""The `sdexport` command line."""
from __future__ import annotations

import sys

import click

from sdrun.errors import SpotdiffError

from .sources import DEFAULT_HUB_IDS, PRESETS


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
@click.version_option(package_name="spotdiff")
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
                                                  presets="|".join(PRESETS), extra=""))
@click.option("--siamese-ckpt", type=click.Path(dir_okay=False),
              help="SiameseViTChange state dict (backbone.*, head.*): .safetensors or a torch "
                   "checkpoint (loaded with weights_only=True).")
@click.option("--clip", help=SOURCE_HELP.format(default="open_clip " + DEFAULT_HUB_IDS["clip"],
                                               presets="|".join(PRESETS), extra=""))
@click.option("--vocab", help="Labels: a comma-separated list or a train.csv (labels normalised "
                              "with the synonym map). Default: the built-in 42 labels.")
@click.option("--prompt-templates", help="OWL-ViT prompt templates separated by '|', each with "
                                         "{l} for the label. Default: the seed's six.")
@click.option("--gdino-size", default="800", show_default=True, callback=lambda c, p, v: _size(v),
              help="Grounding DINO's fixed canvas, N or HxW (one graph per size).")
@click.option("--seed", default=0, show_default=True, help="Seed for random presets and golden inputs.")
@click.option("--no-check", is_flag=True, help="Skip the golden check after building.")
def build(out, preset, owlvit, gdino, siamese, siamese_ckpt, clip, vocab, prompt_templates,
          gdino_size, seed, no_check):
    """Export the models to ONNX with a manifest and golden samples, then check the bundle.

    \b
    Examples:
      sdexport build --preset tiny-random --out engines/tiny
      sdexport build --preset full-random --gdino none --out engines/full-owl
      sdexport build --out engines/real --owlvit ./owlvit-folder --gdino none
    """
    from sdrun.vocab import parse_vocabulary

    from .build import build_bundle, resolve_sources

    try:
        sources = resolve_sources(preset, {"owlvit": owlvit, "gdino": gdino,
                                           "siamese": siamese, "clip": clip})
        labels = parse_vocabulary(vocab)
        templates = None
        if prompt_templates:
            templates = [t.strip() for t in prompt_templates.split("|") if t.strip()]
            bad = [t for t in templates if "{l}" not in t]
            if bad:
                raise click.BadParameter(f"template(s) without {{l}}: {bad}")
        build_bundle(out, sources, labels, templates, seed=seed, gdino_size=gdino_size,
                     siamese_ckpt=siamese_ckpt, check=not no_check, log=click.echo)
    except (SpotdiffError, ValueError, FileNotFoundError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
