"""Record in a bundle's manifest what each graph's call costs in memory
(`graphs[g]["memory"]`: fixed bytes + bytes per input, measured by
`sdrun.backends.memprobe` in a fresh process), so that `sdrun` can split every model call
to fit the memory it has (`sdrun.backends.memory`)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

from sdrun.backends.memory import format_size
from sdrun.backends.memprobe import measure
from sdrun.bundle.bundle import MANIFEST, Bundle, golden_cases
from sdrun.errors import SpotdiffError
from sdrun.files import atomic_write

logger = logging.getLogger(__name__)


def record_graph_memory(root: str | Path, log: Callable[[str], None] = logger.info,
                        probe: Callable[..., dict] = measure) -> dict[str, dict]:
    """Measure every graph that has golden inputs and write the results into the manifest.
    A graph that cannot be measured is logged and left without (sdrun then uses its
    conservative table). Returns {"model/graph": result}."""
    root = Path(root)
    bundle = Bundle.load(root, verify=False)
    manifest = json.loads((root / MANIFEST).read_text())
    results = {}
    for model, entry in manifest["models"].items():
        with_goldens = {g for (_, g) in golden_cases(bundle.arrays(entry["golden_file"]))}
        for graph, gentry in entry["graphs"].items():
            if graph not in with_goldens:
                continue
            try:
                result = probe(root, model, graph)
            except SpotdiffError as e:
                log(f"[{model}/{graph}] memory not measured ({e}); sdrun will assume its kind's table")
                gentry.pop("memory", None)
                continue
            gentry["memory"] = result
            results[f"{model}/{graph}"] = result
            log(f"[{model}/{graph}] memory per call: {format_size(result['fixed_bytes'])} + "
                f"{format_size(result['per_input_bytes'])} per input")
    atomic_write(root / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return results
