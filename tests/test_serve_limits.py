"""`sdrun serve` under hostile or unlucky callers, against a real server on 127.0.0.1:
every read and wait has a bound, every answer is counted as what it was, a stopping
server finishes or refuses (503) every request it accepted, and the socket answers
/readyz 503 while the bundle loads. Every test is bounded in time."""
from __future__ import annotations

import json
import re
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from conftest import BLOCK_TORCH, free_port  # noqa: E402

from sdrun.apps.synth import write_synthetic_pairs  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    out = tmp_path_factory.mktemp("limits-pairs")
    write_synthetic_pairs(out, 2, seed=8)
    return (out / "data" / "10000_1.png").read_bytes(), (out / "data" / "10000_2.png").read_bytes()


# Code run in the server process before `sdrun serve`: slow model calls (to hold a batch in
# flight) and slow or failing loading, through environment variables of the test.
PATCHES = textwrap.dedent("""
    import os, time
    from sdrun.pipeline import Pipeline
    _slow_model = float(os.environ.get("T_SLOW_MODEL", "0"))
    _slow_load = float(os.environ.get("T_SLOW_LOAD", "0"))
    _real_outputs, _real_open = Pipeline.model_outputs, Pipeline.open_sessions
    def _outputs(self, pairs, *a, **k):
        if _slow_model and any(p[0] is None and p[1].shape[0] > 32 for p in pairs):
            time.sleep(_slow_model)  # not the 32x32 warm-up pair
        return _real_outputs(self, pairs, *a, **k)
    def _open(self, *a, **k):
        time.sleep(_slow_load)
        if os.environ.get("T_FAIL_LOAD"):
            raise RuntimeError("this bundle cannot be opened (test)")
        return _real_open(self, *a, **k)
    Pipeline.model_outputs, Pipeline.open_sessions = _outputs, _open
""")


class Server:
    """`sdrun serve BUNDLE ARGS` in a process without torch, on a free port."""

    def __init__(self, bundle, *args, env=None):
        import os

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        code = BLOCK_TORCH + PATCHES + textwrap.dedent(f"""
            sys.argv = ["sdrun", "serve", {str(bundle)!r}, "--port", "{self.port}",
                        "--log-level", "info"] + {[str(a) for a in args]!r}
            from sdrun.cli import main
            main()
        """)
        self.proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.stderr = ""

    def wait_for_socket(self, timeout=60.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, self.finish()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("the socket never opened")

    def wait_ready(self, timeout=120.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, self.finish()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("never ready")

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)}

    def finish(self, timeout=30.0) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.stderr += self.proc.stderr.read()
        return self.stderr


@pytest.fixture
def server(tiny_bundle):
    started = []

    def start(*args, env=None, ready=True):
        s = Server(tiny_bundle, *args, env=env)
        started.append(s)
        (s.wait_ready if ready else s.wait_for_socket)()
        return s

    yield start
    for s in started:
        s.finish()


def files(a: bytes, b: bytes, params=None):
    out = {"files": {"image_a": ("a.png", a, "image/png"), "image_b": ("b.png", b, "image/png")}}
    if params is not None:
        out["data"] = {"params": params if isinstance(params, str) else json.dumps(params)}
    return out


def raw_request(port: int, head: bytes, body: bytes = b"", read_for: float = 10.0) -> tuple[bytes, float]:
    """Send `head` + `body` and read until the server closes (or `read_for` s): (what came, s)."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=read_for) as s:
        s.sendall(head + body)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return got, time.perf_counter() - t0


def png_header_only(width: int, height: int) -> bytes:
    """A small valid PNG that claims width x height (one compressed black image)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = zlib.compress(b"\0" * (width * 3 + 1) * 1, 9)  # the first row only: enough to claim the size
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


# ---- loading: the socket first ----------------------------------------------------------
def test_readyz_answers_503_while_the_bundle_loads(server, pair):
    s = server(env={"T_SLOW_LOAD": "4"}, ready=False)
    r = httpx.get(f"{s.url}/readyz", timeout=5)
    assert r.status_code == 503 and "loading" in r.json()["error"]
    assert httpx.get(f"{s.url}/healthz", timeout=5).status_code == 200
    d = httpx.post(f"{s.url}/v1/diff", timeout=10, **files(*pair))
    assert d.status_code == 503 and d.headers["Retry-After"] == "1"
    s.wait_ready()
    assert httpx.post(f"{s.url}/v1/diff", timeout=60, **files(*pair)).status_code == 200


def test_a_bundle_that_fails_to_load_ends_the_process_with_a_message(tiny_bundle):
    s = Server(tiny_bundle, env={"T_FAIL_LOAD": "1"})
    try:
        rc = s.proc.wait(60)
    finally:
        err = s.finish()
    assert rc == 2, err
    assert "error: loading" in err and "this bundle cannot be opened" in err, err


