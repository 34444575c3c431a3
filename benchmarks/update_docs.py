"""Paste the committed benchmark tables into docs/benchmarks.md, between the markers
`<!-- benchmarks:begin -->` and `<!-- benchmarks:end -->`.

    python benchmarks/update_docs.py [NAME ...]     # default: the full-random results

Each NAME is a `benchmarks/results/<NAME>.md` written by a benchmark script; a missing one
is an error (run its benchmark first). Everything outside the markers is left alone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"
DEFAULT = ["latency_full", "latency_full_epyc-avx512", "latency_full-owl", "accuracy_full",
           "accuracy_full_epyc-avx512", "accuracy_full-synthetic",
           "accuracy_full-synthetic_epyc-avx512", "coldstart_full", "coldstart_full-int8",
           "coldstart_full_epyc-avx512", "coldstart_full-int8_epyc-avx512",
           "int8_drift_full-int8", "int8_drift_full-int8_epyc-avx512", "int8_isa_tiny",
           "graph_speed_full-int8_vnni", "profile_gdino_full", "profile_gdino_full_epyc-avx512",
           "int8_static_full-before-folding", "latency_full-openvino_epyc-avx2",
           "accuracy_full-openvino-real_epyc-avx2", "accuracy_full-openvino_epyc-avx2",
           "coldstart_full-openvino_epyc-avx2"]


def block(names: list[str]) -> str:
    parts = []
    for name in names:
        path = RESULTS / f"{name}.md"
        if not path.is_file():
            raise SystemExit(f"{path}: missing; run the benchmark that writes it first")
        text = path.read_text().strip()
        # results start at "###": below the page's "## The tables"
        parts.append(text + f"\n\n(`benchmarks/results/{name}.json` has the raw numbers"
                     + (f", `{name}.png` the chart" if (RESULTS / f"{name}.png").is_file() else "")
                     + ".)")
    return "\n\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", default=DEFAULT)
    ap.add_argument("--page", type=Path, default=ROOT / "docs" / "benchmarks.md",
                    help="the markdown page to fill (default: docs/benchmarks.md)")
    args = ap.parse_args(argv)
    text = args.page.read_text()
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        print(f"{args.page}: no {BEGIN} ... {END} block to fill", file=sys.stderr)
        return 2
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    args.page.write_text(f"{head}{BEGIN}\n{block(args.names)}\n{END}{tail}")
    print(f"{args.page}: {len(args.names)} tables")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
