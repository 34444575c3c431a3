"""Load test of `sdrun serve` on loopback: concurrent clients against sequential
`Pipeline.diff` on the same pairs, in one run, with the server's memory watched.

For each `--settings` value (a `--max-batch-pairs`, or `default` for the server's own
default) a fresh `sdrun serve` process is started (same bundle, same threads, same memory
budget), then `--clients` asyncio clients send `--requests` requests in all (bounded also by
`--max-seconds`), each a pair drawn in turn from the pairs, with the same `--param`
overrides as per-request `params`. Every answer is checked against the sequential answer
of its pair (label sets and change score): a request is lost when it gets no 200, wrong
when its answer differs. The server's resident memory is sampled all along: when ready,
its peak (VmHWM: loading included) and the highest sample while serving, and after the load
(`--settle-s` later).

    python benchmarks/serve_load.py --bundle engines/tiny
    python benchmarks/serve_load.py --bundle engines/full --real --pairs 2 --clients 8 \\
        --requests 16 --param det_thr=0.9 --seq-requests 4 --settings default 4 \\
        --warm-requests 0 --max-seconds 3000 --name serve_load_full
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import common  # noqa: F401  (threads)
from common import RESULTS, THREADS, free_port, machine, make_pairs, md_table, parse_params, write_outputs

import numpy as np

from sdrun.backends.memory import proc_status_kib
from sdrun.csvfile import COLUMNS

GiB = 2**30


class RssWatch:
    """Samples a process's VmRSS every `period` seconds in a thread; keeps the maximum."""

    def __init__(self, pid: int, period: float = 0.25):
        self.pid, self.period, self.max_kib, self._stop = pid, period, 0, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.wait(self.period):
            kib = proc_status_kib("VmRSS", self.pid)
            if kib is None:
                return
            self.max_kib = max(self.max_kib, kib)

    def stop(self):
        self._stop.set()
        self._thread.join(2)


def start_server(bundle: Path, batch: str, wait_ms: float, queue: int, budget: str | None,
                 ready_timeout: float):
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "sdrun.cli", "serve", str(bundle), "--port", str(port),
           "--max-wait-ms", str(wait_ms), "--max-queue", str(queue), "--threads", str(THREADS),
           "--log-level", "warning"]
    if batch != "default":
        cmd += ["--max-batch-pairs", batch]
    if budget:
        cmd += ["--memory-budget", budget]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + ready_timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url, time.perf_counter() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not get ready (exit {proc.poll()})")


async def load(url: str, bodies: list[dict], params: dict, clients: int, requests: int,
               max_seconds: float, timeout: float):
    import httpx

    latencies, answers, statuses = [], [], []
    counter = iter(range(requests))
    t_end = time.perf_counter() + max_seconds
    form = {"params": json.dumps(params)} if params else None

    async def client(http):
        for k in counter:
            if time.perf_counter() > t_end:
                return
            pair = k % len(bodies)
            t0 = time.perf_counter()
            try:
                r = await http.post(f"{url}/v1/diff", files=bodies[pair], data=form, timeout=timeout)
                statuses.append(r.status_code)
                if r.status_code == 200:
                    answers.append((pair, r.json()))
            except httpx.HTTPError as e:
                statuses.append(type(e).__name__)
            latencies.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return latencies, answers, statuses, wall


def batch_sizes(url: str) -> dict:
    import httpx

    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.TransportError:  # the server died (e.g. killed for memory): say so in the table
        return {"batches": None, "mean_pairs": None, "server_gone": True}
    vals = {}
    for line in text.splitlines():
        if line.startswith("sdrun_batch_pairs_count") or line.startswith("sdrun_batch_pairs_sum"):
            k, v = line.split()
            vals[k] = float(v)
    n = vals.get("sdrun_batch_pairs_count", 0.0)
    return {"batches": int(n), "mean_pairs": vals.get("sdrun_batch_pairs_sum", 0.0) / n if n else None}


def stats(lat: list[float]) -> dict:
    if not lat:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    return {f"p{q}_ms": 1000 * float(np.percentile(lat, q)) for q in (50, 95, 99)}


