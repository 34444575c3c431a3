"""`sdrun run`: a whole folder of pairs -> submission CSV + one JSON line per pair.

Nothing is lost when a run is killed: each batch's lines are appended to the
details file and flushed as soon as the batch is done. `resume=True` keeps the
complete lines, drops a torn last line, and runs the rest; batches are aligned to
positions in the id list, so a resumed run feeds the models exactly the batches an
uninterrupted run does, and the final files are byte-identical.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .dataset import SUBMISSION_COLUMNS, PairSource, submission_row
from .pipeline import PairResult, Pipeline


@dataclass
class RunSummary:
    total: int
    done_before: int
    failed: list[str]
    duplicates: list[str]


def _json_line(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n"


def read_done(details: Path) -> dict[str, str]:
    """img_id -> its complete JSON line; a torn last line (killed mid-write) is cut off."""
    if not details.exists():
        return {}
    data = details.read_bytes()
    good_end, done = 0, {}
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            break
        done[str(obj["img_id"])] = line.decode()
        good_end += len(line)
    if good_end != len(data):
        with open(details, "r+b") as f:
            f.truncate(good_end)
    return done


def _atomic_write(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, newline="")
    os.replace(tmp, path)


def run_dataset(pipe: Pipeline, pairs: list[PairSource], out_csv: Path, details: Path,
                batch_pairs: int = 1, resume: bool = False, viz_dir: Path | None = None,
                progress: bool = True, warn: Callable[[str], None] | None = None) -> RunSummary:
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    unique = [p for p in pairs if not (p.problem or "").startswith("duplicate id")]
    duplicates = [p.pair_id for p in pairs if p not in unique]
    for p in pairs:
        if p.problem and p.pair_id in duplicates:
            warn(f"error: {p.problem}")
    done = read_done(details) if resume else {}
    done_before = sum(p.pair_id in done for p in unique)
    if not resume:
        details.parent.mkdir(parents=True, exist_ok=True)
        details.write_text("")
    if viz_dir is not None:
        viz_dir.mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm

    bar = tqdm(total=len(unique), initial=done_before, unit="pair", disable=not progress,
               dynamic_ncols=True, desc="pairs")
    with open(details, "a", encoding="utf-8") as out:
        for start in range(0, len(unique), batch_pairs):
            batch = unique[start:start + batch_pairs]
            if all(p.pair_id in done for p in batch):
                continue
            results = _run_batch(pipe, batch)
            lines = []
            for p, r in zip(batch, results):
                if r.error:
                    warn(f"error: pair {p.pair_id}: {r.error}")
                if p.pair_id in done:
                    continue
                line = _json_line(r.to_json())
                done[p.pair_id] = line
                lines.append(line)
                if viz_dir is not None and r.ok:
                    from .viz import save_pair_viz

                    save_pair_viz(viz_dir / f"{p.pair_id}.png", p.a, p.b, r)
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
    _atomic_write(details, "".join(done[p.pair_id] for p in unique))
    _atomic_write(out_csv, rows.getvalue())
    return RunSummary(len(unique), done_before, failed, duplicates)


def _run_batch(pipe: Pipeline, batch: list[PairSource]) -> list[PairResult]:
    runnable = [p for p in batch if not p.problem]
    results = {p.pair_id: PairResult(pair_id=p.pair_id, error=p.problem) for p in batch if p.problem}
    for p, r in zip(runnable, pipe.run([(p.pair_id, p.a, p.b) for p in runnable],
                                       batch_pairs=max(1, len(runnable)))):
        results[p.pair_id] = r
    return [results[p.pair_id] for p in batch]
