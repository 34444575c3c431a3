"""Label vocabulary: the default labels, the synonym map, and prompt templates.

Labels are single lower-case words, as in the competition's CSVs.
"""
from __future__ import annotations

import csv
import json
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

LABEL_COLUMNS = ("added_objs", "removed_objs", "changed_objs")


@lru_cache(maxsize=1)
def _defaults() -> dict:
    text = resources.files("sdrun").joinpath("data/vocabulary.json").read_text()
    return json.loads(text)


def default_vocabulary() -> list[str]:
    return list(_defaults()["labels"])


def synonym_map() -> dict[str, str]:
    return dict(_defaults()["synonyms"])


def default_prompt_templates() -> list[str]:
    return list(_defaults()["prompt_templates"])


def normalize_label(word: str) -> str:
    """Lower-case, strip punctuation, map synonyms and simple plurals."""
    w = re.sub(r"[^a-z0-9 ]", "", word.strip().lower())
    syn = synonym_map()
    if w in syn:
        return syn[w]
    if w.endswith("s") and len(w) > 3 and not w.endswith("ss"):
        stem = w[:-1]
        return syn.get(stem, stem)
    return w


def parse_label_cell(cell: str) -> list[str]:
    """A CSV cell ('none' or space-separated words) as a list of words."""
    words = (cell or "").split()
    return [] if words in ([], ["none"]) else words


def vocabulary_from_csv(path: str | Path) -> list[str]:
    """Every normalised label of a competition CSV, sorted by frequency then name."""
    counts: dict[str, int] = {}
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in LABEL_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
        for row in reader:
            for col in LABEL_COLUMNS:
                for w in parse_label_cell(row[col]):
                    label = normalize_label(w)
                    if label:
                        counts[label] = counts.get(label, 0) + 1
    if not counts:
        raise ValueError(f"{path}: no labels found in {', '.join(LABEL_COLUMNS)}")
    return sorted(counts, key=lambda l: (-counts[l], l))


def parse_vocabulary(spec: str | None) -> list[str]:
    """`--vocab`: None for the default, a CSV path, or a comma-separated list."""
    if spec is None:
        return default_vocabulary()
    if spec.endswith(".csv") or Path(spec).is_file():
        return vocabulary_from_csv(spec)
    labels = []
    for part in spec.split(","):
        label = " ".join(part.strip().lower().split())
        if label and label not in labels:
            labels.append(label)
    if not labels:
        raise ValueError(f"--vocab {spec!r} names no labels")
    return labels


def make_prompts(labels: list[str], templates: list[str]) -> tuple[list[str], list[int]]:
    """All prompts (label-major) and, for each, the index of its label."""
    prompts, prompt_labels = [], []
    for i, label in enumerate(labels):
        for t in templates:
            prompts.append(t.format(l=label))
            prompt_labels.append(i)
    return prompts, prompt_labels