def encode_png(rgb: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    assert ok
    return buf.tobytes()


def serve_setting(args, setting: str, bodies, params, want) -> dict:
    proc, url, ready_s = start_server(args.bundle, setting, args.max_wait_ms, max(64, 2 * args.clients),
                                      args.memory_budget, args.ready_timeout)
    ready_kib = proc_status_kib("VmRSS", proc.pid)
    watch = RssWatch(proc.pid)
    code = None
    try:
        if args.warm_requests:
            asyncio.run(load(url, bodies[:2], params, 2, args.warm_requests, 600, args.request_timeout))
        lat, answers, statuses, wall = asyncio.run(load(url, bodies, params, args.clients, args.requests,
                                                        args.max_seconds, args.request_timeout))
        sizes = batch_sizes(url)
        time.sleep(args.settle_s)
        after_kib = proc_status_kib("VmRSS", proc.pid)
        peak_kib = proc_status_kib("VmHWM", proc.pid)
    finally:
        watch.stop()
        proc.terminate()  # graceful: the server first answers what is still queued
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = f"killed: still draining its queue 120 s after SIGTERM (exit {proc.wait()})"
    wrong = sum(1 for pair, a in answers
                if any(a[c] != want[pair][c] for c in COLUMNS)
                or abs(a["change_score"] - want[pair]["change_score"]) > 1e-4)
    sent = len(statuses)
    def gib(kib):
        return None if kib is None else round(kib * 1024 / GiB, 2)
    return {"max_batch_pairs": setting, "sent": sent, "answered_200": len(answers),
            "lost": sent - len(answers), "wrong": wrong,
            "statuses": {str(s): statuses.count(s) for s in set(statuses)},
            "throughput_rps": len(answers) / wall if wall else 0.0, "wall_s": wall, **stats(lat),
            "ready_s": ready_s, "rss_ready_gib": gib(ready_kib),
            "rss_peak_gib": gib(max(peak_kib or 0, watch.max_kib) or None),
            "rss_peak_serving_gib": gib(watch.max_kib or None),  # sampled every 0.25 s after ready
            "rss_after_gib": gib(after_kib), "server_exit": code, **sizes}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("engines/tiny"))
    ap.add_argument("--pairs", type=int, default=16, help="distinct pairs the requests cycle over")
    ap.add_argument("--real", action="store_true", help="the two real pairs first (then synthetic ones)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--seq-requests", type=int, default=None,
                    help="sequential Pipeline.diff calls timed (default: min(requests, max(pairs, 32)))")
    ap.add_argument("--settings", nargs="+", default=["default", "8"],
                    help="server --max-batch-pairs values to compare ('default': the server's own)")
    ap.add_argument("--param", action="append", metavar="KEY=VALUE",
                    help="parameter override for every request (sent as params) and the sequential run")
    ap.add_argument("--memory-budget", default=None, help="passed to every server (default: its own)")
    ap.add_argument("--max-seconds", type=float, default=240)
    ap.add_argument("--max-wait-ms", type=float, default=10)
    ap.add_argument("--warm-requests", type=int, default=4, help="requests sent before the timed load")
    ap.add_argument("--request-timeout", type=float, default=600)
    ap.add_argument("--ready-timeout", type=float, default=600)
    ap.add_argument("--settle-s", type=float, default=3.0, help="wait after the load before reading RSS")
    ap.add_argument("--name", default=None)
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    params = parse_params(args.param)

    from sdrun.pipeline import Pipeline

    pairs = make_pairs(args.pairs, seed=9, real=args.real)
    bodies = [{"image_a": ("a.png", encode_png(a), "image/png"), "image_b": ("b.png", encode_png(b), "image/png")}
              for _, a, b in pairs]

    pipe = Pipeline.load(args.bundle, threads=THREADS, params=params,
                         memory_budget=args.memory_budget).open_sessions()
    pipe.diff(pairs[0][1], pairs[0][2])  # warm
    n_seq = args.seq_requests or min(args.requests, max(args.pairs, 32))
    want, seq_lat = [], []
    t0 = time.perf_counter()
    for k in range(max(n_seq, len(pairs))):
        s = time.perf_counter()
        r = pipe.diff(pairs[k % len(pairs)][1], pairs[k % len(pairs)][2])
        if k < n_seq:
            seq_lat.append(time.perf_counter() - s)
        if k < len(pairs):
            want.append(r.to_json())
        if k + 1 == n_seq:
            seq_wall = time.perf_counter() - t0
    budget = repr(pipe.memory_budget)
    del pipe

    report = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
              "params": params, "pipeline_memory_budget": budget,
              "answers": {pairs[i][0]: {c: want[i][c] for c in COLUMNS}
                          for i in range(len(pairs))},
              "sequential": {"requests": n_seq, "throughput_rps": n_seq / seq_wall, **stats(seq_lat)},
              "settings": {}}
    for setting in args.settings:
        report["settings"][setting] = serve_setting(args, setting, bodies, params, want)
        print(json.dumps({setting: report["settings"][setting]}), flush=True)

    seq = report["sequential"]
    def fmt(v, f="{:.0f}"):
        return "-" if v is None else f.format(v)
    rows = [["sequential Pipeline.diff (in process)", 1, n_seq, "-", "-", f"{seq['throughput_rps']:.3f}", "1.00",
             fmt(seq["p50_ms"]), fmt(seq["p99_ms"]), "-", "-", "-", "-"]]
    for setting, r in report["settings"].items():
        rows.append([f"sdrun serve, --max-batch-pairs {setting}", args.clients, r["sent"], r["lost"], r["wrong"],
                     f"{r['throughput_rps']:.3f}", f"{r['throughput_rps'] / seq['throughput_rps']:.2f}",
                     fmt(r["p50_ms"]), fmt(r["p99_ms"]), fmt(r["mean_pairs"], "{:.2f}"),
                     fmt(r["rss_ready_gib"], "{:.2f}"), fmt(r["rss_peak_gib"], "{:.2f}"),
                     fmt(r["rss_after_gib"], "{:.2f}")])
    m = report["machine"]
    md = [f"# sdrun serve under load ({m['cpu']}; {m['isa']}; {m['memory_gib']} GiB; {THREADS} threads; "
          f"bundle {args.bundle}; {m['date']})", "",
          f"{args.clients} concurrent clients on loopback, {args.requests} requests cycling over {len(pairs)} "
          f"pair(s) ({'the real pairs first' if args.real else 'synthetic'}), per-request params {params or '{}'}; "
          f"the sequential row is `Pipeline.diff` in the benchmark's process on the same pairs, one after "
          f"another. A request is lost without a 200 and wrong when its label sets or change score differ "
          f"from the sequential answer of its pair. RSS of the server process: when ready, its peak "
          f"(VmHWM) and {args.settle_s:g} s after the load. The clients share the machine's cores with "
          f"the server. Pipeline memory budget (sequential run): {budget}.", "",
          md_table(["", "clients", "requests", "lost", "wrong", "req/s", "x sequential", "p50 ms", "p99 ms",
                    "pairs / batch", "RSS ready GiB", "RSS peak GiB", "RSS after GiB"], rows)]
    name = args.name or f"serve_load_{args.bundle.name}"
    write_outputs(args.out_dir, name, report, "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
