"""`sdrun triton --graphs python` on the CPU tritonserver (scripts/tritonserver.py), against
`sdrun diff` in one run: the answers, the time per pair, and the memory of the whole server
(tritonserver and every python-backend process).

The repository of `--bundle` is written to a temporary folder and served on 127.0.0.1. Each
pair is asked once over HTTP (sequentially), then all of them by `--clients` concurrent
clients; every answer is compared with `Pipeline.diff` in this process (label sets; boxes
and scores within float noise, since the server's python backend runs numpy 1). Memory is
the sum of the resident sets of the server's process group, sampled every 0.2 s (shared
pages, such as onnxruntime's library, are counted once per process: an upper bound);
`sdrun diff`'s is the peak resident set (VmHWM) of `sdrun diff` run alone on the first pair.

    python benchmarks/triton_load.py --bundle engines/full --pairs 2 --clients 2 --name triton_full
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common  # noqa: F401  (threads)
from common import RESULTS, free_port, machine, make_pairs, md_table, write_outputs

import numpy as np

from sdrun.apps.triton_repo import RepositoryOptions, write_repository
from sdrun.bundle import Bundle
from sdrun.csvfile import COLUMNS
from sdrun.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


def tritonserver_script():
    spec = importlib.util.spec_from_file_location("tritonserver_script", ROOT / "scripts" / "tritonserver.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def group_rss(pgid: int) -> int:
    """Bytes resident in the processes of a process group."""
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # pgrp
                total += int(fields[21]) * resource.getpagesize()  # rss pages
        except (OSError, ValueError, IndexError):
            continue
    return total


class GroupWatch(threading.Thread):
    def __init__(self, pgid: int, period: float = 0.2):
        super().__init__(daemon=True)
        self.pgid, self.period, self.peak, self.last = pgid, period, 0, 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.last = group_rss(self.pgid)
            self.peak = max(self.peak, self.last)
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def ask(http_port: int, a_png: bytes, b_png: bytes, pair_id: str) -> tuple[dict, float]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}", network_timeout=3600.0,
                                              connection_timeout=60.0)
    inputs = []
    for name, value in (("image_a", a_png), ("image_b", b_png), ("pair_id", pair_id.encode())):
        t = httpclient.InferInput(name, [1, 1], "BYTES")
        t.set_data_from_numpy(np.array([[value]], dtype=object))
        inputs.append(t)
    t0 = time.perf_counter()
    try:
        out = client.infer("spotdiff", inputs).as_numpy("result")
    finally:
        client.close()
    return json.loads(out[0, 0]), time.perf_counter() - t0


def png(image: np.ndarray) -> bytes:
    import cv2

    ok, data = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
    assert ok
    return data.tobytes()


def compare(got: dict, want: dict) -> dict:
    same_sets = all(got[c] == want[c] for c in COLUMNS)
    same_objects = [(o["image"], o["label"], o["status"]) for o in got["objects"]] == \
        [(o["image"], o["label"], o["status"]) for o in want["objects"]]
    box = max((float(np.max(np.abs(np.subtract(g["box"], w["box"]))))
               for g, w in zip(got["objects"], want["objects"])), default=0.0)
    return {"same_label_sets": same_sets, "same_objects": same_objects, "max_box_delta_px": box,
            "error": got.get("error")}


def sdrun_diff_peak(bundle: Path, a: Path, b: Path) -> tuple[int, float]:
    """(peak resident bytes, seconds) of `sdrun diff` alone in a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", "from sdrun.cli import main; main()", "diff", str(bundle),
                          str(a), str(b)], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-2000:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (max(peak, before) * 1024), seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--pairs", type=int, default=2, help="pairs (the 2 real ones first)")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--name")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    name = args.name or f"triton_{args.bundle.name}"
    script = tritonserver_script()
    dist = script.fetch()
    pairs = make_pairs(args.pairs)
    work = Path(tempfile.mkdtemp(prefix="triton-load-"))
    files = []
    for pid, a, b in pairs:
        pa, pb = work / f"{pid}_1.png", work / f"{pid}_2.png"
        pa.write_bytes(png(a))
        pb.write_bytes(png(b))
        files.append((pid, pa, pb))

    peak_diff, diff_cold_s = sdrun_diff_peak(args.bundle, files[0][1], files[0][2])
    pipe = Pipeline.load(args.bundle).open_sessions()
    want, pipeline_s = {}, []
    for pid, pa, pb in files:
        t0 = time.perf_counter()
        want[pid] = pipe.diff(str(pa), str(pb), pair_id=pid).to_json()
        pipeline_s.append(time.perf_counter() - t0)
    del pipe

    repo = work / "repo"
    t0 = time.perf_counter()
    write_repository(Bundle.load(args.bundle), repo, RepositoryOptions(graphs="python"))
    write_s = time.perf_counter() - t0
    http, grpc = free_port(), free_port()
    log = work / "tritonserver.log"
    t0 = time.perf_counter()
    proc = script.start(repo, dist, http, grpc, log_file=log)
    watch = GroupWatch(proc.pid)
    watch.start()
    try:
        script.wait_ready(proc, http, timeout_s=900)
        ready_s = time.perf_counter() - t0
        ready_rss = watch.last
        seq = []
        for pid, pa, pb in files:
            got, seconds = ask(http, pa.read_bytes(), pb.read_bytes(), pid)
            seq.append({"pair": pid, "seconds": seconds, **compare(got, want[pid])})
        jobs = [files[k % len(files)] for k in range(max(args.clients, len(files)))]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            conc = list(pool.map(lambda f: ask(http, f[1].read_bytes(), f[2].read_bytes(), f[0]), jobs))
        conc_s = time.perf_counter() - t0
        concurrent = [{"pair": f[0], "seconds": s, **compare(g, want[f[0]])} for f, (g, s) in zip(jobs, conc)]
    finally:
        rc = script.stop(proc)
        watch.stop()
    report = {
        "machine": machine(), "bundle": str(args.bundle), "pairs": len(files), "clients": args.clients,
        "server": script.SERVER_VERSION, "stop_rc": rc,
        "repository_write_s": write_s, "server_ready_s": ready_s,
        "server_rss_ready_bytes": ready_rss, "server_rss_peak_bytes": watch.peak,
        "sdrun_diff_peak_bytes": peak_diff, "sdrun_diff_cold_s": diff_cold_s,
        "pipeline_seconds": pipeline_s, "sequential": seq, "concurrent": concurrent,
        "concurrent_wall_s": conc_s,
    }
    md = markdown(report)
    write_outputs(args.out_dir, name, report, md)
    print(md)
    return 0