# ---- reads with a deadline -----------------------------------------------------------------
def test_a_half_sent_body_is_answered_408_and_closed(server):
    s = server("--read-timeout", "1")
    head = (b"POST /v1/diff HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n")
    got, seconds = raw_request(s.port, head, b'{"image_a": "', read_for=15)
    assert got.startswith(b"HTTP/1.1 408"), got[:200]
    assert b"did not arrive within 1 s" in got
    assert seconds < 8
    assert s.metrics()['sdrun_requests_total{status="408"}'] == 1


def test_a_head_sent_a_byte_at_a_time_is_closed(server):
    s = server("--read-timeout", "1")
    t0 = time.perf_counter()
    closed_after = None
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
        for byte in b"POST /v1/diff HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
            try:
                sock.sendall(bytes([byte]))
                sock.settimeout(0.2)
                if sock.recv(1) == b"":
                    closed_after = time.perf_counter() - t0
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.perf_counter() - t0
                break
    assert closed_after is not None and closed_after < 6, closed_after


# ---- every answer counted as what it was -----------------------------------------------------
def test_metrics_count_422_and_500_as_such(server, pair):
    s = server()
    nested = "[" * 100_000 + "]" * 100_000
    r = httpx.post(f"{s.url}/v1/diff", timeout=30, **files(*pair, params=nested))
    assert r.status_code == 422 and "nested too deeply" in r.json()["error"]
    r = httpx.post(f"{s.url}/v1/diff", timeout=30, **files(*pair, params={"det_thr": 50, "heat_lambda": 0}))
    assert r.status_code == 422 and "keeps no box" in r.json()["error"], r.text
    r = httpx.post(f"{s.url}/v1/diff", timeout=30, **files(*pair, params={"class_mode": "heads"}))
    assert r.status_code == 422 and "no per-class change heads" in r.json()["error"], r.text
    m = s.metrics()
    assert m['sdrun_requests_total{status="422"}'] == 3
    assert 'sdrun_requests_total{status="200"}' not in m


def test_an_image_over_max_pixels_is_refused_from_its_header(server, pair):
    s = server("--max-pixels", "10M")
    big = png_header_only(8000, 8000)
    assert len(big) < 100_000
    t0 = time.perf_counter()
    r = httpx.post(f"{s.url}/v1/diff", timeout=30, **files(big, pair[1]))
    assert time.perf_counter() - t0 < 3
    assert r.status_code == 422, r.text
    assert "8000x8000" in r.json()["error"] and "image_a" in r.json()["error"]


def test_a_caller_that_leaves_costs_nothing_and_counts_499(server, pair):
    s = server("--max-batch-pairs", "1", "--max-wait-ms", "0", env={"T_SLOW_MODEL": "2"})
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, f"{s.url}/v1/diff", timeout=60, **files(*pair))
        time.sleep(0.5)  # the first pair holds the worker
        body = httpx.Request("POST", f"{s.url}/v1/diff", **files(*pair))
        head = (f"POST /v1/diff HTTP/1.1\r\nHost: x\r\nContent-Type: {body.headers['content-type']}\r\n"
                f"Content-Length: {len(body.read())}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as sock:
            sock.sendall(head + body.read())
            time.sleep(0.5)  # queued behind the first
        assert first.result().status_code == 200
    time.sleep(3)
    m = s.metrics()
    assert m['sdrun_requests_total{status="499"}'] == 1
    assert m["sdrun_pairs_dropped_total"] == 1
    assert m["sdrun_batch_pairs_count"] == 1  # the pair of the caller that left never ran


# ---- stopping ----------------------------------------------------------------------------------
def test_sigterm_with_a_queue_refuses_the_queue_and_exits_promptly(server, pair):
    s = server("--max-batch-pairs", "1", "--max-wait-ms", "0", env={"T_SLOW_MODEL": "2"})
    answers: list = []

    def call():
        try:
            answers.append(httpx.post(f"{s.url}/v1/diff", timeout=60, **files(*pair)).status_code)
        except httpx.TransportError as e:
            answers.append(type(e).__name__)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    time.sleep(0.5)  # one pair in flight, five queued
    t0 = time.perf_counter()
    s.proc.send_signal(signal.SIGTERM)
    rc = s.proc.wait(30)
    exit_seconds = time.perf_counter() - t0
    for t in threads:
        t.join(30)
    err = s.finish()
    assert rc in (0, -signal.SIGTERM), err
    assert sorted(map(str, answers)) == ["200"] + ["503"] * 5, (answers, err)
    assert exit_seconds < 6, exit_seconds  # the pair in flight (2 s), not the five queued (10 s more)
    assert "Traceback" not in err, err
