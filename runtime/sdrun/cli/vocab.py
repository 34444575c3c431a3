"""`sdrun vocab`: write a copy of a bundle for another label vocabulary."""
from __future__ import annotations

import click

from .options import THREADS


def register(group: click.Group) -> None:
    """Add this module's command to the `sdrun` group."""

    @group.command()
    @click.argument("bundle", type=click.Path(file_okay=False))
    @click.option("--out", required=True, type=click.Path(file_okay=False),
                  help="The new bundle's folder: new or empty, not BUNDLE and not inside it.")
    @click.option("--labels", "labels_file", type=click.Path(exists=True, dir_okay=False),
                  help="A text file with one label per line (in the order given; '#' lines "
                       "skipped).")
    @click.option("--vocab", help="A train.csv (its labels normalised with --synonyms, sorted: the "
                                  "notebook's vocabulary) or a comma-separated list of labels.")
    @click.option("--synonyms", type=click.Choice(["seed", "rich"]), default="seed", show_default=True,
                  help="Synonym map for a --vocab CSV: the notebook's (seed) or a wider one (rich).")
    @click.option("--copy", "copy_files", is_flag=True,
                  help="Copy the files that do not change. Default: hard links to BUNDLE's files "
                       "where the file system allows (no extra space; spotdiff never writes a "
                       "bundle file in place, so neither bundle can change the other).")
    @click.option("--drop-class-heads", is_flag=True,
                  help="For a bundle whose Siamese graph has per-class change heads (trained on "
                       "its vocabulary): leave them out of the new bundle (without this flag "
                       "such a bundle is refused). The change logit and heat map stay.")
    @THREADS
    def vocab(bundle, out, labels_file, vocab, synonyms, copy_files, drop_class_heads, threads):
        """Write a copy of BUNDLE that detects another set of labels, without PyTorch.

        \b
        OWL-ViT:        the prompts of every label (the bundle's templates, e.g. "a photo
                        of a {l}") embedded by owlvit/text.onnx -> new query embeddings.
        Grounding DINO: the prompt "l1. l2. ... ln", its token -> label map, and
                        gdino/model.onnx respecialised to it with gdino/text.onnx. A prompt
                        longer than the text model reads (max_text_len: 256 tokens in
                        grounding-dino-base) is an error that says how many labels fit.
        Golden samples: those that do not depend on the prompt stay PyTorch's; the others
                        are recorded by onnxruntime here; `sdrun check` tells them apart.

        The other graphs are hard links (or --copy copies) of BUNDLE's; BUNDLE is never
        changed. Parameters (params.json) are kept: tune them for the new labels with
        `sdrun tune`. TensorRT engines of a changed graph are left out (build them again).
        Needs the vocab extra: pip install 'spotdiff[vocab]'.

        \b
        Examples:
          sdrun vocab engines/full --out engines/dock --vocab "pallet,forklift,helmet"
          sdrun vocab engines/full --out engines/dock --labels labels.txt
          sdrun vocab engines/full --out engines/comp --vocab train.csv --synonyms rich
          sdrun check engines/dock
        """
        from ..apps.vocab import change_vocabulary
        from ..bundle.vocab import parse_vocabulary, read_labels_file

        if (labels_file is None) == (vocab is None):
            raise click.UsageError("give the new labels with exactly one of --labels FILE or --vocab")
        try:
            labels = read_labels_file(labels_file) if labels_file else parse_vocabulary(vocab, synonyms)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--labels" if labels_file else "--vocab") from None
        r = change_vocabulary(bundle, out, labels, copy=copy_files, drop_class_heads=drop_class_heads,
                              threads=threads)
        click.echo(f"{r.out}: {len(r.labels)} labels; {len(r.rewritten)} file(s) written, "
                   f"{r.linked} hard-linked and {r.copied} copied from {bundle}, in {r.seconds:.1f} s")
        for what in r.dropped:
            click.echo(f"  left out: {what}")
        click.echo(f"check it with: sdrun check {r.out}")
