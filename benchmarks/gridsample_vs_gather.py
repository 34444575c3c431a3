"""Grounding DINO's deformable attention samples with GridSample (48 nodes in the graph,
~0.9 s of an 800x800 view). Is a gather-based bilinear interpolation in plain ONNX ops
faster in onnxruntime? Both are exported from PyTorch at the encoder's shapes (8 heads x
batch 1, 32 channels per head, 13294 queries x 4 points, the four levels of an 800x800
canvas), checked against each other, and timed interleaved (median of --repeats).

    python benchmarks/gridsample_vs_gather.py
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (threads, before torch)
from common import RESULTS, THREADS, machine, md_table, write_outputs

import numpy as np
import torch


class GridSample(torch.nn.Module):
    def forward(self, value, grid):
        return torch.nn.functional.grid_sample(value, grid, mode="bilinear", padding_mode="zeros",
                                               align_corners=False)


class GatherBilinear(torch.nn.Module):
    """GridSample(bilinear, zeros, align_corners=False) as four row gathers and a weighted sum."""

    def forward(self, value, grid):
        n, c, h, w = value.shape
        x = ((grid[..., 0] + 1) * w - 1) / 2
        y = ((grid[..., 1] + 1) * h - 1) / 2
        x0, y0 = torch.floor(x), torch.floor(y)
        rows = value.flatten(2).transpose(1, 2).reshape(n * h * w, c)
        base = torch.arange(n).reshape(n, 1, 1) * (h * w)
        out = 0
        for dx in (0, 1):
            for dy in (0, 1):
                xi, yi = x0 + dx, y0 + dy
                weight = (1 - (x - xi).abs()) * (1 - (y - yi).abs())
                inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
                idx = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).to(torch.int64) + base
                out = out + rows[idx] * (weight * inside.to(weight.dtype)).unsqueeze(-1)
        return out.permute(0, 3, 1, 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    import onnxruntime as ort

    torch.manual_seed(0)
    n, c, q, p = 8, 32, 13294, 4
    work = Path(tempfile.mkdtemp(prefix="gridsample-"))
    rows, report = [], {"machine": machine(), "levels": {}}
    for side in (100, 50, 25, 13):
        value = torch.randn(n, c, side, side)
        grid = torch.rand(n, q, p, 2) * 2.2 - 1.1  # some points outside: the zeros padding
        sessions = {}
        for name, module in (("GridSample", GridSample()), ("gather", GatherBilinear())):
            path = work / f"{name}_{side}.onnx"
            torch.onnx.export(module, (value, grid), str(path), input_names=["value", "grid"],
                              output_names=["out"], opset_version=17, dynamo=False)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = THREADS
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sessions[name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feeds = {"value": value.numpy(), "grid": grid.numpy()}
        outs = {k: s.run(None, feeds)[0] for k, s in sessions.items()}
        diff = float(np.abs(outs["gather"] - outs["GridSample"]).max())
        times = {k: [] for k in sessions}
        for _ in range(args.repeats):
            for k, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, feeds)
                times[k].append(time.perf_counter() - t0)
        ms = {k: 1000 * float(np.median(v)) for k, v in times.items()}
        report["levels"][f"{side}x{side}"] = {"ms": ms, "max_abs_diff": diff}
        rows.append([f"{side}x{side}", f"{ms['GridSample']:.1f}", f"{ms['gather']:.1f}",
                     f"{ms['gather'] / ms['GridSample']:.2f}", f"{diff:.1e}"])
    md = [f"# GridSample against a gather-based bilinear interpolation ({report['machine']['cpu']}, "
          f"{THREADS} threads)", "",
          f"onnxruntime, one sampling of Grounding DINO's encoder: value [{n}, {c}, side, side], grid "
          f"[{n}, {q}, {p}, 2]; median of {args.repeats} interleaved runs.", "",
          md_table(["level", "GridSample ms", "gather ms", "gather / GridSample", "max abs diff"], rows)]
    write_outputs(args.out_dir, "gridsample_vs_gather", report, "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
