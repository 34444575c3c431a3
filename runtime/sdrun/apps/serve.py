"""`sdrun serve`: the pipeline as an HTTP service (FastAPI), batching across callers.

    POST /v1/diff        multipart (files image_a, image_b; optional field params: JSON) or
                         application/json {"image_a": base64, "image_b": base64, "params": {...}}
                         -> the pair's JSON as `sdrun run` writes it, the bundle, timings;
                         ?viz=1 -> the picture `sdrun diff --viz` draws (PNG)
    GET  /healthz        the process is alive
    GET  /readyz         503 until the bundle is loaded and every session opened and warmed
    GET  /metrics        Prometheus: requests by status, durations, batch sizes, queue depth
    GET  /v1/info        the bundle: models, graphs, vocabulary, parameters

Status codes: 413 for a body over --max-bytes, 422 for an unreadable image, a missing field
or bad params (the message names the field), 503 with Retry-After when the queue is full
or the service is not ready.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..bundle.params import ParamError
from ..errors import SpotdiffError
from ..stages.images import ImageError, decode_image
from .batcher import Batcher, BatcherStopped, QueueFull


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
    retry_after_s: int = 1

    @property
    def batch_pairs(self) -> int:
        """`max_batch_pairs`, or the provider's default (`DEFAULT_BATCH_PAIRS`)."""
        return self.max_batch_pairs or DEFAULT_BATCH_PAIRS["cpu" if self.provider == "cpu" else "gpu"]


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

    def observe_batch(self, pairs: int, seconds: float) -> None:
        self.batch_pairs.observe(pairs)
        self.batch_seconds.observe(seconds)


def bundle_info(pipe) -> dict:
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


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the body is {int(declared)} bytes; this service takes at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the body is over {limit} bytes, the most this service takes")
        chunks.append(chunk)
    request._body = b"".join(chunks)  # starlette reads the form from the cached body
    return request._body


async def _read_pair(request: Request, limit: int) -> tuple[np.ndarray, np.ndarray, dict | None]:
    body = await _body(request, limit)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        try:
            doc = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(422, f"body: not valid JSON ({e})") from None
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
        except Exception as e:  # noqa: BLE001 - starlette's parser errors
            raise RequestError(422, f"body: not a readable multipart form ({e})") from None
        images = []
        for name in ("image_a", "image_b"):
            part = form.get(name)
            if part is None:
                raise RequestError(422, f"{name}: missing (send it as a file field)")
            images.append(await part.read() if hasattr(part, "read") else str(part).encode())
        params = form.get("params")
        if params is not None:
            try:
                params = json.loads(params if isinstance(params, str) else await params.read())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(422, f"params: not valid JSON ({e})") from None
    else:
        raise RequestError(415 if kind else 422, f"content-type {kind or 'missing'}: send multipart/"
                           "form-data (image_a, image_b files) or application/json (base64)")
    try:
        a, b = (decode_image(data, name) for name, data in zip(("image_a", "image_b"), images))
    except ImageError as e:
        raise RequestError(422, str(e)) from None
    return a, b, params


def create_app(config: ServeConfig, pipe=None) -> FastAPI:
    """The service. `pipe` (a loaded Pipeline) skips loading `config.bundle`."""
    metrics = Metrics()
    state: dict = {"ready": False, "batcher": None, "pipe": pipe, "error": None}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()

        def load():
            from ..pipeline import Pipeline

            p = state["pipe"] or Pipeline.load(config.bundle, provider=config.provider, threads=config.threads,
                                               memory_budget=config.memory_budget)
            p.open_sessions()
            z = np.zeros((32, 32, 3), np.uint8)  # warm every session once
            p.diff(z, z)
            return p

        state["pipe"] = await loop.run_in_executor(None, load)
        batcher = Batcher(state["pipe"], config.batch_pairs, config.max_wait_ms, config.max_queue,
                          on_batch=metrics.observe_batch)
        await batcher.start()
        state["batcher"] = batcher
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            await batcher.stop()  # finish what is queued

    app = FastAPI(title="spotdiff", lifespan=lifespan,
                  description="Spot the difference: what was added, removed or changed between two images.")
    app.state.sdrun = state
    app.state.metrics = metrics

    def error(status: int, message: str, **headers) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers or None)

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        if not state["ready"]:
            return error(503, "loading the bundle and warming the sessions", **{"Retry-After": "1"})
        return {"status": "ready", "bundle": str(state["pipe"].bundle.root)}

    @app.get("/metrics")
    async def prometheus():
        metrics.queue_depth.set(state["batcher"].depth if state["batcher"] else 0)
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info")
    async def info():
        if not state["ready"]:
            return error(503, "not ready", **{"Retry-After": "1"})
        return bundle_info(state["pipe"])

    @app.post("/v1/diff")
    async def diff(request: Request, viz: int = 0):
        t0 = time.perf_counter()
        status = 200
        try:
            if not state["ready"]:
                raise RequestError(503, "not ready: loading the bundle")
            a, b, params = await _read_pair(request, config.max_bytes)
            try:  # the batcher checks the params (`request_params`) before it queues the pair
                result, timing = await state["batcher"].diff(a, b, params)
            except ParamError as e:
                raise RequestError(422, str(e)) from None
            except QueueFull as e:
                raise RequestError(503, f"busy: {e}; retry after {config.retry_after_s} s") from None
            except BatcherStopped:
                raise RequestError(503, "shutting down") from None
            except Exception as e:  # noqa: BLE001 - this pair failed in the models
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
        except RequestError as e:
            status = e.status
            headers = {"Retry-After": str(config.retry_after_s)} if e.status == 503 else {}
            return error(e.status, str(e), **headers)
        finally:
            metrics.requests.labels(str(status)).inc()
            metrics.duration.observe(time.perf_counter() - t0)

    return app


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the service until SIGINT/SIGTERM: then it stops accepting, finishes the queue, exits."""
    import uvicorn

    uvicorn.run(create_app(config), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=30)
