"""One module per model; each has `load_torch(source, ctx)` and `export_model(source, writer, ctx)`.

`export_model` writes the model's graphs, arrays and golden samples through the
`BundleWriter` and returns the model's manifest entry:

    {"source": {...}, "graphs": {name: {"file", "inputs", "outputs", ...}},
     "golden_file": ..., "tolerance": {"rel_l2": ...}, "preprocess": {...}, ...}
"""
from importlib import import_module

MODEL_ORDER = ("owlvit", "gdino", "siamese", "clip")


def exporter(model: str):
    return import_module(f"sdexport.models.{model}")
