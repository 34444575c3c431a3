"""`sdrun serve`: the pipeline as an HTTP service (FastAPI), batching across callers.

    POST /v1/diff        multipart (files image_a, image_b; optional field params: JSON) or
                         application/json {"image_a": base64, "image_b": base64, "params": {...}}
                         -> the pair's JSON as `sdrun run` writes it, the bundle, timings;
                         ?viz=1 -> the picture `sdrun diff --viz` draws (PNG)
    GET  /healthz        the process is alive
    GET  /readyz         503 until the bundle is loaded and every session opened and warmed
    GET  /metrics        Prometheus: requests by status, durations, batch sizes, queue depth
    GET  /v1/info        the bundle: models, graphs, vocabulary, parameters

Status codes: 413 for a body over --max-bytes, 422 for an unreadable image, an image over
--max-pixels (read from its header, before decoding), a missing field or bad params (the
message names the field), 408 for a body not sent within --read-timeout, 503 with
Retry-After when the queue is full, the service is not ready or it is stopping. A caller
that disconnects is counted as 499 and its pair is dropped if its batch has not started.

Every wait has a bound: a request's head must arrive within --read-timeout of the
connection (or of the previous answer), its body within --read-timeout; at most
--max-queue requests wait. The socket opens at once and /readyz answers 503 while the
bundle loads. On SIGTERM or SIGINT the service stops accepting, answers every queued
request 503 ("shutting down"), finishes the batch in flight and exits (after at most
--shutdown-timeout seconds); a bundle that fails to load ends the process with an error.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from ..backends.interface import runs_on_cpu
from ..bundle.params import ParamError
from ..errors import SpotdiffError
from ..stages.images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from .batcher import Batcher, BatcherStopped, QueueFull

if TYPE_CHECKING:
    from ..pipeline import Pipeline

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    bundle: str
    provider: str = "cpu"
    threads: int | None = None
    memory_budget: int | str | None = None
    max_batch_pairs: int | None = None  # None: DEFAULT_BATCH_PAIRS of the provider
    max_wait_ms: float = 10.0
    max_queue: int = 64
    max_bytes: int = 32 * 2**20
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # per image, read from its header; None: no limit
    read_timeout_s: float = 30.0  # a request's head, and then its body, must arrive within this
    shutdown_timeout_s: float = 60.0  # on SIGTERM, the most the batch in flight may take
    retry_after_s: int = 1

    @property
    def batch_pairs(self) -> int:
        """`max_batch_pairs`, or the provider's default (`DEFAULT_BATCH_PAIRS`)."""
        return self.max_batch_pairs or DEFAULT_BATCH_PAIRS["cpu" if runs_on_cpu(self.provider) else "gpu"]


# Most pairs per model batch when not given. On a CPU a batch of pairs serves no more per
# second than one pair at a time (the cores are busy at batch 1:
# benchmarks/results/serve_load_full*.md) and makes every caller wait for the slowest of
# the batch; on a GPU a batch can fill the device (not measured here), each call bounded
# by the memory budget.
DEFAULT_BATCH_PAIRS = {"cpu": 1, "gpu": 8}


