"""`sdrun vocab`: a copy of a bundle for another vocabulary, without PyTorch.

Everything a new label set needs is in the bundle already:

- OWL-ViT: the prompts (`vocab.make_prompts`: every label through the bundle's templates),
  tokenised with `owlvit/tokenizer.json`, embedded by `owlvit/text.onnx` ->
  `query_embeds.npy` and `prompt_labels.npy`;
- Grounding DINO: the notebook's `'. '.join(labels)` tokenised with `gdino/tokenizer.json`
  (ids, masks, the token -> label map), and `gdino/model.onnx` respecialised to it with
  `gdino/text.onnx` (`sdrun.bundle.specialise.respecialise`);
- golden samples: those that do not depend on the prompt stay PyTorch's; the ones that do
  (Grounding DINO's outputs, OWL-ViT's query embeddings) are recorded here by onnxruntime
  and listed in the model's `runtime_golden`, so `sdrun check` says which is which.

The new bundle is written in a staging folder beside `--out` and renamed into place when it
verifies; the files that do not change are hard links to the old bundle's (`copy`: copies).
The old bundle is never written. Needs the `vocab` extra (onnx, tokenizers).
"""
from __future__ import annotations

import copy as copying
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from ..backends.session import OnnxModel
from ..bundle.bundle import MANIFEST, Bundle, golden_cases, sha256_file
from ..bundle.params import POST_DEFAULTS
from ..bundle.prompts import GDINO_TEXT_INPUTS, check_labels, gdino_tokens, load_tokenizer, make_prompt, owlvit_tokens
from ..bundle.vocab import default_prompt_templates, make_prompts
from ..errors import SpotdiffError
from ..files import atomic_write, check_output_folder, check_output_paths, replace_folder

logger = logging.getLogger(__name__)

EXTRA = "vocab"
CLASS_HEAD_OUTPUT = "class_logits"
CLASS_PARAMS = ("class_mode", "class_thr_added", "class_thr_removed", "class_thr_changed")
RECORDED_BY = "sdrun vocab"


class VocabError(SpotdiffError):
    """A bundle that cannot take another vocabulary, or missing tools."""


def require_extra() -> None:
    """VocabError naming the `vocab` extra when onnx or tokenizers is missing."""
    for module in ("onnx", "tokenizers"):
        try:
            __import__(module)
        except ImportError:
            raise VocabError(f"sdrun vocab needs the {EXTRA} extra ({module} is missing): "
                             f"pip install 'spotdiff[{EXTRA}]'") from None


@dataclass
class VocabResult:
    out: Path
    labels: list[str]
    rewritten: list[str]  # files written anew (relative paths)
    linked: int  # unchanged files hard-linked to the old bundle's
    copied: int  # unchanged files copied
    dropped: list[str] = field(default_factory=list)  # what the new bundle leaves out
    content_id: str = ""
    seconds: float = 0.0


# ---- checks before anything is written ------------------------------------------------------

def class_heads_problem(bundle: Bundle, labels: list[str], drop_class_heads: bool) -> str | None:
    """Why the bundle's per-class change heads forbid `labels` (None: they don't)."""
    if not bundle.has_class_heads or drop_class_heads or labels == bundle.vocabulary:
        return None
    n = bundle.model("siamese")["class_heads"].get("labels", len(bundle.vocabulary))
    return (f"{bundle.root}: its Siamese graph has per-class change heads trained on its {n} labels; "
            "they cannot score other labels. Pass --drop-class-heads to leave them out (the change "
            "logit and heat map stay), or train heads on the new labels (`sdexport train-change "
            "--heads per-class`) and build a bundle with them")


def int8_problem(bundle: Bundle) -> str | None:
    """An int8 Grounding DINO graph: quantisation renamed the prompt's initializers."""
    if not bundle.has("gdino"):
        return None
    g = bundle.model("gdino")["graphs"]["model"]
    if g.get("precision") == "int8":
        return (f"{bundle.root}: its Grounding DINO graph is int8; change the vocabulary of the fp32 "
                "bundle it was quantised from, then quantise the result")
    return None


# what each model needs of the bundle to take another vocabulary (bundles of every sdexport
# that wrote schema 1 with these models have them; a hand-made one may not)
NEEDED = {"owlvit": ("tokenizer_file", "text_length", "pad_token_id", "prompt_labels_file",
                     "query_embeds_file", "golden_file"),
          "gdino": ("tokenizer_file", "max_text_len", "prompt_folding", "image_size", "golden_file",
                    *(f"{k}_file" for k in (*GDINO_TEXT_INPUTS, "token_labels")))}


