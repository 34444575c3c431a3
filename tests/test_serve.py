"""`sdrun serve`: answers equal `Pipeline.diff`, batching across callers, the status codes,
readiness, metrics; and a real server on a socket in a process without torch."""
from __future__ import annotations

import asyncio
import base64
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from conftest import BLOCK_TORCH, free_port  # noqa: E402

from sdrun.apps.serve import ServeConfig, create_app  # noqa: E402
from sdrun.apps.synth import write_synthetic_pairs  # noqa: E402
from sdrun.pipeline import Pipeline  # noqa: E402


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-pairs")
    write_synthetic_pairs(out, 16, seed=4)
    return [(out / "data" / f"{10000 + i}_1.png", out / "data" / f"{10000 + i}_2.png") for i in range(16)]


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return Pipeline.load(tiny_bundle).open_sessions()


def files(a, b, params=None):
    out = {"files": {"image_a": ("a.png", a.read_bytes(), "image/png"),
                     "image_b": ("b.png", b.read_bytes(), "image/png")}}
    if params is not None:
        out["data"] = {"params": json.dumps(params)}
    return out


def run_app(config, pipe, scenario):
    """Run `scenario(client, app)` against the app in this process, its lifespan included."""
    app = create_app(config, pipe)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sdrun") as client:
            before = await client.get("/readyz")
            async with app.router.lifespan_context(app):
                await asyncio.wait_for(app.state.sdrun_ready.wait(), 60)  # loads in the background
                return before, await scenario(client, app)

    return asyncio.run(main())


def same_answer(got: dict, want: dict):
    for k in ("added", "removed", "changed"):
        assert got[k] == want[k], k
    assert got["change_score"] == pytest.approx(want["change_score"], abs=1e-5)
    assert [(o["image"], o["label"], o["status"]) for o in got["objects"]] == \
        [(o["image"], o["label"], o["status"]) for o in want["objects"]]


def test_answers_equal_pipeline_diff_and_batch_across_callers(tiny_bundle, pipe, pairs):
    config = ServeConfig(str(tiny_bundle), max_batch_pairs=8, max_wait_ms=200)
    want = [pipe.diff(a, b).to_json() for a, b in pairs]

    async def scenario(client, app):
        answers = await asyncio.gather(*(client.post("/v1/diff", **files(a, b)) for a, b in pairs))
        ready = await client.get("/readyz")
        metrics = (await client.get("/metrics")).text
        info = (await client.get("/v1/info")).json()
        return answers, ready, metrics, info, app.state.sdrun["batcher"].batches

    before, (answers, ready, metrics, info, batches) = run_app(config, pipe, scenario)
    assert before.status_code == 503 and "Retry-After" in before.headers
    assert ready.status_code == 200
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    for r, w in zip(answers, want):
        same_answer(r.json(), w)
        assert r.json()["bundle"]["content_id"] == pipe.bundle.content_id
    sizes = [r.json()["timings"]["batch_pairs"] for r in answers]
    assert batches < 16 and max(sizes) > 1, (batches, sizes)  # fewer model calls than requests
    assert f"sdrun_batch_pairs_count {float(batches)}" in metrics
    assert 'sdrun_requests_total{status="200"} 16.0' in metrics
    assert info["vocabulary"] == pipe.labels and "owlvit" in info["models"]


def test_json_base64_params_and_viz(tiny_bundle, pipe, pairs):
    a, b = pairs[3]
    want = pipe.finish(pipe.model_outputs([(None, a, b)], embed="all")[0], {"det_thr": 0.6}).to_json()

    async def scenario(client, app):
        body = {"image_a": base64.b64encode(a.read_bytes()).decode(),
                "image_b": base64.b64encode(b.read_bytes()).decode(), "params": {"det_thr": 0.6}}
        as_json = await client.post("/v1/diff", json=body)
        as_form = await client.post("/v1/diff", **files(a, b, {"det_thr": 0.6}))
        picture = await client.post("/v1/diff?viz=1", **files(a, b))
        return as_json, as_form, picture

    _, (as_json, as_form, picture) = run_app(ServeConfig(str(tiny_bundle)), pipe, scenario)
    assert as_json.status_code == 200 and as_form.status_code == 200, (as_json.text, as_form.text)
    same_answer(as_json.json(), want)
    same_answer(as_form.json(), want)
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    assert picture.content.startswith(b"\x89PNG")


