"""Small edits of a bundle's ONNX graphs with onnx tooling (the `vocab` extra)."""
from __future__ import annotations

from pathlib import Path

from ..errors import SpotdiffError
from .specialise import live_nodes


class GraphEditError(SpotdiffError):
    pass


def drop_outputs(model_path: str | Path, out_path: str | Path, names: list[str]) -> int:
    """Write the graph at `model_path` without the outputs `names` and the nodes and
    initializers only they used, to `out_path`. Returns the number of nodes removed. The
    other outputs are computed by the same nodes as before."""
    import onnx

    model = onnx.load(str(model_path))
    graph = model.graph
    have = [o.name for o in graph.output]
    missing = [n for n in names if n not in have]
    if missing:
        raise GraphEditError(f"{model_path}: no output(s) {', '.join(missing)} (it has {', '.join(have)})")
    kept_outputs = [o for o in graph.output if o.name not in names]
    del graph.output[:]
    graph.output.extend(kept_outputs)
    nodes = live_nodes(list(graph.node), graph)
    removed = len(graph.node) - len(nodes)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {t for n in nodes for t in n.input}
    initializers = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    return removed
