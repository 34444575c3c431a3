"""int8 drift per graph on this CPU and on an emulated AVX2-only CPU, 8-bit vs 7-bit weights.

    python benchmarks/int8_isa.py --bundle engines/tiny [--emulate EPYC-Rome]

Quantises the fp32 bundle twice (8-bit weights, and 7-bit "reduce_range" weights, the
default), then runs the golden check (`sdrun check --json`) of the fp32 bundle and of both
int8 bundles natively and under `qemu-x86_64 -cpu <model>` (Debian's qemu-user), whose
CPUID shows no AVX-512 and no VNNI: onnxruntime then picks its AVX2 int8 kernel, the one
that adds u8*s8 products pairwise in saturating int16 (sdrun/backends/cpu.py).

The emulator is not trusted blindly: the fp32 bundle runs under it too, and a graph whose
fp32 outputs move more than 1e-4 under emulation is marked "emulator unfaithful" (QEMU
7.2's TCG gets some of onnxruntime's AVX2 float kernels wrong), so only the graphs it runs
faithfully say anything about int8 on AVX2.

Writes int8_isa_<bundle>.json/.md and prints the table last.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import common  # noqa: F401
from common import RESULTS, machine, md_table, write_outputs

FAITHFUL_FP32 = 1e-4


def check_json(bundle: Path, emulate: str | None, timeout: float) -> dict[str, float]:
    """{"model/graph": worst rel-L2} of `sdrun check --json`, natively or under qemu."""
    cmd = [sys.executable, "-m", "sdrun.cli", "check", str(bundle), "--json"]
    if emulate:
        cmd = ["qemu-x86_64", "-cpu", emulate, *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    worst: dict[str, float] = {}
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            key = f"{r['model']}/{r['graph']}"
            worst[key] = max(worst.get(key, 0.0), float(r["rel_l2"]))
    if not worst:
        raise SystemExit(f"{' '.join(cmd)} printed no check rows:\n{p.stderr[-2000:]}")
    return worst


def render(report: dict) -> str:
    emu, here = report["emulated_cpu"], report["machine"]
    rows = []
    for key, g in report["graphs"].items():
        cell = (lambda v: f"{v:.3g}") if g["emulator_faithful"] else (lambda v: f"({v:.3g})")
        rows.append([key, f"{g['fp32 native']:.1e}", f"{g[f'fp32 {emu}']:.1e}"
                     + ("" if g["emulator_faithful"] else " unfaithful"),
                     f"{g['int8 8-bit native']:.3g}", cell(g[f"int8 8-bit {emu}"]),
                     f"{g['int8 7-bit native']:.3g}", cell(g[f"int8 7-bit {emu}"])])
    return (f"### int8 drift per graph, native vs emulated AVX2: {report['bundle']}\n\n"
            f"Worst relative L2 against the PyTorch fp32 golden outputs. Native: {here['cpu']} "
            f"({here['isa']}; int8 kernel {here['int8_kernel']}). Emulated: `qemu-x86_64 -cpu {emu}` "
            "(AVX2, no AVX-512, no VNNI). Values in parentheses come from graphs the emulator "
            f"does not run faithfully even in fp32 (fp32 moved > {FAITHFUL_FP32:g}) and prove nothing.\n\n"
            + md_table(["graph", "fp32 native", f"fp32 {emu}", "int8 8-bit native",
                        f"int8 8-bit {emu}", "int8 7-bit native", f"int8 7-bit {emu}"],
                       rows, "lrrrrrr") + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, help="an fp32 bundle")
    ap.add_argument("--emulate", default="EPYC-Rome",
                    help="qemu CPU model without AVX-512/VNNI (qemu-x86_64 -cpu help)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per emulated check")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="only rewrite the table of an earlier run's JSON")
    args = ap.parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(render(report))
        print(render(report))
        return 0
    if args.bundle is None:
        ap.error("--bundle is required")
    if shutil.which("qemu-x86_64") is None:
        raise SystemExit("qemu-x86_64 not found: apt-get install qemu-user")
    from sdexport.quantize import quantize_bundle

    variants = {"fp32": args.bundle}
    with tempfile.TemporaryDirectory(prefix="int8-isa-") as tmp:
        for name, reduce_range in (("int8 8-bit", False), ("int8 7-bit", True)):
            variants[name] = quantize_bundle(args.bundle, Path(tmp) / name.replace(" ", "-"),
                                             log=lambda s: None, reduce_range=reduce_range)
        results: dict[str, dict[str, dict[str, float]]] = {}
        for name, path in variants.items():
            for where in ("native", args.emulate):
                print(f"[{name}] check on {where} ...", flush=True)
                results.setdefault(name, {})[where] = check_json(
                    path, None if where == "native" else args.emulate, args.timeout)

    graphs = {key: {"emulator_faithful": results["fp32"][args.emulate][key] <= FAITHFUL_FP32,
                    **{f"{name} {where}": results[name][where][key]
                       for name in results for where in results[name]}}
              for key in results["fp32"]["native"]}
    report = {"benchmark": "int8_isa", "bundle": str(args.bundle), "emulated_cpu": args.emulate,
              "machine": machine(), "graphs": graphs}
    md = render(report)
    write_outputs(args.out_dir, f"int8_isa_{args.bundle.name}", report, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