def missing_pieces(bundle: Bundle) -> str | None:
    """What the bundle lacks to take another vocabulary (None: nothing)."""
    lacking = [f"{model}.{key}" for model, keys in NEEDED.items() if bundle.has(model)
               for key in keys if key not in bundle.model(model)]
    if bundle.has("owlvit") and "text" not in bundle.model("owlvit").get("graphs", {}):
        lacking.append("owlvit.graphs.text")
    if not lacking:
        return None
    return (f"{bundle.root / MANIFEST}: the bundle lacks {', '.join(lacking)}, which another "
            "vocabulary needs; rebuild it with `sdexport build --vocab ...`")


def check_paths(bundle: Path, out: Path) -> None:
    """--out is not BUNDLE, lies outside it, does not hold it, and is new or empty."""
    check_output_paths({"--out": out}, protected_dirs=[("BUNDLE", bundle)])
    check_output_folder(out, "--out", inputs=[("BUNDLE", bundle)])


# ---- the models ------------------------------------------------------------------------------

def owlvit_entry(src: Bundle, entry: dict, labels: list[str], templates: list[str], stage: Path,
                 threads: int | None) -> list[str]:
    """New prompts, query embeddings and prompt labels (and the query embeddings as a golden
    case of the text graph, recorded by onnxruntime). Returns the files written."""
    prompts, prompt_labels = make_prompts(labels, templates)
    tok = load_tokenizer(src.path(entry["tokenizer_file"]))
    tokens = owlvit_tokens(tok, prompts, int(entry["text_length"]), int(entry["pad_token_id"]))
    text = OnnxModel(src.path(entry["graphs"]["text"]["file"]), "cpu", threads)
    queries = text.run(tokens)["text_embeds"]
    _save_npy(stage, entry["query_embeds_file"], queries)
    _save_npy(stage, entry["prompt_labels_file"], np.asarray(prompt_labels, np.int64))
    golden = _without_runtime_cases(src.arrays(entry["golden_file"]), entry)
    golden.update(_golden_arrays("prompts", "text", tokens, {"text_embeds": queries}))
    _save_npz(stage, entry["golden_file"], golden)
    entry["prompts"] = prompts
    entry["runtime_golden"] = _runtime_golden(["prompts/text"], "the query embeddings of the new prompts")
    logger.info("owlvit: %d prompts embedded by %s", len(prompts), entry["graphs"]["text"]["file"])
    return [entry["query_embeds_file"], entry["prompt_labels_file"], entry["golden_file"]]


def gdino_entry(src: Bundle, entry: dict, labels: list[str], stage: Path, threads: int | None) -> list[str]:
    """The new prompt's ids and token -> label map, the graph respecialised to it, and its
    golden outputs recorded by onnxruntime on the old golden images. Returns the files written."""
    from ..bundle.specialise import respecialise

    tok = load_tokenizer(src.path(entry["tokenizer_file"]))
    text = gdino_tokens(tok, labels, int(entry["max_text_len"]))
    for k in (*GDINO_TEXT_INPUTS, "token_labels"):
        _save_npy(stage, entry[f"{k}_file"], text[k])
    graph_rel = entry["graphs"]["model"]["file"]
    folding = entry["prompt_folding"]
    fixed = folded_feeds(folding["inputs"], text, tuple(entry["image_size"]))
    t0 = time.perf_counter()
    respecialise(src.path(graph_rel), src.path(folding["text_graph"]), _target(stage, graph_rel), fixed)
    logger.info("gdino: %s respecialised to the %d-token prompt in %.1f s", graph_rel,
                text["input_ids"].shape[1], time.perf_counter() - t0)
    t0 = time.perf_counter()
    model = OnnxModel(stage / graph_rel, "cpu", threads)
    golden: dict[str, np.ndarray] = {}
    cases = []
    for (case, graph), io in sorted(golden_cases(src.arrays(entry["golden_file"])).items()):
        if graph != "model":
            continue
        feeds = prompt_feeds(io["in"], text)
        golden.update(_golden_arrays(case, graph, feeds, model.run(feeds)))
        cases.append(f"{case}/{graph}")
    _save_npz(stage, entry["golden_file"], golden)
    logger.info("gdino: golden outputs of %d case(s) recorded in %.1f s", len(cases), time.perf_counter() - t0)
    entry["prompt"] = make_prompt(labels)
    entry["runtime_golden"] = _runtime_golden(cases, "the graph was respecialised to a prompt PyTorch never ran")
    return [*(entry[f"{k}_file"] for k in (*GDINO_TEXT_INPUTS, "token_labels")), graph_rel,
            entry["golden_file"]]


