"""Load test of `sdrun serve` on loopback: N concurrent clients, with and without batching,
against sequential `Pipeline.diff` on the same pairs, in one run.

For each server setting a fresh `sdrun serve` process is started (the same bundle, the
same threads), warmed, then `--clients` asyncio clients send `--requests` requests in all
(bounded also by `--max-seconds`), each a pair drawn in turn from `--pairs` synthetic
pairs. Every answer is checked against the sequential answer of its pair (label sets and
change score): a request is lost when it gets no 200, wrong when its answer differs.

    python benchmarks/serve_load.py --bundle engines/tiny
"""
from __future__ import annotations

import common  # noqa: F401  (threads)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from common import RESULTS, THREADS, machine, md_table, write_outputs  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, batch: int, wait_ms: float, queue: int):
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sdrun.cli", "serve", str(bundle), "--port", str(port),
                             "--max-batch-pairs", str(batch), "--max-wait-ms", str(wait_ms),
                             "--max-queue", str(queue), "--threads", str(THREADS), "--log-level", "warning"],
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not get ready")


async def load(url: str, bodies: list[dict], clients: int, requests: int, max_seconds: float):
    import httpx

    latencies, answers, statuses = [], [], []
    counter = iter(range(requests))
    t_end = time.perf_counter() + max_seconds

    async def client(http):
        for k in counter:
            if time.perf_counter() > t_end:
                return
            pair = k % len(bodies)
            t0 = time.perf_counter()
            try:
                r = await http.post(f"{url}/v1/diff", files=bodies[pair], timeout=120)
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("engines/tiny"))
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--max-seconds", type=float, default=240)
    ap.add_argument("--max-batch-pairs", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=10)
    ap.add_argument("--name", default=None)
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()

    from sdrun.apps.synth import write_synthetic_pairs
    from sdrun.pipeline import Pipeline

    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    write_synthetic_pairs(work, args.pairs, seed=9)
    paths = [(work / "data" / f"{10000 + i}_1.png", work / "data" / f"{10000 + i}_2.png") for i in range(args.pairs)]
    bodies = [{"image_a": ("a.png", a.read_bytes(), "image/png"), "image_b": ("b.png", b.read_bytes(), "image/png")}
              for a, b in paths]

    pipe = Pipeline.load(args.bundle, threads=THREADS).open_sessions()
    pipe.diff(*paths[0])  # warm
    t0 = time.perf_counter()
    want, seq_lat = [], []
    n_seq = min(args.requests, max(args.pairs, 32))
    for k in range(n_seq):
        s = time.perf_counter()
        r = pipe.diff(*paths[k % args.pairs])
        seq_lat.append(time.perf_counter() - s)
        if k < args.pairs:
            want.append(r.to_json())
    seq_wall = time.perf_counter() - t0
    del pipe

    rows, report = [], {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                        "sequential": {"requests": n_seq, "throughput_rps": n_seq / seq_wall,
                                       "p50_ms": 1000 * float(np.percentile(seq_lat, 50)),
                                       "p95_ms": 1000 * float(np.percentile(seq_lat, 95)),
                                       "p99_ms": 1000 * float(np.percentile(seq_lat, 99))}}
    for label, batch in (("served, batching", args.max_batch_pairs), ("served, no batching", 1)):
        proc, url = start_server(args.bundle, batch, args.max_wait_ms, max(64, 2 * args.clients))
        try:
            asyncio.run(load(url, bodies[:2], 2, 4, 60))  # warm the connections and the server
            lat, answers, statuses, wall = asyncio.run(load(url, bodies, args.clients, args.requests,
                                                            args.max_seconds))
            sizes = batch_sizes(url)
        finally:
            proc.terminate()  # graceful: the server first answers what is still queued
            try:
                code = proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = f"killed: still draining its queue 120 s after SIGTERM (exit {proc.wait()})"
        wrong = sum(1 for pair, a in answers
                    if any(a[c] != want[pair][c] for c in ("added", "removed", "changed"))
                    or abs(a["change_score"] - want[pair]["change_score"]) > 1e-4)
        sent = len(statuses)
        report[label] = {"max_batch_pairs": batch, "sent": sent, "answered_200": len(answers),
                         "lost": sent - len(answers), "wrong": wrong,
                         "statuses": {str(s): statuses.count(s) for s in set(statuses)},
                         "throughput_rps": len(answers) / wall, "wall_s": wall,
                         "p50_ms": 1000 * float(np.percentile(lat, 50)),
                         "p95_ms": 1000 * float(np.percentile(lat, 95)),
                         "p99_ms": 1000 * float(np.percentile(lat, 99)), "server_exit": code, **sizes}
    seq = report["sequential"]
    rows.append(["sequential Pipeline.diff (in process)", 1, n_seq, "-", "-", f"{seq['throughput_rps']:.2f}",
                 f"{seq['p50_ms']:.0f}", f"{seq['p95_ms']:.0f}", f"{seq['p99_ms']:.0f}", "-"])
    for label in ("served, batching", "served, no batching"):
        r = report[label]
        rows.append([f"{label} (max {r['max_batch_pairs']})", args.clients, r["sent"], r["lost"], r["wrong"],
                     f"{r['throughput_rps']:.2f}", f"{r['p50_ms']:.0f}", f"{r['p95_ms']:.0f}",
                     f"{r['p99_ms']:.0f}", f"{r['mean_pairs']:.2f}" if r["mean_pairs"] else "-"])
    ratio = report["served, batching"]["throughput_rps"] / report["served, no batching"]["throughput_rps"]
    report["batching_speedup"] = ratio
    md = [f"# sdrun serve under load ({report['machine']['cpu']}, {THREADS} threads, bundle {args.bundle})", "",
          f"{args.clients} concurrent clients on loopback, {args.requests} requests over {args.pairs} synthetic "
          f"pairs, `--max-wait-ms {args.max_wait_ms}`; the clients share the machine's cores with the server. "
          f"Batching serves {ratio:.2f}x the requests per second of the same server without it.", "",
          md_table(["", "clients", "requests", "lost", "wrong", "req/s", "p50 ms", "p95 ms", "p99 ms",
                    "pairs / batch"], rows)]
    name = args.name or f"serve_load_{args.bundle.name}"
    write_outputs(args.out_dir, name, report, "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
