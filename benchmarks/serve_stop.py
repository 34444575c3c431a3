"""`sdrun serve`'s limits on a real bundle: readiness while loading, a caller that leaves,
and SIGTERM with a queue, with the server's memory watched.

One server process, one timeline:
1. from the start, /readyz is polled: when the socket opened, how many 503s it answered
   while loading, when it was ready (and the RSS then);
2. request A is sent (it holds the worker), then B, whose client disconnects after
   `--leave-after` s while B still waits in the queue, then C and D (queued);
3. /metrics is read: B must be counted 499 and dropped (never computed);
4. SIGTERM: C and D must be answered 503 at once, A 200 when its pair finishes, and the
   process must exit right after A (not after C and D were computed).

    python benchmarks/serve_stop.py --bundle engines/tiny
    python benchmarks/serve_stop.py --bundle engines/full --real --name serve_stop_full
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import common  # noqa: F401  (threads)
from common import RESULTS, THREADS, machine, make_pairs, md_table, write_outputs

from serve_load import RssWatch, encode_png, free_port

from sdrun.backends.memory import proc_status_kib

GiB = 2**30


def metrics(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)}


def main() -> int:
    import httpx

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("engines/tiny"))
    ap.add_argument("--real", action="store_true", help="the first real pair (else a synthetic one)")
    ap.add_argument("--param", default='{"det_thr": 0.9}', help="per-request params (JSON)")
    ap.add_argument("--leave-after", type=float, default=0.3)
    ap.add_argument("--ready-timeout", type=float, default=600)
    ap.add_argument("--name", default=None)
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()

    _, a, b = make_pairs(1, real=args.real)[0]
    files = {"image_a": ("a.png", encode_png(a), "image/png"), "image_b": ("b.png", encode_png(b), "image/png")}
    form = {"params": args.param}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "sdrun.cli", "serve", str(args.bundle), "--port", str(port),
           "--threads", str(THREADS), "--max-wait-ms", "0", "--log-level", "warning"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    watch = RssWatch(proc.pid)
    socket_s = ready_s = None
    not_ready = 0
    deadline = time.time() + args.ready_timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            r = httpx.get(f"{url}/readyz", timeout=2)
            socket_s = socket_s or time.perf_counter() - t0
            if r.status_code == 200:
                ready_s = time.perf_counter() - t0
                break
            not_ready += 1
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    if ready_s is None:
        proc.kill()
        raise SystemExit(f"the server did not get ready (exit {proc.poll()}): {proc.stderr.read()[-2000:]}")
    ready_gib = (proc_status_kib("VmRSS", proc.pid) or 0) * 1024 / GiB

    answers: dict[str, object] = {}

    def call(name: str) -> None:
        t = time.perf_counter()
        try:
            r = httpx.post(f"{url}/v1/diff", files=files, data=form, timeout=1200)
            answers[name] = r.status_code
            if r.status_code != 200:
                answers[name + "_error"] = r.text[:300]
        except httpx.HTTPError as e:
            answers[name] = type(e).__name__
        answers[name + "_s"] = round(time.perf_counter() - t, 2)

    def leave() -> None:  # B: the whole request, then the client goes away
        req = httpx.Request("POST", f"{url}/v1/diff", files=files, data=form)
        body = req.read()
        head = (f"POST /v1/diff HTTP/1.1\r\nHost: x\r\nContent-Type: {req.headers['content-type']}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(head + body)
            time.sleep(args.leave_after)
        answers["B"] = "left"

    threads = {"A": threading.Thread(target=call, args=("A",))}
    threads["A"].start()
    time.sleep(0.5)  # A holds the worker (the whole timeline must fit in A's pair)
    threads["B"] = threading.Thread(target=leave)
    threads["B"].start()
    for name in ("C", "D"):
        time.sleep(0.1)
        threads[name] = threading.Thread(target=call, args=(name,))
        threads[name].start()
    threads["B"].join()
    time.sleep(0.1)
    m = metrics(url)
    t_term = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(1200)
    exit_s = time.perf_counter() - t_term
    for t in threads.values():
        t.join(60)
    watch.stop()
    err = proc.stderr.read()
    peak_gib = watch.max_kib * 1024 / GiB
    ok = (answers.get("A") == 200 and answers.get("C") == 503 and answers.get("D") == 503
          and m.get('sdrun_requests_total{status="499"}') == 1 and m.get("sdrun_pairs_dropped_total") == 1
          and "Traceback" not in err)
    report = {"machine": machine(), "bundle": str(args.bundle), "params": json.loads(args.param),
              "socket_open_s": round(socket_s or 0, 2), "ready_s": round(ready_s, 2),
              "readyz_503_while_loading": not_ready, "rss_ready_gib": round(ready_gib, 2),
              "answers": answers, "metrics_before_sigterm": {
                  k: m.get(k) for k in ('sdrun_requests_total{status="499"}', "sdrun_pairs_dropped_total",
                                        "sdrun_batch_pairs_count")},
              "sigterm_to_exit_s": round(exit_s, 2), "exit_code": rc, "rss_peak_gib": round(peak_gib, 2),
              "all_as_expected": ok, "server_stderr_tail": err[-1500:]}
    name = args.name or f"serve_stop_{args.bundle.name}"
    left = m.get('sdrun_requests_total{status="499"}')
    md = [f"# {name}", "", f"`sdrun serve {args.bundle}` on {report['machine'].get('cpu')} "
          f"({THREADS} threads); per-request params `{args.param}`. Times are of one run on a shared 2-core "
          "machine; the time to ready includes onnxruntime's graph optimisation when its cache of optimised "
          "graphs is empty (a first start).", "",
          md_table(["what", "measured"], [
              ["socket open after start", f"{report['socket_open_s']} s"],
              ["/readyz 503 answers while loading", not_ready],
              ["ready after start", f"{report['ready_s']} s (RSS {report['rss_ready_gib']} GiB)"],
              ["A (in flight at SIGTERM)", f"{answers.get('A')} after {answers.get('A_s')} s"],
              [f"B (left after {args.leave_after:g} s, queued)",
               f"counted 499: {left}, dropped: {m.get('sdrun_pairs_dropped_total')}"],
              ["C, D (queued at SIGTERM)", f"{answers.get('C')} after {answers.get('C_s')} s, "
                                           f"{answers.get('D')} after {answers.get('D_s')} s"],
              ["SIGTERM to exit", f"{report['sigterm_to_exit_s']} s (exit code {rc})"],
              ["batches computed before SIGTERM", m.get("sdrun_batch_pairs_count")],
              ["peak RSS (sampled every 0.25 s)", f"{report['rss_peak_gib']} GiB"],
              ["all as expected", ok]])]
    write_outputs(args.out_dir, name, report, "\n".join(md))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