def folded_feeds(inputs: list[str], text: dict[str, np.ndarray], image_size: tuple[int, ...]
                 ) -> dict[str, np.ndarray]:
    """The batch-1 values of the inputs folded into Grounding DINO's graph: the prompt's ids
    and masks, and the all-ones pixel mask of the bundle's canvas."""
    out = {}
    for name in inputs:
        if name in GDINO_TEXT_INPUTS:
            out[name] = text[name]
        elif name == "pixel_mask":
            out[name] = np.ones((1, *image_size), np.int64)
        else:
            raise VocabError(f"Grounding DINO's prompt_folding names input {name!r}, which this sdrun "
                             "cannot make; use an sdrun as new as the bundle")
    return out


def prompt_feeds(inputs: dict[str, np.ndarray], text: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A golden case's inputs with the prompt's ids and masks replaced by the new prompt's
    (repeated to the case's batch)."""
    batch = len(inputs["pixel_values"])
    return {**inputs, **{k: np.repeat(text[k], batch, axis=0) for k in GDINO_TEXT_INPUTS}}


def drop_class_heads(src: Bundle, entry: dict, stage: Path) -> list[str]:
    """The Siamese graph without its `class_logits` output (and the nodes only it used); its
    PyTorch golden outputs for heat and logit stay. Returns the files written."""
    from ..bundle.graph_edit import drop_outputs

    graph = entry["graphs"]["pair"]
    removed = drop_outputs(src.path(graph["file"]), _target(stage, graph["file"]), [CLASS_HEAD_OUTPUT])
    graph["outputs"] = [o for o in graph.get("outputs", []) if o.get("name") != CLASS_HEAD_OUTPUT]
    golden = {k: v for k, v in src.arrays(entry["golden_file"]).items()
              if k.split("__", 3)[2:] != ["out", CLASS_HEAD_OUTPUT]}
    _save_npz(stage, entry["golden_file"], golden)
    del entry["class_heads"]
    logger.info("siamese: per-class change heads dropped (%d nodes)", removed)
    return [graph["file"], entry["golden_file"]]


def params_without_class_heads(params: dict[str, Any]) -> dict[str, Any]:
    """A params.json for a bundle whose class heads were dropped: their settings removed."""
    return {k: v for k, v in params.items() if k not in CLASS_PARAMS or v == POST_DEFAULTS[k]}


# ---- the whole bundle ------------------------------------------------------------------------

def change_vocabulary(bundle: str | Path, out: str | Path, labels: list[str], *, copy: bool = False,
                      drop_class_heads: bool = False, threads: int | None = None) -> VocabResult:
    """Write the bundle at `bundle` with the vocabulary `labels` to the new folder `out`."""
    t0 = time.perf_counter()
    bundle, out = Path(bundle), Path(out)
    require_extra()
    labels = list(labels)
    check_labels(labels)
    check_paths(bundle, out)
    src = Bundle.load(bundle)
    for problem in (missing_pieces(src), class_heads_problem(src, labels, drop_class_heads),
                    int8_problem(src)):
        if problem:
            raise VocabError(problem)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.vocab-"))
    try:
        result = _write(src, stage, labels, copy, drop_class_heads and src.has_class_heads, threads)
        replace_folder(stage, out, inputs=[("BUNDLE", bundle)])
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    result.out = out
    result.seconds = time.perf_counter() - t0
    logger.info("%s: %d labels, %d file(s) written, %d hard-linked, %d copied, in %.1f s", out,
                len(labels), len(result.rewritten), result.linked, result.copied, result.seconds)
    return result


def _write(src: Bundle, stage: Path, labels: list[str], copy: bool, drop_heads: bool,
           threads: int | None) -> VocabResult:
    manifest = copying.deepcopy(src.manifest)
    models = manifest["models"]
    written: list[str] = []
    dropped: list[str] = []
    if "gdino" in models:  # first: a prompt too long for it is refused before anything runs
        written += gdino_entry(src, models["gdino"], labels, stage, threads)
    if "owlvit" in models:
        templates = manifest.get("prompt_templates") or default_prompt_templates()
        written += owlvit_entry(src, models["owlvit"], labels, templates, stage, threads)
    if drop_heads:
        written += drop_class_heads(src, models["siamese"], stage)
        rel = manifest["params_file"]
        params = params_without_class_heads(src.json(rel))
        atomic_write(_target(stage, rel), json.dumps(params, indent=2) + "\n")
        written.append(rel)
        dropped.append("the Siamese per-class change heads (and their parameters)")
    graph_files = {g["file"] for e in models.values() for g in (e.get("graphs") or {}).values()}
    dropped += _drop_stale_engines(manifest, graph_files & set(written))
    if manifest.pop("openvino", None) is not None:
        dropped.append("the OpenVINO precision policy (measured on the old answers: run `sdrun precision`)")
    files, linked, copied = _files_table(src, stage, manifest["files"], set(written), copy)
    manifest["files"] = files
    manifest["source_files"], more_linked, more_copied = _files_table(
        src, stage, manifest.get("source_files") or {}, set(), copy)
    old_vocabulary = src.vocabulary
    manifest["vocabulary"] = labels
    manifest.setdefault("vocab_changes", []).append({
        "by": RECORDED_BY, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_bundle": str(src.root.resolve()), "source_content_id": src.content_id,
        "source_vocabulary": old_vocabulary, "files_written": sorted(written),
        "dropped": dropped, "tools": _tool_versions()})
    atomic_write(stage / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    new = Bundle.load(stage)  # every file verifies against the new manifest
    logger.info("parameters kept from %s (tuned, if at all, for its vocabulary: `sdrun tune` on "
                "labelled pairs of the new one)", src.root)
    return VocabResult(out=stage, labels=labels, rewritten=sorted(written), linked=linked + more_linked,
                       copied=copied + more_copied, dropped=dropped, content_id=new.content_id)


def _drop_stale_engines(manifest: dict, graph_files: set[str]) -> list[str]:
    """Remove the TensorRT engines built from graphs that changed (and their files)."""
    dropped = []
    for key, section in list((manifest.get("engines") or {}).items()):
        graphs = section.get("graphs", {})
        for name, g in list(graphs.items()):
            if g.get("onnx_file") in graph_files:
                for k in ("file", "pinned_file"):
                    if g.get(k):
                        manifest["files"].pop(g[k], None)
                del graphs[name]
                dropped.append(f"TensorRT engine {key} {name} (its graph changed: build it again)")
        if not graphs:
            del manifest["engines"][key]
    if "engines" in manifest and not manifest["engines"]:
        del manifest["engines"]
    return dropped


def _files_table(src: Bundle, stage: Path, files: dict, written: set[str], copy: bool
                 ) -> tuple[dict, int, int]:
    """The new bundle's table for `files`: digests of the files written, the old entries for
    the others, which are hard-linked (or copied) into `stage`."""
    table, linked, copied = {}, 0, 0
    for rel, meta in files.items():
        if rel in written:
            path = stage / rel
            table[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            continue
        if not (src.root / rel).is_file():  # only `source_files` may be absent (not verified)
            logger.warning("%s: missing; the new bundle does not list it", src.root / rel)
            continue
        if link_or_copy(src.root / rel, _target(stage, rel), copy):
            linked += 1
        else:
            copied += 1
        table[rel] = meta
    return table, linked, copied


def link_or_copy(source: Path, target: Path, copy: bool) -> bool:
    """Hard-link `source` to `target` (True), or copy it when `copy` or the file system
    cannot link (False)."""
    if not copy:
        try:
            os.link(source, target)
            return True
        except OSError:
            pass
    shutil.copy2(source, target)
    return False


# ---- small helpers ---------------------------------------------------------------------------

def _target(stage: Path, rel: str) -> Path:
    path = stage / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _save_npy(stage: Path, rel: str, arr: np.ndarray) -> None:
    with open(_target(stage, rel), "wb") as f:
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)


def _save_npz(stage: Path, rel: str, arrays: dict[str, np.ndarray]) -> None:
    with open(_target(stage, rel), "wb") as f:
        np.savez_compressed(f, **cast(dict[str, Any], arrays))  # (numpy's stubs: allow_pickle)


def _golden_arrays(case: str, graph: str, inputs: dict, outputs: dict) -> dict[str, np.ndarray]:
    """Golden arrays keyed like the export side's (`{case}__{graph}__{in|out}__{name}`)."""
    out = {}
    for kind, arrays in (("in", inputs), ("out", outputs)):
        for name, arr in arrays.items():
            out[f"{case}__{graph}__{kind}__{name}"] = np.ascontiguousarray(arr)
    return out


def _without_runtime_cases(golden: dict[str, np.ndarray], entry: dict) -> dict[str, np.ndarray]:
    """A golden file's arrays without the cases an earlier `sdrun vocab` recorded."""
    stale = set(entry.get("runtime_golden", {}).get("cases", []))
    return {k: v for k, v in golden.items() if "/".join(k.split("__", 3)[:2]) not in stale}


def _runtime_golden(cases: list[str], why: str) -> dict:
    import onnxruntime

    return {"cases": sorted(cases), "recorded_by": RECORDED_BY, "provider": "cpu",
            "onnxruntime": onnxruntime.__version__, "why": why}


def _tool_versions() -> dict:
    import importlib.metadata as md

    from ..version import version

    out = {"spotdiff": version()}
    for dist in ("onnx", "onnxruntime", "tokenizers", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out