def markdown(r: dict) -> str:
    m = r["machine"]
    seq_s = sum(x["seconds"] for x in r["sequential"])
    pipe_s = sum(r["pipeline_seconds"])
    rows = [
        ["repository written (s)", f"{r['repository_write_s']:.1f}"],
        ["server ready (s)", f"{r['server_ready_s']:.1f}"],
        ["server memory when ready (GiB, all processes)", f"{r['server_rss_ready_bytes'] / GiB:.2f}"],
        ["server memory peak (GiB, all processes)", f"{r['server_rss_peak_bytes'] / GiB:.2f}"],
        ["`sdrun diff` peak (GiB)", f"{r['sdrun_diff_peak_bytes'] / GiB:.2f}"],
        ["per pair, Triton over HTTP / `Pipeline.diff` here (one after another)",
         f"{seq_s / len(r['sequential']):.1f} s / {pipe_s / len(r['pipeline_seconds']):.1f} s "
         f"({seq_s / pipe_s:.2f}x)"],
        [f"{len(r['concurrent'])} requests by {r['clients']} clients (s, wall)", f"{r['concurrent_wall_s']:.1f}"],
        ["answers with the same label sets as `Pipeline.diff`",
         f"{sum(x['same_label_sets'] for x in r['sequential'] + r['concurrent'])}/"
         f"{len(r['sequential']) + len(r['concurrent'])}"],
        ["same objects (image, label, status)",
         f"{sum(x['same_objects'] for x in r['sequential'] + r['concurrent'])}/"
         f"{len(r['sequential']) + len(r['concurrent'])}"],
        ["largest box difference (px)",
         f"{max(x['max_box_delta_px'] for x in r['sequential'] + r['concurrent']):.3f}"],
    ]
    return (f"# Triton (python backend, CPU) against sdrun diff: {Path(r['bundle']).name}\n\n"
            f"tritonserver {r['server']} from nvidia-pytriton, `sdrun triton --graphs python`; "
            f"{r['pairs']} pairs; {m['cpu']} ({m['isa']}), {m['cpus']} cores, {m['memory_gib']} GiB.\n\n"
            + md_table(["", "measured"], rows, "lr") + "\n")


if __name__ == "__main__":
    sys.exit(main())
