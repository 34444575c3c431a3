"""The detectors' prompts for a vocabulary, and their token ids from a bundle's tokenizer.json.

- OWL-ViT: every label through every prompt template (`vocab.make_prompts`: the notebook's
  `prompts_for_label`), each tokenised to a fixed length (CLIP BPE, truncated keeping the
  end token, padded with the pad id), as `OwlViTProcessor` does.
- Grounding DINO: the notebook's one prompt `'. '.join(labels)`, its token ids, and the
  token -> label map made from the labels' character spans (the runtime never decodes
  phrases). A prompt longer than the text model reads is an error naming how many labels fit.

The export side builds its bundles with these same functions (`sdexport.models.gdino`);
`sdrun vocab` uses them with the bundle's `tokenizer.json`, read by the `tokenizers`
library (the `vocab` extra), never transformers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import SpotdiffError

PROMPT_SEPARATOR = ". "  # the notebook's text: '. '.join(labels)
GDINO_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class PromptError(SpotdiffError):
    """Labels that cannot make a prompt (too long for the text model, a separator inside)."""


# ---- Grounding DINO ----------------------------------------------------------------------

def make_prompt(labels: list[str]) -> str:
    """The notebook's Grounding DINO text: 'l1. l2. ... ln' (no final period)."""
    return PROMPT_SEPARATOR.join(labels)


def label_spans(labels: list[str]) -> list[tuple[int, int]]:
    """Character span of each label inside `make_prompt(labels)`."""
    spans, pos = [], 0
    for label in labels:
        spans.append((pos, pos + len(label)))
        pos += len(label) + len(PROMPT_SEPARATOR)
    return spans


def token_label_map(offsets, spans: list[tuple[int, int]]) -> np.ndarray:
    """Label index of every token (by character span), -1 for [CLS], [SEP] and "."."""
    out = np.full(len(offsets), -1, dtype=np.int64)
    for t, (start, end) in enumerate(offsets):
        if end <= start:  # special tokens have empty spans
            continue
        for i, (s, e) in enumerate(spans):
            if s <= start and end <= e:
                out[t] = i
                break
    return out


def labels_that_fit(n_tokens: Callable[[int], int], n_labels: int, limit: int) -> int:
    """The most leading labels whose prompt has at most `limit` tokens; `n_tokens(k)`: the
    token count of the prompt of the first k labels (it grows with k)."""
    lo, hi = 0, n_labels  # n_tokens(lo) fits (or lo == 0); find the largest that does
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if n_tokens(mid) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def too_long(limit: int, labels: list[str], n: int, n_tokens: Callable[[int], int]) -> PromptError:
    """The error for a prompt of `n` tokens over the text model's `limit`."""
    fit = labels_that_fit(n_tokens, len(labels), limit)
    return PromptError(
        f"Grounding DINO reads at most {limit} prompt tokens; the {len(labels)} labels make {n}: "
        f"{fit} label(s) fit" + (f" (the first {fit}, up to {labels[fit - 1]!r})" if fit else "")
        + ". Use fewer or shorter labels, or a bundle without Grounding DINO")


def check_labels(labels: list[str]) -> None:
    """Labels that can share one Grounding DINO prompt: non-empty, distinct, no '.' (the
    separator, which would split a label into two phrases)."""
    if not labels:
        raise PromptError("no labels given")
    seen = set()
    for label in labels:
        if not label.strip():
            raise PromptError("an empty label")
        if "." in label or "\n" in label:
            raise PromptError(f"label {label!r}: a label may not hold '.' or a line break "
                              "(Grounding DINO's prompt separates labels with '. ')")
        if label in seen:
            raise PromptError(f"label {label!r} is given twice")
        seen.add(label)


def gdino_tokens(tokenizer: Any, labels: list[str], max_text_len: int) -> dict[str, np.ndarray]:
    """The prompt's `input_ids`, `attention_mask`, `token_type_ids` ([1, T] int64) and
    `token_labels` ([T]) from a `tokenizers.Tokenizer` (BERT WordPiece)."""
    check_labels(labels)

    def encode(k: int):
        return tokenizer.encode(make_prompt(labels[:k]))

    enc = encode(len(labels))
    if len(enc.ids) > max_text_len:
        raise too_long(max_text_len, labels, len(enc.ids), lambda k: len(encode(k).ids))
    out = {"input_ids": enc.ids, "attention_mask": enc.attention_mask, "token_type_ids": enc.type_ids}
    text = {k: np.asarray(v, dtype=np.int64)[None] for k, v in out.items()}
    text["token_labels"] = token_label_map(enc.offsets, label_spans(labels))
    return text


# ---- OWL-ViT -------------------------------------------------------------------------------

def owlvit_tokens(tokenizer: Any, prompts: list[str], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """`input_ids` and `attention_mask` [P, length] int64 of every prompt, as OWL-ViT's
    processor makes them (padding="max_length", truncation=True): a longer prompt keeps its
    end token, a shorter one is padded with `pad_id` (mask 0)."""
    tokenizer.enable_truncation(max_length=length)
    tokenizer.enable_padding(length=length, pad_id=pad_id, pad_token=tokenizer.id_to_token(pad_id))
    encs = tokenizer.encode_batch(prompts)
    return {"input_ids": np.asarray([e.ids for e in encs], dtype=np.int64),
            "attention_mask": np.asarray([e.attention_mask for e in encs], dtype=np.int64)}


# ---- reading tokenizer.json ----------------------------------------------------------------

def load_tokenizer(path: str | Path, plain: bool = True) -> Any:
    """A bundle's tokenizer.json as a `tokenizers.Tokenizer` (with `plain`: no truncation or
    padding configured). ImportError when `tokenizers` is missing: the caller names the extra."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    if plain:
        tok.no_truncation()
        tok.no_padding()
    return tok
