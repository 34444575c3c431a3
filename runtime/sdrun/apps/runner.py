"""`sdrun run`: a whole folder of pairs -> submission CSV + one JSON line per pair.

Nothing is lost when a run is killed: each batch's lines are appended to the
details file and flushed as soon as the batch is done. `resume=True` keeps the
complete lines, drops a torn last line, and runs the rest; batches are aligned to
positions in the id list, so a resumed run feeds the models exactly the batches an
uninterrupted run does, and the final files are byte-identical.

Resume knows what it resumes: beside the details file, `<details>.run.json` records
what produced it (the bundle's content id, the effective parameters, the spotdiff
version). Resuming with another bundle, other parameters or another version is an
error that lists what differs (`force_rerun` starts over instead). A pair recorded
with an error is run again; a line that is not a spotdiff record is reported by its
line number and its pair run again. While a run writes a details file it holds a lock
on it, so a second run on the same file stops at once instead of mixing lines.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, cast

from ..csvfile import COLUMNS, SUBMISSION_COLUMNS
from ..errors import SpotdiffError
from ..files import atomic_write, id_file_stem
from ..pipeline import PairResult, Pipeline
from .dataset import PairSource, submission_row

log = logging.getLogger(__name__)

RUN_RECORD_FORMAT = "spotdiff-run/1"
RECORD_KEYS = {"img_id": str, **{c: list for c in COLUMNS}}


class ResumeError(SpotdiffError):
    """A details file that cannot be resumed with these settings."""


def run_record_path(details: Path) -> Path:
    return details.with_name(details.name + ".run.json")


def viz_picture_path(viz_dir: Path, pair_id: str) -> Path:
    """Where `--viz` draws a pair: a plain file name made from its id, inside `viz_dir`."""
    return viz_dir / f"{id_file_stem(pair_id)}.png"


def run_record(pipe: Pipeline) -> dict:
    """What produced a details file: compared field by field on resume."""
    from ..version import __version__

    return {"format": RUN_RECORD_FORMAT, "spotdiff": __version__,
            "bundle": {"path": str(Path(pipe.bundle.root).resolve()), "content_id": pipe.bundle.content_id},
            "params": dict(sorted(pipe.effective_params.items())), "provider": pipe.provider}


def record_differences(before: dict, now: dict) -> list[str]:
    """What differs between the run record of a details file and this run's, in words
    (the provider is not compared: it changes the last digits at most)."""
    out = []
    if before.get("spotdiff") != now["spotdiff"]:
        out.append(f"spotdiff version {before.get('spotdiff')} there, {now['spotdiff']} now")
    b_then, b_now = before.get("bundle") or {}, now["bundle"]
    if b_then.get("content_id") != b_now["content_id"]:
        out.append(f"bundle {b_then.get('path')} (content {str(b_then.get('content_id'))[:12]}) there, "
                   f"{b_now['path']} (content {b_now['content_id'][:12]}) now")
    p_then, p_now = before.get("params") or {}, now["params"]
    for k in sorted(set(p_then) | set(p_now)):
        if p_then.get(k, "(unset)") != p_now.get(k, "(unset)"):
            out.append(f"{k} {p_then.get(k, '(unset)')} there, {p_now.get(k, '(unset)')} now")
    return out


@dataclass
class RunSummary:
    total: int
    done_before: int
    failed: list[str]
    duplicates: list[str]


def _json_line(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n"


def _record_problem(obj) -> str | None:
    if not isinstance(obj, dict):
        return f"a JSON {type(obj).__name__}, not a spotdiff record (an object with img_id)"
    missing = [k for k in RECORD_KEYS if k not in obj]
    if missing:
        return f"an object without {', '.join(missing)}: not a spotdiff record"
    wrong = [k for k, t in RECORD_KEYS.items() if not isinstance(obj[k], t)]
    if wrong or not all(isinstance(w, str) for k in COLUMNS for w in obj[k]):
        return f"a record whose {', '.join(wrong) or 'label lists'} have the wrong type"
    return None


def read_done(details: Path, warn: Callable[[str], None] | None = None) -> dict[str, str]:
    """img_id -> its complete JSON line, for pairs that ran without error. A torn last
    line (killed mid-write) is cut off; any other line that is not a spotdiff record is
    reported (by line number) and its pair runs again."""
    warn = warn or log.warning
    if not details.exists():
        return {}
    data = details.read_bytes()
    lines = data.splitlines(keepends=True)
    if lines and not lines[-1].endswith(b"\n"):
        with open(details, "r+b") as f:  # a torn last line: the run was killed writing it
            f.truncate(len(data) - len(lines[-1]))
        lines = lines[:-1]
    done: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        problem: str | None
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            problem = f"not UTF-8 text ({e.reason} at byte {e.start})"
        except json.JSONDecodeError as e:
            problem = f"not JSON ({e.msg}, column {e.colno})"
        else:
            problem = _record_problem(obj)
        if problem:
            warn(f"warning: {details} line {number}: {problem}; ignored (its pair runs again)")
            continue
        if obj.get("error"):
            done.pop(str(obj["img_id"]), None)  # failed before: run again
            continue
        done[str(obj["img_id"])] = line.decode("utf-8")
    return done


def _read_run_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResumeError(f"{path}: cannot be read as a spotdiff run record ({e}); run without "
                          "--resume to start over, or add --force-rerun") from None
    if not isinstance(record, dict) or record.get("format") != RUN_RECORD_FORMAT:
        raise ResumeError(f"{path}: not a spotdiff run record (format "
                          f"{record.get('format') if isinstance(record, dict) else None!r}, "
                          f"expected {RUN_RECORD_FORMAT!r})")
    return record


def check_resumable(details: Path, record: dict) -> None:
    """ResumeError unless `details` was written by a run with this `record`'s bundle,
    parameters and version (an empty or absent details file resumes as a fresh run)."""
    if not details.exists() or details.stat().st_size == 0:
        return
    rpath = run_record_path(details)
    if not rpath.exists():
        raise ResumeError(f"{details}: no record of what produced it ({rpath} is missing: written "
                          "by an older spotdiff, or deleted), so it cannot be resumed safely; run "
                          "without --resume to start over, or add --force-rerun")
    diffs = record_differences(_read_run_record(rpath), record)
    if diffs:
        raise ResumeError(f"{details} was written with other settings ({rpath}): "
                          + "; ".join(diffs) + ". Run with the same bundle and --param values to "
                          "resume, or add --force-rerun to rerun every pair with these")


def _lock(f, details: Path) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; runs on one file are the user's care
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise ResumeError(f"{details}: another sdrun run is writing this details file; wait for "
                          "it to finish, or give this run other --out/--details paths") from None


def run_dataset(pipe: Pipeline, pairs: list[PairSource], out_csv: Path, details: Path,
                batch_pairs: int = 1, resume: bool = False, viz_dir: Path | None = None,
                progress: bool = True, warn: Callable[[str], None] | None = None,
                force_rerun: bool = False, execute: "BatchExecutor | None" = None) -> RunSummary:
    """Run every pair, appending to `details` as batches finish; then write the sorted
    details and the submission atomically. `resume` keeps what `details` already holds
    (ResumeError if another bundle, other parameters or another spotdiff wrote it, unless
    `force_rerun`, which starts over).

    `execute` runs the batches still to do: given [(start, [PairSource, ...]), ...] it
    yields (start, results) in any order, a result being a PairResult or its JSON dict
    (`sdrun.apps.ray_run` runs them on a Ray cluster). Default: here, in order, with `pipe`."""
    warn = warn or log.warning
    repeats = [p for p in pairs if (p.problem or "").startswith("duplicate id")]  # list_pairs marks them
    unique = [p for p in pairs if not (p.problem or "").startswith("duplicate id")]
    duplicates = [p.pair_id for p in repeats]
    for p in repeats:
        warn(f"error: {p.problem}")
    record = run_record(pipe)
    resume = resume and not force_rerun
    details.parent.mkdir(parents=True, exist_ok=True)
    if viz_dir is not None:
        viz_dir.mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm

    with open(details, "a", encoding="utf-8") as out:
        _lock(out, details)
        if resume:
            check_resumable(details, record)
        done = read_done(details, warn) if resume else {}
        if not resume:
            out.truncate(0)
        atomic_write(run_record_path(details), json.dumps(record, indent=2) + "\n")
        done_before = sum(p.pair_id in done for p in unique)
        bar = tqdm(total=len(unique), initial=done_before, unit="pair", disable=not progress,
                   dynamic_ncols=True, desc="pairs")
        by_start = {start: unique[start:start + batch_pairs] for start in range(0, len(unique), batch_pairs)}
        todo = [(start, batch) for start, batch in by_start.items()
                if not all(p.pair_id in done for p in batch)]
        for start, results in (execute or local_executor(pipe))(todo):
            batch = by_start[start]
            lines = []
            for p, r in zip(batch, results):
                obj = r.to_json() if isinstance(r, PairResult) else r
                if obj.get("error"):
                    warn(f"error: pair {p.pair_id}: {obj['error']}")
                if p.pair_id in done:
                    continue
                line = _json_line(obj)
                done[p.pair_id] = line
                lines.append(line)
                if viz_dir is not None and isinstance(r, PairResult) and r.ok:
                    from .viz import save_pair_viz

                    # (a pair that ran has both images)
                    save_pair_viz(viz_picture_path(viz_dir, p.pair_id), cast(Path, p.a), cast(Path, p.b), r)
            out.write("".join(lines))
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(lines))
        bar.close()

        failed = []
        rows = io.StringIO()
        writer = csv.writer(rows, lineterminator="\n")
        writer.writerow(SUBMISSION_COLUMNS)
        for p in unique:
            obj = json.loads(done[p.pair_id])
            if obj.get("error"):
                failed.append(p.pair_id)
            writer.writerow(submission_row(p.pair_id, obj["added"], obj["removed"], obj["changed"]))
        atomic_write(details, "".join(done[p.pair_id] for p in unique))
        atomic_write(out_csv, rows.getvalue())
    return RunSummary(len(unique), done_before, failed, duplicates)


BatchExecutor = Callable[[list], Iterator[tuple[int, list]]]


def local_executor(pipe: Pipeline) -> BatchExecutor:
    """Run each batch here, in order."""
    def execute(todo):
        for start, batch in todo:
            yield start, run_batch(pipe, batch)
    return execute


def run_batch(pipe: Pipeline, batch: list[PairSource]) -> list[PairResult]:
    """One batch of pairs through the pipeline (one call per model); a pair that cannot
    run (`problem`) or fails gets a result with its error."""
    runnable = [p for p in batch if not p.problem]
    results = {p.pair_id: PairResult(pair_id=p.pair_id, error=p.problem) for p in batch if p.problem}
    for p, r in zip(runnable, pipe.run([(p.pair_id, p.a, p.b) for p in runnable],
                                       batch_pairs=max(1, len(runnable)))):
        results[p.pair_id] = r
    return [results[p.pair_id] for p in batch]
