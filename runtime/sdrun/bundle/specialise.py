"""Specialise an ONNX graph to fixed values of some of its inputs, with onnx tooling only.

Grounding DINO's prompt is fixed per bundle, so everything computed from the prompt's
token ids alone (BERT, its projection, the text masks and position ids: 440 MB of weights
at full size) is the same on every call. `specialise` cuts the generic graph in two:

- the *text graph*: the prompt inputs -> every prompt-only tensor the rest consumes (the
  "boundary"), batch 1;
- the *specialised graph*: the rest, with each boundary tensor an initializer (its value
  for the prompt), repeated to the call's batch where it has a batch axis.

`respecialise` puts another prompt's values in (a new vocabulary: run the text graph on its
ids, replace the initializers), so a bundle never needs PyTorch to change its prompt. The
boundary tensors keep their names and shapes stay symbolic along the token axis, so the
consumers are untouched. Everything here is numpy, onnx and onnxruntime: `sdexport build`
specialises, `sdrun vocab` respecialises (onnx comes with the `vocab` extra).

Two refinements: a Shape op whose value would freeze the batch size stays a run-time node
(it then reads a batch-sized boundary tensor), and a Where whose condition folds to an
all-True or all-False mask (masked_fill with a prompt without padding, or an all-ones
pixel mask) becomes an Identity.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SpotdiffError

PROMPT_SUFFIX = "__prompt"  # initializer of a boundary tensor's value: "<tensor>__prompt"
BATCH_SOURCE = "pixel_values"  # the input whose first axis is the call's batch


class SpecialiseError(SpotdiffError, ValueError):
    """A graph that cannot be specialised to a prompt, or a prompt it cannot take."""


def prompt_only_nodes(graph, inputs: set[str], keep: frozenset[str] = frozenset()
                      ) -> tuple[list, set[str]]:
    """Nodes (in graph order) computed from `inputs` and constants alone, at least one input
    among `inputs`; and the tensors they produce. Nodes with subgraphs, and the nodes whose
    first output is in `keep`, stay run-time nodes."""
    constant = {t.name for t in graph.initializer} | {""}
    derived = set(inputs)
    nodes = []
    for node in graph.node:
        if any(a.type in (5, 10) for a in node.attribute) or node.output[0] in keep:
            continue  # GRAPH / GRAPHS attributes, or kept
        ins = set(node.input)
        if not node.input:
            constant.update(node.output)  # Constant
        elif ins <= constant:
            constant.update(node.output)
        elif ins <= constant | derived:
            derived.update(node.output)
            nodes.append(node)
    return nodes, derived


def boundary_tensors(graph, inputs: set[str], keep: frozenset[str] = frozenset()) -> list[str]:
    """The prompt-only tensors that other nodes or the graph's outputs consume."""
    nodes, derived = prompt_only_nodes(graph, inputs, keep)
    inside = {id(n) for n in nodes}
    wanted = []
    for node in graph.node:
        if id(node) in inside:
            continue
        wanted += [t for t in node.input if t in derived]
    wanted += [o.name for o in graph.output if o.name in derived]
    return list(dict.fromkeys(wanted))


def shape_reads(graph, names: list[str], inputs: set[str], keep: frozenset[str]) -> set[str]:
    """First outputs of the Shape nodes among the prompt-only producers of `names`."""
    nodes, _ = prompt_only_nodes(graph, inputs, keep)
    producer = {o: n for n in nodes for o in n.output}
    found, todo, seen = set(), list(names), set()
    while todo:
        t = todo.pop()
        n = producer.get(t)
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        if n.op_type == "Shape":
            found.add(n.output[0])
        else:
            todo += list(n.input)
    return found


def _run(model_proto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    s = ort.InferenceSession(model_proto.SerializeToString(), sess_options=opts,
                             providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(names, {i.name: feeds[i.name] for i in s.get_inputs()})))


def text_graph(model, inputs: list[str], boundary: list[str]):
    """The sub-graph from `inputs` to `boundary` (onnx.utils.Extractor)."""
    import onnx

    model = onnx.shape_inference.infer_shapes(model)
    extractor = onnx.utils.Extractor(model)
    sub = extractor.extract_model(inputs, boundary)
    sub.graph.name = "prompt"
    return sub


