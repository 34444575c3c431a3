"""Label vocabulary: the default labels, the synonym map, and prompt templates.

Labels are single lower-case words, as in the competition's CSVs.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ..csvfile import LABEL_COLUMNS, read_csv


@lru_cache(maxsize=1)
def _defaults() -> dict:
    text = resources.files("sdrun").joinpath("data/vocabulary.json").read_text()
    return json.loads(text)


def default_vocabulary() -> list[str]:
    return list(_defaults()["labels"])


SYNONYM_MAPS = ("seed", "rich")
DEFAULT_SYNONYMS = "seed"


def _synonyms(name: str) -> dict[str, str]:
    """'seed': the notebook's table (man, guy, worker, ... -> person; auto, sedan -> car;
    pickup, lorry -> truck; bike -> bicycle; fence -> barrier). 'rich': a wider one that
    also merges child/kid/baby/lady/... into person and strips plurals."""
    maps = _defaults()["synonyms"]
    if name not in maps:
        raise ValueError(f"unknown synonym map {name!r}; choose one of {', '.join(SYNONYM_MAPS)}")
    return maps[name]


def default_prompt_templates() -> list[str]:
    return list(_defaults()["prompt_templates"])


def normalize_label(word: str, synonyms: str = DEFAULT_SYNONYMS) -> str:
    """One word of a label cell as the notebook normalises it: lower-cased, then looked
    up in the synonym map ('rich' also strips punctuation and simple plurals)."""
    syn = _synonyms(synonyms)
    if synonyms != "rich":
        w = word.strip().lower()
        return syn.get(w, w)
    w = re.sub(r"[^a-z0-9 ]", "", word.strip().lower())
    if w in syn:
        return syn[w]
    if w.endswith("s") and len(w) > 3 and not w.endswith("ss"):
        stem = w[:-1]
        return syn.get(stem, stem)
    return w


def parse_label_cell(cell: str | None) -> list[str]:
    """A CSV cell as its words: split on spaces and commas, 'none' and empty words dropped
    (the notebook's reading of a cell)."""
    return [w for w in re.split(r"[ ,]+", (cell or "").strip()) if w and w.lower() != "none"]


def vocabulary_from_csv(path: str | Path, synonyms: str = DEFAULT_SYNONYMS) -> list[str]:
    """Every normalised label of a competition CSV, sorted (the notebook's vocabulary)."""
    labels: set[str] = set()
    path = Path(path)
    names, rows = read_csv(path)
    missing = [c for c in LABEL_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    for _, row in rows:
        for col in LABEL_COLUMNS:
            labels.update(w for w in (normalize_label(x, synonyms) for x in parse_label_cell(row.get(col)))
                          if w)
    if not labels:
        raise ValueError(f"{path}: no labels found in {', '.join(LABEL_COLUMNS)}")
    return sorted(labels)


def clean_label(text: str) -> str:
    """A label as given by a user: lower-cased, runs of white space made one space."""
    return " ".join(text.strip().lower().split())


def _distinct(labels) -> list[str]:
    out: list[str] = []
    for label in map(clean_label, labels):
        if label and label not in out:
            out.append(label)
    return out


def _is_file(spec: str) -> bool:
    try:
        return Path(spec).is_file()
    except OSError:  # a long list of labels is no file name
        return False


def parse_vocabulary(spec: str | None, synonyms: str = DEFAULT_SYNONYMS) -> list[str]:
    """`--vocab`: None for the default, a CSV path, or a comma-separated list."""
    if spec is None:
        return default_vocabulary()
    if spec.endswith(".csv") or _is_file(spec):
        return vocabulary_from_csv(spec, synonyms)
    labels = _distinct(spec.split(","))
    if not labels:
        raise ValueError(f"--vocab {spec!r} names no labels")
    return labels


def read_labels_file(path: str | Path) -> list[str]:
    """A labels file: one label per line, in the order given (blank lines and lines starting
    with '#' skipped, repeats dropped), each cleaned like `--vocab`'s (`clean_label`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read as a text file of labels ({e})") from None
    labels = _distinct(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    if not labels:
        raise ValueError(f"{path}: no labels (expected one label per line)")
    return labels


def make_prompts(labels: list[str], templates: list[str]) -> tuple[list[str], list[int]]:
    """All prompts (label-major) and, for each, the index of its label."""
    prompts, prompt_labels = [], []
    for i, label in enumerate(labels):
        for t in templates:
            prompts.append(t.format(l=label))
            prompt_labels.append(i)
    return prompts, prompt_labels
