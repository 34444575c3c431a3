"""Memory-bounded model calls (`sdrun.backends.memory`): sizes, what the process can get,
the budget shared by threads, chunked calls; and answers that stay byte-identical whatever
the chunking, in `Pipeline.run`, `sdrun serve`, `sdrun run` and `sdrun tune`."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest
from conftest import run_without_torch

from sdrun.apps.synth import make_pair, pair_rng, write_synthetic_pairs
from sdrun.backends.memory import (
    FALLBACK_COSTS,
    BudgetedModel,
    GraphCost,
    MemoryBudget,
    MemoryBudgetError,
    available_memory,
    cgroup_headroom,
    mem_available,
    parse_size,
    run_in_chunks,
)
from sdrun.bundle.bundle import Bundle
from sdrun.pipeline import Pipeline

GiB, MiB = 2**30, 2**20


@pytest.mark.parametrize("text, want", [("6G", 6 * GiB), ("6gb", 6 * GiB), ("6GiB", 6 * GiB),
                                        ("512M", 512 * MiB), ("0.5g", GiB // 2), ("1024", 1024),
                                        (" 2 k ", 2048), ("1T", 2**40), (4096, 4096)])
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("bad", ["", "lots", "-1G", "0", "1X", "nan", "1e9", float("inf"), 0, -5])
def test_parse_size_refuses_what_is_not_a_size(bad):
    with pytest.raises(MemoryBudgetError, match="--memory-budget"):
        parse_size(bad)


def test_what_the_process_can_get(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{8 * GiB}\n")
    (v2 / "memory.current").write_text(f"{3 * GiB}\n")
    assert cgroup_headroom(v2) == 5 * GiB
    (v2 / "memory.max").write_text("max\n")  # no limit
    assert cgroup_headroom(v2) is None
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{4 * GiB}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{GiB}\n")
    assert cgroup_headroom(tmp_path / "v1") == 3 * GiB
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "unlimited"
    assert cgroup_headroom(tmp_path / "v1") is None
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\n")
    assert mem_available(info) == 20000000 * 1024
    assert mem_available(tmp_path / "nope") is None
    avail, where = available_memory("cpu")
    assert avail > 0 and where


def test_default_budget_is_a_share_of_what_is_available(monkeypatch):
    monkeypatch.delenv("SDRUN_MEMORY_BUDGET", raising=False)
    monkeypatch.setattr("sdrun.backends.memory.available_memory", lambda provider, device=0: (20 * GiB, "test"))
    assert MemoryBudget.resolve(None).total == 5 * GiB
    assert MemoryBudget.resolve(None, provider="cuda").total == 12 * GiB
    assert MemoryBudget.resolve("3G").total == 3 * GiB
    monkeypatch.setenv("SDRUN_MEMORY_BUDGET", "2G")
    assert MemoryBudget.resolve(None).total == 2 * GiB
    monkeypatch.setenv("SDRUN_MEMORY_BUDGET", "much")
    with pytest.raises(MemoryBudgetError, match="SDRUN_MEMORY_BUDGET"):
        MemoryBudget.resolve(None)


def test_graph_cost_from_the_manifest_or_the_table():
    measured = GraphCost.of("gdino", {"memory": {"fixed_bytes": 10, "per_input_bytes": 100}})
    assert (measured.fixed_bytes, measured.per_input_bytes, measured.source) == (10, 100, "measured")
    for entry in ({}, {"memory": {"fixed_bytes": -1, "per_input_bytes": 5}}, {"memory": "big"},
                  {"memory": {"fixed_bytes": 1, "per_input_bytes": 0}}):
        cost = GraphCost.of("gdino", entry)
        assert (cost.fixed_bytes, cost.per_input_bytes, cost.source) == (*FALLBACK_COSTS["gdino"], "fallback")
    budget = MemoryBudget(10 + 5 * 100)
    assert budget.max_batch(measured) == 5
    assert MemoryBudget(1).max_batch(measured) == 1  # never 0: one input at a time


class _Double:
    """A fake graph: y = 2x, z = x.sum(axis=1); records the batch of every call."""

    check_tolerance = None
    input_names = ["x"]
    output_names = ["y", "z"]

    def __init__(self, sleep: float = 0.0):
        self.batches, self.sleep = [], sleep

    def run(self, feeds):
        x = feeds["x"]
        self.batches.append(len(x))
        time.sleep(self.sleep)
        return {"y": 2 * x, "z": x.sum(axis=1)}


def test_chunked_call_equals_the_whole_call():
    x = np.random.default_rng(0).normal(size=(11, 3)).astype(np.float32)
    graph = _Double()
    whole = graph.run({"x": x})
    cost = GraphCost(fixed_bytes=100, per_input_bytes=1000, source="measured")
    model = BudgetedModel(graph, cost, MemoryBudget(100 + 4 * 1000))
    assert model.max_batch == 4 and model.input_names == ["x"]
    got = model.run({"x": x})
    assert graph.batches[1:] == [4, 4, 3] and model.calls == 3
    for k in whole:
        assert np.array_equal(got[k], whole[k])
    assert model.run({"x": x[:2]})["y"].shape == (2, 3) and graph.batches[-1] == 2


def test_a_graph_whose_outputs_are_not_batch_major_is_refused():
    def run_once(feeds):
        return {"total": np.asarray(feeds["x"].sum())}

    with pytest.raises(Exception, match="not batch-major"):
        run_in_chunks(run_once, {"x": np.ones((5, 2))}, ["x"], 2)


def test_threads_sharing_a_budget_never_exceed_it():
    cost = GraphCost(fixed_bytes=0, per_input_bytes=100, source="measured")
    budget = MemoryBudget(250)
    inside, most = [0], [0]
    lock = threading.Lock()

    class Counting(_Double):
        def run(self, feeds):
            with lock:
                inside[0] += len(feeds["x"])
                most[0] = max(most[0], inside[0])
            try:
                return super().run(feeds)
            finally:
                with lock:
                    inside[0] -= len(feeds["x"])

    model = BudgetedModel(Counting(sleep=0.01), cost, budget)
    threads = [threading.Thread(target=model.run, args=({"x": np.ones((5, 2))},)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert most[0] * 100 <= budget.total and budget.peak_reserved <= budget.total
    assert budget._used == 0


# ---- the pipeline, chunked and not ------------------------------------------------------------

@pytest.fixture(scope="module")
def synth_pairs():
    return [(f"p{i}", *make_pair(pair_rng(3, i), size=(224, 224))[:2]) for i in range(6)]


def test_the_build_records_each_graphs_memory(tiny_bundle):
    m = Bundle.load(tiny_bundle).manifest
    for model, graph in (("owlvit", "image"), ("gdino", "model"), ("siamese", "pair"), ("clip", "visual")):
        mem = m["models"][model]["graphs"][graph]["memory"]
        assert mem["per_input_bytes"] >= MiB and mem["fixed_bytes"] >= 0
        assert mem["measured"]["batches"][:2] == [1, 2] and mem["measured"]["arena"] == "shrink"
        for n, peak in zip(mem["measured"]["batches"], mem["measured"]["call_peak_bytes"]):
            assert mem["fixed_bytes"] + n * mem["per_input_bytes"] >= peak  # the line bounds each call
        assert GraphCost.of(model, m["models"][model]["graphs"][graph]).source == "measured"
    # Grounding DINO at 256x256 needs more per image than the tiny OWL-ViT at 128x128
    g = m["models"]["gdino"]["graphs"]["model"]["memory"]["per_input_bytes"]
    assert g > m["models"]["clip"]["graphs"]["visual"]["memory"]["per_input_bytes"]


def test_chunked_and_unchunked_pipelines_answer_the_same(tiny_bundle, synth_pairs, real_pairs):
    pairs = synth_pairs + real_pairs
    whole = Pipeline.load(tiny_bundle, params={"det_thr": 0.3}, memory_budget="64G")
    tight = Pipeline.load(tiny_bundle, params={"det_thr": 0.3}, memory_budget=1)
    assert tight.memory_budget.total == 1
    a = [json.dumps(r.to_json()) for r in whole.run(pairs, batch_pairs=4)]
    b = [json.dumps(r.to_json()) for r in tight.run(pairs, batch_pairs=4)]
    assert a == b
    assert sum(len(json.loads(r)["objects"]) for r in a) > 0  # something to match was found
    # every call of the tight pipeline took one input
    def graph(pipe, name):
        return pipe.models[name].graph
    assert graph(tight, "owlvit").max_batch == graph(tight, "gdino").max_batch == graph(tight, "clip").max_batch == 1
    assert graph(tight, "owlvit").calls == 4 * len(pairs) and graph(tight, "siamese").calls == len(pairs)
    assert graph(whole, "owlvit").calls == -(-len(pairs) // 4)


@pytest.fixture(scope="module")
def real_pairs():
    from conftest import REAL_PAIRS

    from sdrun.stages.images import load_image

    out = []
    for pid in ("31795", "35333"):
        a, b = REAL_PAIRS / f"{pid}_1.png", REAL_PAIRS / f"{pid}_2.png"
        if a.is_file() and b.is_file():
            out.append((pid, load_image(a), load_image(b)))
    return out


def test_serve_answers_the_same_chunked(tiny_bundle, synth_pairs):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    import cv2

    from sdrun.apps.serve import ServeConfig, create_app

    want = Pipeline.load(tiny_bundle, memory_budget="64G")
    tight = Pipeline.load(tiny_bundle, memory_budget=1).open_sessions()
    bodies = [{"image_a": ("a.png", cv2.imencode(".png", a[..., ::-1])[1].tobytes(), "image/png"),
               "image_b": ("b.png", cv2.imencode(".png", b[..., ::-1])[1].tobytes(), "image/png")}
              for _, a, b in synth_pairs]
    params = {"det_thr": 0.3}
    app = create_app(ServeConfig(str(tiny_bundle), max_batch_pairs=8, max_wait_ms=300), tight)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sdrun") as client:
            async with app.router.lifespan_context(app):
                await asyncio.wait_for(app.state.sdrun_ready.wait(), 60)  # loads in the background
                return await asyncio.gather(*(client.post("/v1/diff", files=f,
                                                          data={"params": json.dumps(params)})
                                              for f in bodies))

    answers = asyncio.run(main())
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    assert max(r.json()["timings"]["batch_pairs"] for r in answers) > 1  # batched across callers...
    for r, (_, a, b) in zip(answers, synth_pairs):  # ...and each model call one input
        expected = want.finish(want.model_outputs([(None, a, b)], embed="all")[0], params).to_json()
        got = r.json()
        assert {k: got[k] for k in expected if k != "img_id"} == \
            {k: expected[k] for k in expected if k != "img_id"}


def test_sdrun_run_and_tune_give_the_same_files_chunked(tiny_bundle, tmp_path):
    data = tmp_path / "pairs"
    write_synthetic_pairs(data, 8, seed=5)
    outs = {}
    for name, extra in (("whole", []), ("chunked", ["--memory-budget", "1"])):
        out = tmp_path / name
        out.mkdir()
        r = run_without_torch(["run", str(tiny_bundle), "--data", str(data), "--out", str(out / "sub.csv"),
                               "--batch-pairs", "4", "--param", "det_thr=0.3", "--quiet", *extra])
        assert r.returncode == 0, r.stderr
        r = run_without_torch(["tune", str(tiny_bundle), "--data", str(data), "--csv", str(data / "labels.csv"),
                               "--dry-run", "--quiet", "--cache", str(out / "cache"), "--json", str(out / "tune.json"),
                               "--batch-pairs", "4", *extra])
        assert r.returncode == 0, r.stderr
        outs[name] = [(out / f).read_bytes() for f in ("sub.csv", "sub.details.jsonl")]
        report = json.loads((out / "tune.json").read_text())
        report.pop("seconds", None)
        outs[name].append(json.dumps(report, sort_keys=True))
    assert outs["whole"] == outs["chunked"]


def test_a_bad_memory_budget_is_named(tiny_bundle, tmp_path):
    data = tmp_path / "pairs"
    write_synthetic_pairs(data, 1, seed=5)
    r = run_without_torch(["run", str(tiny_bundle), "--data", str(data), "--out", str(tmp_path / "s.csv"),
                           "--memory-budget", "lots"])
    assert r.returncode == 2 and "--memory-budget" in r.stderr and "'lots' is not a size" in r.stderr
    assert not (tmp_path / "s.csv").exists()


def test_serve_batches_one_pair_at_a_time_on_cpu_by_default():
    pytest.importorskip("fastapi")
    from sdrun.apps.serve import ServeConfig

    assert ServeConfig("b").batch_pairs == 1
    assert ServeConfig("b", provider="cuda").batch_pairs == ServeConfig("b", provider="tensorrt").batch_pairs == 8
    assert ServeConfig("b", max_batch_pairs=3).batch_pairs == 3
