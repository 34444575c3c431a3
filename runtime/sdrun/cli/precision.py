"""`sdrun precision`: measure which graphs may run bf16 under OpenVINO and record it."""
from __future__ import annotations

import json
import sys

import click

from .options import MAX_PIXELS, PARAM, THREADS, max_pixels, parse_params


def register(group: click.Group) -> None:
    """Add this module's command to the `sdrun` group."""

    @group.command()
    @click.argument("bundle", type=click.Path(file_okay=False))
    @click.option("--data", type=click.Path(file_okay=False),
                  help="Folder of pairs ({id}_1.png, {id}_2.png) to judge the answers on, besides "
                       "the synthetic ones. Real pairs of your own make the policy trustworthy.")
    @click.option("--synthetic", default=20, show_default=True, type=click.IntRange(0),
                  help="Synthetic pairs (sdrun synth's, seed 0) to judge on as well.")
    @click.option("--write", is_flag=True,
                  help="Record the policy in BUNDLE's manifest ('openvino' section); `--provider "
                       "openvino` then follows it. Without it nothing is written.")
    @click.option("--force", is_flag=True,
                  help="Measure on a CPU without bf16 (avx512_bf16 or AMX) too. OpenVINO runs bf16 "
                       "there in f32, so every graph comes out f32: useful only to test the command.")
    @click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
    @THREADS
    @MAX_PIXELS
    @PARAM
    def precision(bundle, data, synthetic, write, force, as_json, threads, params):
        """Choose each graph's OpenVINO precision (f32 or bf16) by the answers it keeps.

        Every graph is timed on its golden inputs in f32 and bf16; those that gain are
        tried in bf16 with the whole pipeline, all at once first, then one graph (and
        Grounding DINO's backbone, encoder, decoder and heads one part) at a time. A
        choice stands only if every pair's added/removed/changed label sets equal the
        onnxruntime fp32 pipeline's. The drift of each bf16 graph on its golden inputs
        sets the tolerance `sdrun check --provider openvino` holds it to.

        \b
        Example:
          sdrun precision engines/full --data my-pairs/ --param det_thr=0.9 --write
          sdrun run engines/full --data test/ --out sub.csv --provider openvino
        """
        from ..apps.dataset import list_pairs
        from ..apps.precision import measure_policy
        from ..apps.synth import make_pair, pair_rng
        from ..backends.cpu import isa_summary
        from ..backends.openvino_backend import describe, has_bf16, import_openvino
        from ..bundle.bundle import Bundle, write_openvino_policy
        from ..stages.images import load_image

        import_openvino()
        if not has_bf16() and not force:
            raise click.ClickException(
                f"this CPU has no bf16 arithmetic ({isa_summary()}): OpenVINO would run every bf16 "
                "graph in f32, so nothing can be measured here. Run it on the machine kind that will "
                "serve (avx512_bf16: AMD Zen 4; AMX: Xeon Sapphire Rapids and later), or --force.")
        b = Bundle.load(bundle)
        pairs = []
        for i in range(synthetic):
            img1, img2, _, _ = make_pair(pair_rng(0, i))
            pairs.append((f"synth-{i}", img1, img2))
        if data:
            for p in list_pairs(data):
                if p.problem or p.a is None or p.b is None:
                    click.echo(f"skipped pair {p.pair_id}: {p.problem}", err=True)
                    continue
                try:
                    pairs.append((p.pair_id, load_image(p.a, max_pixels=max_pixels()),
                                  load_image(p.b, max_pixels=max_pixels())))
                except Exception as e:  # one unreadable pair is reported, not fatal
                    click.echo(f"skipped pair {p.pair_id}: {e}", err=True)
        if not pairs:
            raise click.ClickException("no pairs to judge on: give --data or --synthetic > 0")
        report = measure_policy(b, pairs, params=parse_params(params), threads=threads)
        section = report.section()
        if as_json:
            click.echo(json.dumps(section, indent=2))
        else:
            click.echo(f"{len(pairs)} pairs, {len(report.trials)} pipeline trials")
            for key, prec in report.policy.items():
                tol = report.tolerance.get(key)
                click.echo(f"  {key:14} bf16 {report.speedup.get(key, 1.0):.2f}x f32 on its goldens -> "
                           f"{describe(prec)}" + (f" (check rel_l2 <= {tol})" if tol else ""))
        if write:
            path = write_openvino_policy(b.root, section)
            click.echo(f"policy recorded in {path}", err=True)
        sys.exit(0)