class RequestError(SpotdiffError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


CLIENT_CLOSED = 499  # the caller disconnected before its answer (nginx's code)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("sdrun_requests", "HTTP requests to /v1/diff by status code",
                                ["status"], registry=self.registry)
        self.duration = Histogram("sdrun_request_seconds", "Duration of /v1/diff requests",
                                  registry=self.registry,
                                  buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.batch_pairs = Histogram("sdrun_batch_pairs", "Pairs per model batch", registry=self.registry,
                                     buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
        self.batch_seconds = Histogram("sdrun_batch_seconds", "Duration of one batch", registry=self.registry)
        self.queue_depth = Gauge("sdrun_queue_depth", "Requests waiting for a batch", registry=self.registry)
        self.dropped = Counter("sdrun_pairs_dropped", "Pairs never computed: their caller left, or the "
                               "service stopped before their batch", registry=self.registry)

    def observe_batch(self, pairs: int, seconds: float) -> None:
        self.batch_pairs.observe(pairs)
        self.batch_seconds.observe(seconds)


def bundle_info(pipe: Pipeline) -> dict:
    m = pipe.bundle.manifest
    return {"bundle": str(pipe.bundle.root), "content_id": pipe.bundle.content_id,
            "schema_version": m.get("schema_version"), "created": m.get("created"),
            "tools": m.get("tools", {}), "vocabulary": pipe.labels, "provider": pipe.provider,
            "models": {name: {"source": e.get("source", {}),
                              "graphs": {g: {"file": ge["file"], "inputs": ge.get("inputs"),
                                             "outputs": ge.get("outputs")}
                                         for g, ge in e.get("graphs", {}).items()}}
                       for name, e in pipe.bundle.models.items()},
            "params": pipe.effective_params}


async def _body(request: Request, limit: int, timeout_s: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the body is {int(declared)} bytes; this service takes at most {limit}")
    chunks: list[bytes] = []

    async def read() -> None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"the body is over {limit} bytes, the most this service takes")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(408, f"the body did not arrive within {timeout_s:g} s "
                           f"({sum(map(len, chunks))} bytes came)") from None
    request._body = b"".join(chunks)  # starlette reads the form from the cached body
    return request._body


def _json(data: bytes | str, what: str):
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(422, f"{what}: not valid JSON ({e})") from None
    except RecursionError:
        raise RequestError(422, f"{what}: JSON nested too deeply") from None


async def _read_pair(request: Request, config: ServeConfig) -> tuple[np.ndarray, np.ndarray, dict | None]:
    limit = config.max_bytes
    body = await _body(request, limit, config.read_timeout_s)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        doc = _json(body, "body")
        if not isinstance(doc, dict):
            raise RequestError(422, "body: expected a JSON object with image_a, image_b (base64)")
        images = []
        for name in ("image_a", "image_b"):
            if not isinstance(doc.get(name), str):
                raise RequestError(422, f"{name}: missing (a base64 string of the encoded image)")
            try:
                images.append(base64.b64decode(doc[name], validate=True))
            except (binascii.Error, ValueError):
                raise RequestError(422, f"{name}: not valid base64") from None
        params = doc.get("params")
    elif kind == "multipart/form-data":
        try:
            form = await request.form(max_part_size=limit)
        except Exception as e:  # starlette's parser errors
            raise RequestError(422, f"body: not a readable multipart form ({e})") from None
        images = []
        for name in ("image_a", "image_b"):
            part = form.get(name)
            if part is None:
                raise RequestError(422, f"{name}: missing (send it as a file field)")
            images.append(await part.read() if hasattr(part, "read") else str(part).encode())
        params = form.get("params")
        if params is not None:
            params = _json(params if isinstance(params, str) else await params.read(), "params")
    else:
        raise RequestError(415 if kind else 422, f"content-type {kind or 'missing'}: send multipart/"
                           "form-data (image_a, image_b files) or application/json (base64)")
    try:
        a, b = (decode_image(data, name, max_pixels=config.max_pixels)
                for name, data in zip(("image_a", "image_b"), images))
    except ImageError as e:
        raise RequestError(422, str(e)) from None
    return a, b, params


async def _until_disconnected(request: Request) -> None:
    """Returns when the caller closes its connection (the body has been read by then, so
    the server's next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(config: ServeConfig, pipe: Pipeline | None = None,
               on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """The service. `pipe` (a Pipeline) skips loading `config.bundle`; the sessions are opened
    and warmed in the background either way (`app.state.sdrun_ready` is set when done).
    `on_fatal(message)` is called when loading fails (`serve` ends the process)."""
    metrics = Metrics()
    state: dict = {"ready": False, "stopping": False, "batcher": None, "pipe": pipe, "error": None}
    ready = asyncio.Event()

    def load():
        from ..pipeline import Pipeline

        p = state["pipe"] or Pipeline.load(config.bundle, provider=config.provider, threads=config.threads,
                                           memory_budget=config.memory_budget)
        p.open_sessions()
        z = np.zeros((32, 32, 3), np.uint8)  # warm every session once
        p.diff(z, z)
        return p

    async def load_in_background() -> None:
        # a daemon thread, not the loop's executor: a SIGTERM while loading exits at once
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def fail(err: BaseException) -> None:
            if not done.done():
                done.set_exception(err)

        def succeed(result) -> None:
            if not done.done():
                done.set_result(result)

        def work():
            try:
                result = load()
            except BaseException as e:  # reported below
                loop.call_soon_threadsafe(fail, e)
            else:
                loop.call_soon_threadsafe(succeed, result)

        threading.Thread(target=work, name="sdrun-load", daemon=True).start()
        try:
            state["pipe"] = await done
        except Exception as e:
            state["error"] = f"loading {config.bundle} failed: {type(e).__name__}: {e}"
            log.error(state["error"])
            if on_fatal is not None:
                on_fatal(state["error"])
            return
        if state["stopping"]:
            return
        batcher = Batcher(state["pipe"], config.batch_pairs, config.max_wait_ms, config.max_queue,
                          on_batch=metrics.observe_batch, on_drop=metrics.dropped.inc)
        await batcher.start()
        state["batcher"] = batcher
        state["ready"] = True
        ready.set()
        log.info("ready: %s", config.bundle)

    def begin_stop() -> None:
        """Refuse from now on, answer the queue 503 (called on SIGTERM, in the loop)."""
        state["stopping"], state["ready"] = True, False
        if state["batcher"] is not None:
            state["batcher"].drain()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.loop = asyncio.get_running_loop()
        loader = asyncio.create_task(load_in_background(), name="sdrun-load")
        try:
            yield
        finally:
            begin_stop()
            if not loader.done():
                loader.cancel()
            if state["batcher"] is not None:
                await state["batcher"].stop()  # the batch in flight ends; the queue was answered

    app = FastAPI(title="spotdiff", lifespan=lifespan,
                  description="Spot the difference: what was added, removed or changed between two images.")
    app.state.sdrun = state
    app.state.sdrun_ready = ready
    app.state.metrics = metrics
    app.state.begin_stop = begin_stop

    def error(status: int, message: str, **headers) -> JSONResponse:
        if status == 503:
            headers.setdefault("Retry-After", str(config.retry_after_s))
        if status == 408:
            headers["Connection"] = "close"  # the rest of the body is not read
        return JSONResponse({"error": message}, status_code=status, headers=headers or None)

    def not_ready() -> str:
        if state["error"]:
            return state["error"]
        return "shutting down" if state["stopping"] else "loading the bundle and warming the sessions"

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        if not state["ready"]:
            return error(503, not_ready())
        return {"status": "ready", "bundle": str(state["pipe"].bundle.root)}

    @app.get("/metrics")
    async def prometheus():
        metrics.queue_depth.set(state["batcher"].depth if state["batcher"] else 0)
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info")
    async def info():
        if not state["ready"]:
            return error(503, not_ready())
        return bundle_info(state["pipe"])

    async def answer(request: Request, t0: float, viz: int):
        if not state["ready"]:
            raise RequestError(503, f"not ready: {not_ready()}")
        a, b, params = await _read_pair(request, config)
        job = asyncio.ensure_future(state["batcher"].diff(a, b, params))
        gone = asyncio.ensure_future(_until_disconnected(request))
        try:
            await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not job.done():  # the caller left: drop its pair unless its batch runs already
            job.cancel()
            raise RequestError(CLIENT_CLOSED, "the client closed the connection")
        try:  # the batcher checks the params (`request_params`) before it queues the pair
            result, timing = job.result()
        except ParamError as e:
            raise RequestError(422, str(e)) from None
        except QueueFull as e:
            raise RequestError(503, f"busy: {e}; retry after {config.retry_after_s} s") from None
        except BatcherStopped:
            raise RequestError(503, "shutting down") from None
        except Exception as e:  # this pair failed in the models
            log.exception("a pair failed")
            raise RequestError(500, f"{type(e).__name__}: {e}") from None
        if viz:
            import cv2

            from .viz import render_pair

            ok, png = cv2.imencode(".png", render_pair(a, b, result)[..., ::-1])
            return Response(png.tobytes(), media_type="image/png")
        pipe = state["pipe"]
        return {**result.to_json(), "bundle": {"path": str(pipe.bundle.root),
                                               "content_id": pipe.bundle.content_id},
                "timings": {"queue_ms": round(timing.queue_ms, 3), "batch_ms": round(timing.batch_ms, 3),
                            "batch_pairs": timing.batch_pairs,
                            "total_ms": round(1000 * (time.perf_counter() - t0), 3)}}

    @app.post("/v1/diff")
    async def diff(request: Request, viz: int = 0):
        t0 = time.perf_counter()
        status = 500
        try:
            response = await answer(request, t0, viz)
            status = response.status_code if isinstance(response, Response) else 200
            return response
        except RequestError as e:
            status = e.status
            return error(e.status, str(e))
        except Exception as e:  # counted and answered as what it is
            log.exception("internal error")
            return error(500, f"internal error: {type(e).__name__}")
        finally:
            metrics.requests.labels(str(status)).inc()
            metrics.duration.observe(time.perf_counter() - t0)

    return app


def _bounded_h11(head_timeout_s: float):
    """uvicorn's h11 protocol, closing a connection whose request head has not arrived
    within `head_timeout_s` of the connection (or of the previous answer): a client that
    sends a byte now and then can no longer hold a connection open."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedH11Protocol(H11Protocol):
        _head_timer = None

        def _arm_head_timer(self) -> None:
            self._disarm_head_timer()
            self._head_timer = self.loop.call_later(head_timeout_s, self._head_too_slow)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_slow(self) -> None:
            self._head_timer = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                log.info("closing a connection whose request did not arrive within %g s", head_timeout_s)
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm_head_timer()  # a request is in; its body has its own deadline

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_timer()

        def connection_lost(self, exc) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

    return BoundedH11Protocol


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the service until SIGINT/SIGTERM: then it refuses new requests, answers the queue
    503, finishes the batch in flight and exits. Raises SpotdiffError if the bundle fails
    to load (after the socket opened)."""
    import uvicorn

    failure: list[str] = []

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            loop = getattr(app.state, "loop", None)
            if loop is not None:  # signal handlers may only schedule work on the loop
                loop.call_soon_threadsafe(app.state.begin_stop)

    def fatal(message: str) -> None:
        failure.append(message)
        server.should_exit = True

    app = create_app(config, on_fatal=fatal)
    uconfig = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=_bounded_h11(config.read_timeout_s),
                             # uvicorn takes whole seconds: a fraction is rounded up, never cut short
                             timeout_graceful_shutdown=math.ceil(config.shutdown_timeout_s),
                             timeout_keep_alive=5,
                             limit_concurrency=config.max_queue + config.batch_pairs + 32)
    server = Server(uconfig)
    server.run()
    if failure:
        raise SpotdiffError(failure[0])
