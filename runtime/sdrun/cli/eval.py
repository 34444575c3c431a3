"""`sdrun score`, `sdrun eval`, `sdrun tune`."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from .options import MAX_PIXELS, MEMORY_BUDGET, PROVIDER, THREADS, load_pipeline

DATA = click.option("--data", required=True, type=click.Path(file_okay=False),
                    help="Folder with data/{id}_1.png and data/{id}_2.png (or the images directly).")
CSV = click.option("--csv", "csv_path", required=True, type=click.Path(dir_okay=False),
                   help="The labels: img_id,added_objs,removed_objs,changed_objs (e.g. train.csv). "
                        "Rows without images in --data are left out, with a warning.")
SEED = click.option("--seed", default=0, show_default=True, help="Seed of the validation split.")
CACHE = click.option("--cache", "cache_dir", type=click.Path(file_okay=False),
                     help="Cache folder (default: BUNDLE/../.sdrun-cache/). One subfolder per bundle "
                          "key, one .npz per pair.")
RAW = click.option("--raw-labels", is_flag=True,
                   help="Compare words as written in the CSV; by default both sides go through the "
                        "synonym map first (man, guy -> person), as `sdrun score --normalize`.")
BATCH = click.option("--batch-pairs", default=1, show_default=True, type=click.IntRange(1),
                     help="Pairs per model call while filling the cache.")
QUIET = click.option("--quiet", is_flag=True, help="No progress bars.")


def _warn(msg: str) -> None:
    click.echo(msg, err=True)


def register(group: click.Group) -> None:
    """Add this module's commands to the `sdrun` group."""

    @group.command()
    @click.argument("submission", type=click.Path(dir_okay=False))
    @click.argument("truth", type=click.Path(dir_okay=False))
    @click.option("--normalize", is_flag=True,
                  help="Map every word on both sides through the notebook's synonym map first "
                       "(man, guy, worker -> person; auto, sedan -> car).")
    @click.option("--json", "as_json", is_flag=True, help="Print the scores as one JSON object.")
    def score(submission, truth, normalize, as_json):
        """Score SUBMISSION.csv against TRUTH.csv with the competition's metric.

        For each row and column, the F1 of the predicted and true word sets (words split
        on spaces and commas; 'none' in any case, an empty or blank cell is the empty set;
        both empty scores 1, exactly one empty 0);
        rows averaged per column, then the three columns averaged. Beside it, the
        micro set-F1 (every (row, word) pooled per column), for comparison with the
        seed's set-F1.

        Both files need img_id, added_objs, removed_objs, changed_objs and the same ids:
        a missing column, a repeated id, an id the truth does not have or one the
        submission lacks is an error that lists the ids.
        """
        from ..apps.score import score_files

        s = score_files(submission, truth, normalize=normalize)
        if as_json:
            click.echo(json.dumps({**s.to_json(), "normalize": normalize}))
        else:
            click.echo(s.table())

    @group.command(name="eval")
    @click.argument("bundle", type=click.Path(file_okay=False))
    @DATA
    @CSV
    @click.option("--val-frac", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True),
                  help="Evaluate only a validation split of this share of the pairs (the same split "
                       "`sdrun tune --val-frac F --seed S` holds out). 0: every pair.")
    @SEED
    @click.option("--out", default="eval-report", show_default=True, type=click.Path(file_okay=False),
                  help="Report folder to write (report.md, PNGs, predictions.csv, pairs.csv).")
    @click.option("--worst", default=12, show_default=True, type=click.IntRange(0),
                  help="How many of the worst pairs to draw.")
    @CACHE
    @click.option("--no-cache", is_flag=True,
                  help="Run the pipeline directly (CLIP on kept boxes only) without reading or "
                       "filling the cache. Same answers; faster once, but `sdrun tune` must then "
                       "run the models again.")
    @RAW
    @BATCH
    @PROVIDER
    @THREADS
    @MEMORY_BUDGET
    @MAX_PIXELS
    @click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
                  help="Override a bundle parameter (repeatable), e.g. det_thr=0.3.")
    @QUIET
    def eval_(bundle, data, csv_path, val_frac, seed, out, worst, cache_dir, no_cache, raw_labels,
              batch_pairs, provider, threads, params, quiet):
        """Run BUNDLE on labelled pairs and write a report: the metric per column and per
        label, the most missed and most wrongly predicted labels, the worst pairs as
        pictures, and pair score against change score.

        The model outputs go through the cache (see `sdrun tune`), so a later tune (or
        eval with other --param values) runs no model again. The truth is normalised
        with the synonym map unless --raw-labels.
        """

        from ..apps.dataset import pair_inputs
        from ..apps.evaluate import REPORT_FILES, evaluate, load_labelled, worst_picture_path, write_report
        from ..apps.tune import split_ids
        from ..files import check_output_paths

        pipe = load_pipeline(bundle, provider, threads, params)
        lab = load_labelled(data, csv_path, normalize=not raw_labels, warn=_warn)
        check_output_paths({**{f"--out {name}": Path(out) / name for name in REPORT_FILES},
                            **{f"--out worst picture of pair {i}": worst_picture_path(out, i)
                               for i, _, _ in lab.pairs}},
                           [("the --csv file", Path(csv_path)), *pair_inputs(lab.pairs)],
                           [("the bundle", Path(bundle))])
        pairs = lab.pairs
        split = "every pair"
        if val_frac > 0:
            val = set(split_ids([p[0] for p in pairs], val_frac, seed)[1])
            pairs = [p for p in pairs if p[0] in val]
            split = f"the validation split (--val-frac {val_frac} --seed {seed})"
        t0 = time.perf_counter()
        cache_note = "no cache (models run directly)"
        if no_cache:
            from tqdm import tqdm

            results = {str(r.pair_id): r for r in tqdm(pipe.run(pairs, batch_pairs=batch_pairs),
                                                        total=len(pairs), unit="pair", disable=quiet,
                                                        desc="pairs", dynamic_ncols=True)}
            for i, r in results.items():
                if not r.ok:
                    _warn(f"error: pair {i}: {r.error}")
        else:
            from ..apps.cache import OutputCache

            cache = OutputCache(pipe, cache_dir)
            fill = cache.fill(pairs, batch_pairs=batch_pairs, progress=not quiet, warn=_warn)
            results = {i: pipe.finish(o) for i, o in fill.outputs.items()}
            cache_note = (f"cache {cache.folder}: {fill.computed} pair(s) computed now, "
                          f"{len(fill.outputs) - fill.computed} read")
        seconds = time.perf_counter() - t0
        ev = evaluate(results, lab.truth)
        from ..apps.tune import SWEPT
        from ..pipeline import POST_DEFAULTS

        merged = pipe.effective_params
        post = {k: merged.get(k) for k in (*SWEPT, *POST_DEFAULTS)}
        header = [f"- bundle: `{bundle}`", f"- data: `{data}`, labels: `{csv_path}`",
                  f"- pairs: {len(ev.ids)} ({split}); {len(lab.skipped)} labelled row(s) without images left out",
                  f"- truth: {'as written' if raw_labels else 'normalised with the synonym map'}",
                  f"- parameters: `{json.dumps(post)}`",
                  f"- {cache_note}; {seconds:.1f} s"]
        path = write_report(out, ev, {p[0]: (p[1], p[2]) for p in pairs}, header, worst=worst)
        click.echo(ev.score.table())
        click.echo(f"all \"none\" on these pairs: {ev.none_score.mean:.4f}")
        click.echo(f"report -> {path}")
        if len(ev.ids) < len(pairs):
            sys.exit(1)

    @group.command()
    @click.argument("bundle", type=click.Path(file_okay=False))
    @DATA
    @CSV
    @click.option("--val-frac", default=0.2, show_default=True, type=click.FloatRange(0, 1, max_open=True),
                  help="Share of the pairs held out for validation (deterministic by --seed); "
                       "the grid is searched on the rest.")
    @SEED
    @click.option("--grid", "grid_file", type=click.Path(dir_okay=False),
                  help="JSON file replacing grid entries, e.g. {\"det_thr\": [0.2, 0.3], "
                       "\"gate_signals\": []}. Keys: det_thr, iou_thr, alpha, heat_lambda, heat_th "
                       "(lists of values), gate_quantiles (quantiles of the change signal tried as "
                       "'none' gates), gate_signals (change_score, change_logit; [] disables gates).")
    @click.option("--top", default=10, show_default=True, type=click.IntRange(1),
                  help="How many of the best configurations to print.")
    @click.option("--dry-run", is_flag=True, help="Print the results; do not write the parameters.")
    @click.option("--force", is_flag=True,
                  help="Write the winner even when it scores lower than the current parameters on "
                       "the validation pairs.")
    @click.option("--json", "json_out", type=click.Path(dir_okay=False),
                  help="Also write the results (every configuration) to this JSON file.")
    @CACHE
    @RAW
    @BATCH
    @PROVIDER
    @THREADS
    @MEMORY_BUDGET
    @MAX_PIXELS
    @QUIET
    def tune(bundle, data, csv_path, val_frac, seed, grid_file, top, dry_run, force, json_out, cache_dir,
             raw_labels, batch_pairs, provider, threads, quiet):
        """Tune BUNDLE's post-model parameters on labelled pairs and write the winner into
        its parameters file.

        Runs the models once per pair (filling the cache; later tunes read it), then sweeps
        in numpy over the cached outputs every combination of det_thr, iou_thr, alpha,
        heat_lambda, heat_th (3 values each by default: 243 configurations) and, for each,
        the best per-column "none" gate: a threshold on the change score or logit below
        which that column predicts nothing. The metric is the competition's (mean row-F1)
        on the training part; the validation part is reported beside it.

        The winner is merged into params.json (the manifest's sha256 updated, the old file
        kept as params.json.bak) if it beats the current parameters on the training pairs
        and does not lose on the validation pairs (--force: write anyway); `sdrun run` then
        uses it.
        """
        from ..apps.dataset import pair_inputs
        from ..apps.evaluate import load_labelled
        from ..apps.tune import SWEPT, load_grid, run_tune, table, write_choice
        from ..files import atomic_write, check_output_paths

        grid = load_grid(grid_file)
        pipe = load_pipeline(bundle, provider, threads)
        lab = load_labelled(data, csv_path, normalize=not raw_labels, warn=_warn)
        check_output_paths({"--json": Path(json_out) if json_out else None},
                           [("the --csv file", Path(csv_path)),
                            *([("the --grid file", Path(grid_file))] if grid_file else []),
                            *pair_inputs(lab.pairs)],
                           [("the bundle", Path(bundle))])
        s = run_tune(pipe, lab, val_frac=val_frac, seed=seed, grid=grid, cache_dir=cache_dir,
                     batch_pairs=batch_pairs, progress=not quiet, warn=_warn)
        n_pairs = s.n_train + s.n_val
        click.echo(f"{n_pairs} pairs: {s.n_train} to tune on, {s.n_val} to validate "
                   f"(--val-frac {val_frac} --seed {seed}); metric: mean row-F1"
                   f"{'' if raw_labels else ', labels normalised'}")
        click.echo(f"\nbest {min(top, len(s.choices))} of {s.n_configs} configurations (train = with gates):")
        click.echo(table(s.choices, top))
        def val(v):
            return "-" if v is None else f"{v:.4f}"
        click.echo(f"\n{'':26} {'train':>7} {'val':>7}")
        click.echo(f"{'all none':26} {s.none_train:7.4f} {val(s.none_val):>7}")
        click.echo(f"{'current parameters':26} {s.current_train:7.4f} {val(s.current_val):>7}")
        click.echo(f"{'tuned (best on train)':26} {s.best_train_exact:7.4f} {val(s.best_val_exact):>7}")
        if s.heads:
            click.echo("\nper-class change heads, on the tuned detector parameters (thresholds "
                       "chosen per column on train):")
            names = {"off": "heads off", "detectors": "heads confirm detectors", "heads": "heads alone"}
            for h in s.heads:
                thr = ", ".join(f"{c} {'-' if t is None else t}" for c, t in h.thresholds.items())
                click.echo(f"  {names[h.mode]:24} {h.train:7.4f} {val(h.val):>7}   ({thr})")
            best_val = max((h for h in s.heads if h.val is not None), key=lambda h: h.val or 0.0, default=None)
            click.echo(f"  on train: {names[s.heads[0].mode]} (kept); on validation: "
                       f"{names[best_val.mode] if best_val else '-'}")
        if (not s.heads or s.heads[0].mode == "off") and abs(s.best_train_exact - s.best.train) > 1e-9:
            _warn(f"warning: the sweep scored the winner {s.best.train:.6f} but Pipeline.finish "
                  f"{s.best_train_exact:.6f} on the training pairs: please report this")
        per = s.n_configs * n_pairs
        click.echo(f"\ntimes: sweep {s.sweep_seconds:.2f} s for {s.n_configs} configurations x {n_pairs} "
                   f"pairs ({1e6 * s.sweep_seconds / per:.0f} us each; + {s.prep_seconds:.2f} s to "
                   f"prepare the pairs); models {s.model_seconds:.1f} s for these pairs as recorded in "
                   f"the cache, of which CLIP {s.clip_seconds:.1f} s on {s.candidates} candidate boxes "
                   f"(`sdrun run` embeds only the {s.kept} kept ones)"
                   + (f"; {s.computed} pair(s) computed now in {s.fill_seconds:.1f} s" if s.computed else
                      "; every pair read from the cache"))
        params = s.best.params()
        click.echo("\nwinner: " + json.dumps(params))
        if not s.improves_train:
            verdict = ("no configuration beats the current parameters on the training pairs: "
                       "tuning cannot improve them here; nothing written")
            write = False
        elif s.improves_val is False:
            verdict = (f"the winner on the training pairs scores {s.best_val_exact:.4f} on validation, "
                       f"not above the current {s.current_val:.4f}: tuning does not improve validation "
                       "here" + ("; written anyway (--force)" if force else "; nothing written (--force "
                                                                           "writes it anyway)"))
            write = force
        else:
            verdict = (f"tuning improves train {s.current_train:.4f} -> {s.best_train_exact:.4f}"
                       + (f" and validation {s.current_val:.4f} -> {s.best_val_exact:.4f}"
                          if s.n_val else " (no validation pairs: --val-frac 0)"))
            write = True
        ref_t, ref_v = s.best_val_exact, s.none_val
        if ref_v is None:
            ref_t, ref_v = s.best_train_exact, s.none_train
        if ref_t is not None and ref_t <= ref_v + 1e-12:
            verdict += (f" (but no better than saying \"none\" everywhere, {ref_v:.4f} on the "
                        f"{'validation' if s.n_val else 'training'} pairs: the models add nothing here)")
        if write and dry_run:
            verdict += "; not written (--dry-run)"
            write = False
        if write:
            path = write_choice(bundle, s.best)
            verdict += f"; written to {path} (previous parameters in {path.name}.bak)"
        click.echo(verdict)
        if json_out:
            atomic_write(json_out, json.dumps({
                "pairs": {"train": s.n_train, "val": s.n_val}, "val_frac": val_frac, "seed": seed,
                "current": {"params": s.current, "train": s.current_train, "val": s.current_val},
                "all_none": {"train": s.none_train, "val": s.none_val},
                "best": {"params": params, "train": s.best_train_exact, "val": s.best_val_exact},
                "written": write, "verdict": verdict,
                "class_heads": [{"mode": h.mode, "thresholds": h.thresholds, "train": h.train, "val": h.val}
                                for h in s.heads] if s.heads else None,
                "seconds": {"sweep": s.sweep_seconds, "prepare": s.prep_seconds, "models": s.model_seconds,
                            "clip": s.clip_seconds, "fill_now": s.fill_seconds},
                "configurations": [{**{k: ch.config[k] for k in SWEPT}, "gates": ch.gates,
                                    "signal": ch.signal, "train": ch.train, "train_nogate": ch.train_nogate,
                                    "val": ch.val} for ch in s.choices]}, indent=1))
