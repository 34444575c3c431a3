"""`sdexport build`: export the four models into one verified bundle."""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from sdrun.bundle.bundle import bundle_files
from sdrun.bundle.vocab import default_prompt_templates
from sdrun.errors import SpotdiffError
from sdrun.files import check_output_folder, replace_folder

from .context import BuildContext
from .memory import record_graph_memory
from .models import MODEL_ORDER, exporter
from .sources import Source, SourceError, parse_source
from .verify import verify
from .writer import BundleWriter

logger = logging.getLogger(__name__)

# The seed notebook's pipeline parameters; `sdrun tune` rewrites them.
DEFAULT_PARAMS = {
    "det_thr": 0.25,
    "iou_thr": 0.5,
    "alpha": 0.5,
    "heat_lambda": 0.8,
    "heat_th": 0.5,
    "wbf_iou_thr": 0.55,
    "wbf_skip_box_thr": 0.05,
    "owlvit_score_thr": 0.05,
    "gdino_box_thr": 0.05,
}


class BuildError(SpotdiffError):
    pass


def resolve_sources(preset: str | None, specs: dict[str, str | None]) -> dict[str, Source]:
    return {m: parse_source(m, specs.get(m), preset) for m in MODEL_ORDER}


def build_bundle(out: str | Path, sources: dict[str, Source], vocabulary: list[str],
                 prompt_templates: list[str] | None = None, seed: int = 0,
                 gdino_size: tuple[int, int] = (800, 800), siamese_ckpt: str | None = None,
                 check: bool = True, log: Callable[[str], None] = logger.info,
                 precision: str = "fp32", inputs: Sequence[tuple[str, str | Path]] = ()) -> Path:
    """Export every model into the bundle folder `out` and check it against PyTorch.

    precision "int8": every graph is then quantised (`sdexport.quantize`: onnxruntime dynamic
    quantisation) and checked against the PyTorch fp32 golden outputs with int8 tolerances.
    `out` may be new, empty or an earlier bundle holding nothing but its own files
    (`sdrun.files.check_output_folder`); `inputs` ((what, path): e.g. the --vocab file) must
    not lie inside it."""
    if precision not in ("fp32", "int8"):
        raise BuildError(f"precision {precision!r}: ONNX bundles are fp32 or int8")
    out = Path(out)
    if siamese_ckpt is not None and not Path(siamese_ckpt).is_file():
        raise SourceError(f"--siamese-ckpt {siamese_ckpt}: file not found")
    folder_inputs = [("--siamese-ckpt", siamese_ckpt), *inputs,
                     *[(f"the {name} source", src.id) for name, src in sources.items() if src.kind == "local"]]
    check_output_folder(out, "--out", owned=bundle_files, inputs=folder_inputs,
                        hint=" (a bundle built before is replaced)")
    ctx = BuildContext(vocabulary=list(vocabulary),
                       prompt_templates=list(prompt_templates or default_prompt_templates()),
                       seed=seed, gdino_size=tuple(gdino_size), log=log)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.building-"))
    writer = BundleWriter(staging)
    t0 = time.perf_counter()
    models = {}
    try:
        for name in MODEL_ORDER:
            src = sources[name]
            if src.kind == "none":
                log(f"[{name}] left out")
                continue
            log(f"[{name}] from {src.kind} {src.id}")
            kwargs = {"ckpt": siamese_ckpt} if name == "siamese" else {}
            models[name] = exporter(name).export_model(src, writer, ctx, **kwargs)
        writer.finalize({
            "vocabulary": ctx.vocabulary,
            "prompt_templates": ctx.prompt_templates,
            "models": models,
            "params_file": writer.save_json("params.json", DEFAULT_PARAMS),
            "precision": "fp32",
            "build": {"seed": seed, "seconds": round(time.perf_counter() - t0, 1),
                      "timings": ctx.timings},
        })
        if precision == "int8":
            from .quantize import quantize_bundle_dir

            with ctx.timed("int8 quantisation"):
                quantize_bundle_dir(staging, log=log)
        with ctx.timed("memory per call"):
            record_graph_memory(staging, log=log)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_folder(staging, out, owned=bundle_files, inputs=folder_inputs)
    log(f"bundle written to {out} in {time.perf_counter() - t0:.1f} s")
    if check:
        failures = verify(out, log)
        if failures:
            raise BuildError(f"{out}: {failures} output(s) out of tolerance against PyTorch "
                             "(see the table above)")
    return out