def test_status_codes_name_the_field(tiny_bundle, pipe, pairs, tmp_path):
    a, b = pairs[0]
    truncated = a.read_bytes()[:300]
    text = b"img_id,added_objs\n1,car\n"
    cases = {
        "truncated": ({"files": {"image_a": ("a.png", truncated, "image/png"),
                                 "image_b": ("b.png", b.read_bytes(), "image/png")}}, 422, "image_a"),
        "text": ({"files": {"image_a": ("a.png", a.read_bytes(), "image/png"),
                            "image_b": ("b.csv", text, "text/csv")}}, 422, "image_b: not an image"),
        "missing": ({"files": {"image_a": ("a.png", a.read_bytes(), "image/png")}}, 422, "image_b: missing"),
        "unknown param": (files(a, b, {"det_th": 0.3}), 422, "unknown parameter 'det_th'"),
        "bad value": (files(a, b, {"iou_thr": 7}), 422, "iou_thr=7: must lie in [0, 1]"),
        "model-phase param": (files(a, b, {"owlvit_score_thr": 0.2}), 422, "owlvit_score_thr"),
        "bad json": ({"content": b"{", "headers": {"content-type": "application/json"}}, 422, "not valid JSON"),
    }

    async def scenario(client, app):
        return {name: await client.post("/v1/diff", **kw) for name, (kw, _, _) in cases.items()}

    _, got = run_app(ServeConfig(str(tiny_bundle)), pipe, scenario)
    for name, (_, status, fragment) in cases.items():
        assert got[name].status_code == status, (name, got[name].text)
        assert fragment in got[name].json()["error"], (name, got[name].text)
    _, small = run_app(ServeConfig(str(tiny_bundle), max_bytes=1000), pipe,
                       lambda client, app: client.post("/v1/diff", **files(a, b)))
    assert small.status_code == 413 and "1000" in small.json()["error"]


def test_a_full_queue_answers_503_and_loses_nothing(tiny_bundle, pipe, pairs):
    release = threading.Event()
    real = pipe.model_outputs

    def slow(*args, **kwargs):
        release.wait(30)
        return real(*args, **kwargs)

    config = ServeConfig(str(tiny_bundle), max_batch_pairs=1, max_wait_ms=0, max_queue=1)

    async def scenario(client, app):
        app.state.sdrun["pipe"].model_outputs = slow  # the batch in flight holds the worker
        first = asyncio.create_task(client.post("/v1/diff", **files(*pairs[0])))
        await asyncio.sleep(0.3)
        second = asyncio.create_task(client.post("/v1/diff", **files(*pairs[1])))  # waits in the queue
        await asyncio.sleep(0.3)
        third = await client.post("/v1/diff", **files(*pairs[2]))  # no room
        release.set()
        return third, await first, await second

    try:
        _, (third, first, second) = run_app(config, pipe, scenario)
    finally:
        pipe.__dict__.pop("model_outputs", None)
    assert third.status_code == 503 and third.headers["Retry-After"] == "1"
    assert "busy" in third.json()["error"]
    assert first.status_code == 200 and second.status_code == 200


def test_real_server_on_a_socket_without_torch(tiny_bundle, pipe, pairs):
    port = free_port()
    code = BLOCK_TORCH + textwrap.dedent(f"""
        sys.argv = ["sdrun", "serve", {str(tiny_bundle)!r}, "--port", "{port}", "--log-level", "info"]
        from sdrun.cli import main
        main()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline, ready = time.time() + 120, None
        while time.time() < deadline:
            try:
                ready = httpx.get(f"{url}/readyz", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        assert ready is not None and ready.status_code == 200, proc.stderr.read() if proc.poll() is not None else ""
        assert httpx.get(f"{url}/healthz").json() == {"status": "alive"}
        a, b = pairs[5]
        r = httpx.post(f"{url}/v1/diff", timeout=60, **files(a, b))
        assert r.status_code == 200, r.text
        same_answer(r.json(), pipe.diff(a, b).to_json())
    finally:
        proc.send_signal(signal.SIGTERM)  # graceful: stop accepting, finish, exit
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    err = proc.stderr.read()
    assert rc in (0, -signal.SIGTERM), err  # uvicorn re-raises the signal after a clean shutdown
    assert "Finished server process" in err, err
    assert "blocked in this test" not in err and "Traceback" not in err, err


def test_a_pair_that_fails_never_fails_its_batch(pipe, pairs):
    from sdrun.apps.batcher import Batcher
    from sdrun.stages.images import load_image

    real = pipe.finish

    def finish(outputs, params=None):
        if outputs.pair_id == "bad":
            raise RuntimeError("this pair breaks")
        return real(outputs, params)

    images = [(load_image(a), load_image(b)) for a, b in pairs[:4]]

    async def main():
        batcher = Batcher(pipe, max_batch_pairs=4, max_wait_ms=500)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.diff(a, b, pair_id="bad" if k == 1 else str(k))
                                          for k, (a, b) in enumerate(images)), return_exceptions=True), batcher.batches
        finally:
            await batcher.stop()

    pipe.finish = finish
    try:
        answers, batches = asyncio.run(main())
    finally:
        del pipe.finish
    assert batches == 1
    assert isinstance(answers[1], RuntimeError) and "this pair breaks" in str(answers[1])
    for k in (0, 2, 3):
        result, timing = answers[k]
        assert timing.batch_pairs == 4
        assert result.added == pipe.diff(*images[k]).added


def test_the_viz_caption_wraps_inside_the_picture():
    from sdrun.apps.viz import text_width, wrap_text

    text = "added: " + " ".join(["motorcycle"] * 12) + " | removed: none | changed: a_very_long_label" * 3
    lines = wrap_text(text, 440)
    assert len(lines) > 1 and all(text_width(line) <= 440 for line in lines)
    assert " ".join(lines).split() == text.split()