def batch_axes(text_model, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
    """Boundary values at batch 1 and each one's batch axis (None: the same for every
    batch), found by running the text graph at batch 1 and batch 2. A batch axis may hold
    a block per batch item (batch*heads rows: 4 at batch 1, 8 at batch 2); the value at
    batch 2 must be the batch-1 value repeated along it, which `Tile` then reproduces."""
    one = _run(text_model, {k: v[:1] for k, v in feeds.items()})
    two = _run(text_model, {k: np.concatenate([v[:1], v[:1]]) for k, v in feeds.items()})
    axes, batch_valued = {}, []
    for name, a in one.items():
        b = two[name]
        differ = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
        if a.ndim != b.ndim or len(differ) > 1 or (
                differ and b.shape[differ[0]] != 2 * a.shape[differ[0]]):
            raise SpecialiseError(f"{name}: shape {a.shape} at batch 1 but {b.shape} at batch 2")
        if not differ and not np.array_equal(a, b):
            batch_valued.append(name)  # e.g. a shape tensor holding the batch size
            continue
        if differ:
            axis = differ[0]
            if not np.array_equal(np.concatenate([a, a], axis=axis), b):
                raise SpecialiseError(f"{name}: batch items differ for one prompt")
        axes[name] = differ[0] if differ else None
    if batch_valued:
        raise BatchValuedError(batch_valued)
    return one, axes


class BatchValuedError(SpecialiseError):
    """Prompt-only tensors whose values (not shapes) change with the batch size."""

    def __init__(self, names: list[str]):
        self.names = names
        super().__init__(f"{', '.join(names)}: its value depends on the batch size")


def specialise(model_path: str | Path, out_path: str | Path, text_path: str | Path,
               feeds: dict[str, np.ndarray]) -> dict:
    """Write the graph at `model_path` specialised to the prompt `feeds` (batch-1 arrays for
    every prompt input) to `out_path`, and its text graph to `text_path`. Returns what was
    done: the boundary tensors with their batch axes, the nodes and bytes removed, the
    Shape ops kept at run time, the Where ops dropped."""
    import onnx

    model = onnx.load(str(model_path))
    graph = model.graph
    inputs = list(feeds)
    missing = set(inputs) - {i.name for i in graph.input}
    if missing:
        raise SpecialiseError(f"{model_path}: no input(s) {', '.join(sorted(missing))}")
    if BATCH_SOURCE not in {i.name for i in graph.input}:
        raise SpecialiseError(f"{model_path}: no {BATCH_SOURCE} input to take the batch from")
    keep: frozenset[str] = frozenset()
    while True:
        boundary = boundary_tensors(graph, set(inputs), keep)
        text = text_graph(model, inputs, boundary)
        try:
            values, axes = batch_axes(text, feeds)
            break
        except BatchValuedError as e:
            # A prompt-only value holds the batch size (a reshape target read off a folded
            # input's shape): keep the Shape ops it comes from at run time, so they read the
            # shape of the batch-sized boundary tensor instead.
            more = shape_reads(graph, e.names, set(inputs), keep)
            if not more:
                raise
            keep = keep | more
    onnx.save(text, str(text_path))

    folded, _ = prompt_only_nodes(graph, set(inputs), keep)
    removed = {id(n) for n in folded}
    kept = live_nodes([n for n in graph.node if id(n) not in removed], graph)
    used = {t for n in kept for t in n.input} | {o.name for o in graph.output}
    before = sum(t.ByteSize() for t in graph.initializer)
    initializers = [t for t in graph.initializer if t.name in used]
    head = _batch_nodes() if any(a is not None for a in axes.values()) else []
    for name in boundary:
        value = values[name]
        if axes[name] is None:
            initializers.append(onnx.numpy_helper.from_array(value, name))
            continue
        initializers.append(onnx.numpy_helper.from_array(value, name + PROMPT_SUFFIX))
        head += _broadcast_nodes(name, value.ndim, axes[name])
    constant_masks = {name: values[name] for name in boundary
                      if values[name].dtype == np.bool_ and values[name].size
                      and (values[name].all() or not values[name].any())}
    kept, n_where = _drop_constant_where(kept, constant_masks)
    nodes = live_nodes(head + kept, graph)
    used = {t for n in nodes for t in n.input} | {o.name for o in graph.output}
    initializers = [t for t in initializers if t.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    kept_inputs = [i for i in graph.input if i.name not in feeds]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    del graph.value_info[:]
    # respecialise must refuse a prompt whose masks are not as uniform as the ones dropped
    fixed = {name: bool(v.all()) for name, v in constant_masks.items()}
    _set_metadata(model, {"constant_masks": fixed})
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    return {"inputs_folded": inputs, "boundary": {n: axes[n] for n in boundary},
            "nodes_removed": len(folded), "shape_ops_kept": len(keep), "where_removed": n_where,
            "weights_bytes_removed": before - sum(t.ByteSize() for t in initializers)}


def _drop_constant_where(nodes: list, masks: dict[str, np.ndarray]) -> tuple[list, int]:
    """Where(mask, a, b) whose mask is a folded boolean tensor that is all True (all False)
    is a copy of a (b): an Identity, which onnxruntime removes. That is what masked_fill
    with a prompt mask without padding, or an all-ones pixel mask, exports to. Only where
    the chosen side is computed at run time: a masked_fill's `self`, which has the output's
    shape (a constant fill value would be broadcast)."""
    from onnx import helper

    produced = {o for n in nodes for o in n.output}
    out, dropped = [], 0
    for n in nodes:
        if n.op_type == "Where" and n.input[0] in masks:
            side = n.input[1] if masks[n.input[0]].all() else n.input[2]
            if side in produced:
                out.append(helper.make_node("Identity", [side], list(n.output), name=n.name))
                dropped += 1
                continue
        out.append(n)
    return out, dropped


METADATA_KEY = "spotdiff.specialise"


def _set_metadata(model, info: dict) -> None:
    import json

    for p in model.metadata_props:
        if p.key == METADATA_KEY:
            p.value = json.dumps(info)
            return
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(info))


def _metadata(model) -> dict:
    import json

    return next((json.loads(p.value) for p in model.metadata_props if p.key == METADATA_KEY), {})


def live_nodes(nodes: list, graph) -> list:
    """`nodes` without those whose outputs nothing uses (constants only the prompt needed)."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {t for n in nodes for t in n.input} | outputs
        live = [n for n in nodes if any(o in used for o in n.output)]
        if len(live) == len(nodes):
            return nodes
        nodes = live


def _batch_nodes() -> list:
    """batch = Shape(pixel_values)[0:1], a 1-element int64 tensor."""
    from onnx import helper, numpy_helper

    def const(name, arr):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name))

    return [
        helper.make_node("Shape", [BATCH_SOURCE], ["prompt__input_shape"], end=1),
        const("prompt__one", np.ones(1, np.int64)),
    ]


def _broadcast_nodes(name: str, ndim: int, axis: int) -> list:
    """`name` = Tile(name__prompt, [1, .., batch, .., 1]) (batch at `axis`)."""
    from onnx import helper

    parts = ["prompt__one"] * ndim
    parts[axis] = "prompt__input_shape"
    return [
        helper.make_node("Concat", parts, [name + "__repeats"], axis=0),
        helper.make_node("Tile", [name + PROMPT_SUFFIX, name + "__repeats"], [name]),
    ]


def respecialise(model_path: str | Path, text_path: str | Path, out_path: str | Path,
                 feeds: dict[str, np.ndarray]) -> dict:
    """A specialised graph for another prompt: the text graph's values for `feeds` replace
    the prompt initializers of the graph at `model_path`. Returns the boundary shapes."""
    import onnx

    text = onnx.load(str(text_path))
    values, _ = batch_axes(text, feeds)
    model = onnx.load(str(model_path))
    by_name = {t.name: t for t in model.graph.initializer}
    fixed = _metadata(model).get("constant_masks", {})
    shapes = {}
    for name, value in values.items():
        if name in fixed:
            if not (value.all() if fixed[name] else not value.any()):
                raise SpecialiseError(
                    f"{name}: the graph was specialised to a mask that is all "
                    f"{fixed[name]} (its Where ops dropped); this prompt's is not: specialise "
                    "the generic graph again")
            if name not in by_name and name + PROMPT_SUFFIX not in by_name:
                shapes[name] = list(value.shape)
                continue
        key = name + PROMPT_SUFFIX if name + PROMPT_SUFFIX in by_name else name
        if key not in by_name:
            raise SpecialiseError(f"{model_path}: no prompt initializer for {name}; "
                                  f"was it specialised with {text_path}?")
        by_name[key].CopyFrom(onnx.numpy_helper.from_array(value, key))
        shapes[name] = list(value.shape)
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    return shapes
