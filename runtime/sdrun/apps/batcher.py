"""Batching pairs across callers for asyncio services: `await batcher.diff(a, b)`.

Requests wait in a bounded queue; one task takes up to `max_batch_pairs` of them, or what
came within `max_wait_ms` of the first, and runs them as one batch in a worker thread (one
call per model for all of them), then answers each caller. A full queue is `QueueFull`
at once (a server answers 503), never an unbounded wait. A pair that fails gets its own
exception; the others in its batch are answered as usual.

    batcher = Batcher(Pipeline.load("engines/tiny").open_sessions())
    await batcher.start()
    result = await batcher.diff(image_a, image_b, params={"det_thr": 0.3})
    await batcher.stop()      # finishes what is queued
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..bundle.params import MODEL_PARAMS, POST_PARAMS, ParamError, validate
from ..errors import SpotdiffError
from ..pipeline import PairResult, Pipeline, run_isolated

REQUEST_PARAMS = tuple(k for k in POST_PARAMS) + ("det_thr", "iou_thr", "alpha", "heat_lambda", "heat_th")


class QueueFull(SpotdiffError):
    """The batcher's queue is full: try again later."""


class BatcherStopped(SpotdiffError):
    """The batcher does not take requests (not started, or stopping)."""


def request_params(params: object, pipe: Pipeline | None = None, source: str = "params") -> dict:
    """Per-request overrides, checked: post-model parameters only (a detector threshold
    would change the model phase of the whole batch); with `pipe`, also as a whole set
    with the pipeline's own (`Pipeline.resolve_params`), like every other source."""
    if params is None:
        return {}
    checked = validate(params, source)
    model_phase = [k for k in checked if k in MODEL_PARAMS and k not in REQUEST_PARAMS]
    if model_phase:
        raise ParamError(f"{source}: {', '.join(model_phase)} act before the models' answers are "
                         "shared by a batch; only these can be set per request: "
                         f"{', '.join(REQUEST_PARAMS)}")
    if pipe is not None:
        pipe.resolve_params(checked, source)
    return checked


@dataclass
class _Request:
    a: np.ndarray
    b: np.ndarray
    params: dict
    pair_id: str | None
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)
    started: bool = False  # its batch runs (a caller leaving now no longer saves anything)


@dataclass
class BatchTiming:
    queue_ms: float  # waiting for a batch to start
    batch_ms: float  # the whole batch, models and after
    batch_pairs: int


class Batcher:
    def __init__(self, pipe: Pipeline, max_batch_pairs: int = 8, max_wait_ms: float = 10.0,
                 max_queue: int = 64, on_batch: Callable[[int, float], None] | None = None,
                 on_drop: Callable[[], None] | None = None):
        if max_batch_pairs < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_pairs and max_queue must be >= 1, max_wait_ms >= 0")
        self.pipe = pipe
        self.max_batch_pairs, self.max_wait = max_batch_pairs, max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch  # called with (pairs, seconds) after each batch
        self.on_drop = on_drop  # called for each queued pair never computed (caller gone, drained)
        self._queue: asyncio.Queue[_Request | None] | None = None  # None in the queue: the end marker
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sdrun-batch")
        self._accepting = False
        self._draining = False
        self.batches = 0

    @property
    def depth(self) -> int:
        """Requests waiting for a batch."""
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        self._queue = asyncio.Queue(self.max_queue)
        self._accepting = True
        self._task = asyncio.create_task(self._loop(), name="sdrun-batcher")

    async def stop(self) -> None:
        """Take no more requests, answer every queued one, then end."""
        self._accepting = False
        if self._task is not None and self._queue is not None:  # (start sets both)
            await self._queue.put(None)  # the end marker
            await self._task
            self._task = None
        self._pool.shutdown(wait=True)

    def drain(self) -> None:
        """Take no more requests and answer every queued one BatcherStopped now, without
        computing it (a stopping server); the batch in flight still finishes. Call `stop`
        after it to end the loop."""
        self._accepting, self._draining = False, True
        if self._queue is None:
            return
        end = False
        while True:
            try:
                req = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if req is None:
                end = True
            else:
                self._refuse(req)
        if end:
            self._queue.put_nowait(None)  # stop's end marker stays

    def _refuse(self, req: _Request) -> None:
        if not req.future.done():  # (a caller that left was counted when it left)
            req.future.set_exception(BatcherStopped("the service is stopping"))
            self._dropped()

    def _dropped(self) -> None:
        if self.on_drop is not None:
            self.on_drop()

    async def diff(self, a: np.ndarray, b: np.ndarray, params: dict | None = None,
                   pair_id: str | None = None) -> tuple[PairResult, BatchTiming]:
        """The result for one pair (RGB arrays), batched with other callers' pairs."""
        if not self._accepting or self._queue is None:
            raise BatcherStopped("the batcher is not running")
        req = _Request(a, b, request_params(params, self.pipe), pair_id, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(req)
        except asyncio.QueueFull:
            raise QueueFull(f"{self.max_queue} requests are waiting already") from None
        try:
            return await req.future
        except asyncio.CancelledError:
            if not req.started:  # the caller left before its batch: it is never computed
                self._dropped()
            raise

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        assert queue is not None  # start() makes the queue before this task
        ending = False
        while not ending:
            first = await queue.get()
            if first is None:
                break
            batch = [first]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch_pairs:
                try:
                    item = queue.get_nowait()
                except asyncio.QueueEmpty:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(queue.get(), left)
                    except asyncio.TimeoutError:
                        break
                if item is None:
                    ending = True
                    break
                batch.append(item)
            batch = [r for r in batch if not r.future.done()]  # a caller that left costs nothing
            if self._draining:  # formed while the service began to stop: not computed
                for r in batch:
                    self._refuse(r)
                continue
            if not batch:
                continue
            for r in batch:
                r.started = True
            started = time.perf_counter()
            answers = await loop.run_in_executor(self._pool, self._run, batch)
            seconds = time.perf_counter() - started
            self.batches += 1
            if self.on_batch is not None:
                self.on_batch(len(batch), seconds)
            for req, answer in zip(batch, answers):
                if req.future.done():  # the caller went away
                    continue
                if isinstance(answer, BaseException):
                    req.future.set_exception(answer)
                else:
                    timing = BatchTiming(1000 * (started - req.queued), 1000 * seconds, len(batch))
                    req.future.set_result((answer, timing))

    def _run(self, batch: list[_Request]) -> list:
        return diff_pairs(self.pipe, [(r.pair_id, r.a, r.b, r.params) for r in batch])


def diff_pairs(pipe: Pipeline, pairs: Sequence[tuple]) -> list:
    """Every (id, a, b, params) pair's PairResult, or the exception that stopped it: one
    model call for them all, then each pair's own (request) parameters; a batch that fails
    as a whole is run pair by pair. The service's batcher and Triton's `spotdiff` model
    both answer through here."""
    def run(items: Sequence[tuple]) -> list:
        # CLIP embeds the boxes each pair's own parameters keep
        outputs = pipe.model_outputs([(pid, a, b) for pid, a, b, _ in items], embed="kept",
                                     params=[p or None for *_, p in items])
        answers: list = []
        for (*_, p), o in zip(items, outputs):
            try:
                answers.append(pipe.finish(o, p or None))
            except Exception as e:  # this pair's own failure
                answers.append(e)
        return answers

    return run_isolated(pairs, run, lambda item, e: e)
