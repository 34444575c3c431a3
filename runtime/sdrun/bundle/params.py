"""The pipeline's parameters: what each one is, and checking values in one place.

Every way a parameter reaches the pipeline goes through `resolve` (each value through
`check_value`, the set through `check_combination`): a bundle's `params.json` (at load and
before `sdrun tune` writes it), `--param NAME=VALUE`, a `sdrun tune` grid, a service
request's `params`, the `params` of `Pipeline(...)` and `Pipeline.finish(...)`. A bad
value is a `ParamError` that names its source (the file, the flag or the request field),
the key and the value, never a numpy error (or silently empty answers) later, pair after
pair.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..csvfile import COLUMNS
from ..errors import SpotdiffError

GATE_SIGNALS = ("change_score", "change_logit")


class ParamError(SpotdiffError):
    """A parameter value that cannot be used; the message names its source and key."""


@dataclass(frozen=True)
class Spec:
    kind: str  # "unit": a number in [0, 1]; "nonneg": a number >= 0; "gate": null or a
    #            number; "unit_or_null": null or a number in [0, 1]; "signal": one of
    #            GATE_SIGNALS; "mode": one of CLASS_MODES
    meaning: str


MODEL_PARAMS = {  # every bundle's params.json has these (sdexport's defaults)
    "det_thr": Spec("nonneg", "keep a box whose fused score = score * (1 + heat_lambda * hot "
                              "share) reaches this"),
    "iou_thr": Spec("unit", "a matched pair needs this affinity; below this IoU it 'changed'"),
    "alpha": Spec("unit", "matching affinity = alpha * IoU + (1 - alpha) * CLIP similarity"),
    "heat_lambda": Spec("nonneg", "how much a hot box's score is raised"),
    "heat_th": Spec("unit", "a heatmap pixel is hot at or above this"),
    "wbf_iou_thr": Spec("unit", "Weighted Boxes Fusion: boxes overlapping this much are fused"),
    "wbf_skip_box_thr": Spec("unit", "Weighted Boxes Fusion: boxes scoring below this are dropped"),
    "owlvit_score_thr": Spec("unit", "OWL-ViT: keep detections scoring at least this"),
    "gdino_box_thr": Spec("unit", "Grounding DINO: keep detections scoring at least this"),
}
# Post-model parameters that bundles built before the "none" gates lack. A gate
# `none_gate_<column>` is a threshold on the pair's `none_gate_signal`: below it, that
# column says nothing. None is off, so these defaults change no result.
POST_DEFAULTS: dict[str, Any] = {"none_gate_signal": "change_score", "none_gate_added": None,
                                 "none_gate_removed": None, "none_gate_changed": None,
                                 # per-class change heads (bundles whose Siamese graph has them)
                                 "class_mode": "detectors", "class_thr_added": None,
                                 "class_thr_removed": None, "class_thr_changed": None}
CLASS_MODES = ("detectors", "heads")
POST_PARAMS = {
    "none_gate_signal": Spec("signal", "what the 'none' gates compare with"),
    **{f"none_gate_{c}": Spec("gate", f"below this signal, '{c}' says none (null: off)")
       for c in COLUMNS},
    "class_mode": Spec("mode", "detectors: the heads only confirm the detectors' labels; heads: "
                               "the heads alone name them"),
    **{f"class_thr_{c}": Spec("unit_or_null", f"a label in '{c}' needs this per-class head "
                                              "probability (null: detectors mode keeps all, heads mode 0.5)")
       for c in COLUMNS},
}
PARAMS: dict[str, Spec] = {**MODEL_PARAMS, **POST_PARAMS}
OFF_WORDS = ("off", "none", "null")  # --param none_gate_added=off


def _shown(value: Any) -> str:
    try:
        return json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        return repr(value)


def check_value(key: str, value: Any, source: str) -> Any:
    """`value` as the pipeline uses it (numbers as float), or ParamError naming
    `source`, `key` and `value`."""
    spec = PARAMS.get(key)
    where = f"{source}: {key}={_shown(value)}"
    if spec is None:
        raise ParamError(f"{source}: unknown parameter {key!r}; known: {', '.join(PARAMS)}")
    if spec.kind == "signal":
        if value not in GATE_SIGNALS:
            raise ParamError(f"{where}: none_gate_signal is one of {', '.join(GATE_SIGNALS)}")
        return value
    if spec.kind == "mode":
        if value not in CLASS_MODES:
            raise ParamError(f"{where}: class_mode is one of {', '.join(CLASS_MODES)}")
        return value
    if value is None and spec.kind in ("gate", "unit_or_null"):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "null" if value is None else type(value).__name__
        want = "a number or null (off)" if spec.kind in ("gate", "unit_or_null") else "a number"
        raise ParamError(f"{where}: expected {want}, got {kind}")
    value = float(value)
    if not math.isfinite(value):
        off = ("; write null (or --param KEY=off) to turn it off"
               if spec.kind in ("gate", "unit_or_null") else "")
        raise ParamError(f"{where}: must be a finite number{off}")
    if spec.kind in ("unit", "unit_or_null") and not 0.0 <= value <= 1.0:
        raise ParamError(f"{where}: must lie in [0, 1] ({spec.meaning})")
    if spec.kind == "nonneg" and value < 0.0:
        raise ParamError(f"{where}: must be >= 0 ({spec.meaning})")
    return value


def validate(params: Any, source: str, complete: bool = False) -> dict[str, Any]:
    """Every key and value of `params` checked (ParamError naming `source`); with
    `complete`, every model parameter must be there (a bundle's params.json)."""
    if not isinstance(params, Mapping):
        raise ParamError(f"{source}: expected a JSON object of parameters like "
                         f"{{\"det_thr\": 0.25}}, got {type(params).__name__}")
    out = {str(k): check_value(str(k), v, source) for k, v in params.items()}
    if complete:
        missing = [k for k in MODEL_PARAMS if k not in out]
        if missing:
            raise ParamError(f"{source}: missing parameter(s) {', '.join(missing)}")
    return out


def combination_problem(params: Mapping[str, Any], class_heads: bool | None = None) -> str | None:
    """What is wrong across the parameters of one complete set (None: nothing): a det_thr no
    box can reach, or per-class head settings for a bundle without heads (`class_heads`
    False; None: not known, not checked)."""
    det, lam = params.get("det_thr"), params.get("heat_lambda")
    if det is not None and lam is not None and det > 1.0 + lam:
        return (f"det_thr={det:g} keeps no box: fused scores are at most "
                f"1 + heat_lambda = {1.0 + lam:g}")
    if class_heads is False:
        used = [k for k in ("class_thr_added", "class_thr_removed", "class_thr_changed")
                if params.get(k) is not None]
        if params.get("class_mode", "detectors") != "detectors":
            used.insert(0, f"class_mode={params['class_mode']}")
        if used:
            return (f"{', '.join(used)}: this bundle's Siamese graph has no per-class change heads "
                    "(build it with a checkpoint of `sdexport train-change --heads per-class`)")
    return None


def check_combination(params: Mapping[str, Any], source: str, class_heads: bool | None = None) -> None:
    """ParamError naming `source` when `combination_problem` finds something."""
    problem = combination_problem(params, class_heads)
    if problem:
        raise ParamError(f"{source}: {problem}")


def resolve(base: Mapping[str, Any], overrides: Any, source: str,
            class_heads: bool | None = None) -> dict[str, Any]:
    """The complete set a pipeline runs with: the post-model defaults, `base` (already
    checked: a bundle's parameters) and `overrides` (checked here), then the checks across
    parameters. The one gate for every source of parameters; errors name `source`."""
    merged = {**POST_DEFAULTS, **base, **(validate(overrides, source) if overrides else {})}
    check_combination(merged, source, class_heads)
    return merged


def parse_overrides(items: Sequence[str], source: str = "--param") -> dict[str, Any]:
    """`NAME=VALUE` strings (the command line's `--param`) as checked values."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise ParamError(f"{source} {item!r}: expected NAME=VALUE, e.g. det_thr=0.3")
        spec = PARAMS.get(key)
        if spec is None:
            raise ParamError(f"{source} {item!r}: unknown parameter {key!r}; known: {', '.join(PARAMS)}")
        if spec.kind in ("signal", "mode"):
            value: Any = text
        elif spec.kind in ("gate", "unit_or_null") and text.lower() in OFF_WORDS:
            value = None
        else:
            try:
                value = float(text)
            except ValueError:
                raise ParamError(f"{source} {item!r}: {text!r} is not a number") from None
        out[key] = check_value(key, value, source)
    return out
