"""`sdrun run --engine ray`: the same files as a local run, with 1 and 2 actors, a failing
pair recorded, an interrupted run resumed; and `run_on_ray` for a Ray Dataset of pairs.
Hostile use: an --address that is not there fails within a bound, naming it; ray:// without
Ray Client says `pip install 'ray[client]'`; --actors beyond the cluster are capped or refused;
actors that cannot start time out."""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from click.testing import CliRunner

from sdrun.apps.dataset import PairSource, list_pairs
from sdrun.apps.ray_run import (
    ACTOR_OVERHEAD_BYTES,
    PairBatchActor,
    Pool,
    RayConnectError,
    RayError,
    _started_or_fail,
    actor_cpus,
    actor_memory,
    actors_that_fit,
    bound_actor_start,
    check_reachable,
    init_ray,
    parse_address,
    ray_executor,
    run_on_ray,
)
from sdrun.apps.runner import run_dataset
from sdrun.apps.synth import write_synthetic_pairs
from sdrun.cli import main
from sdrun.pipeline import Pipeline

try:
    import ray
except ImportError:
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="the ray extra is not installed")
GiB = 2**30


@pytest.fixture(scope="module")
def cluster():
    if ray is None:
        pytest.skip("the ray extra is not installed")
    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("ray-pairs")
    write_synthetic_pairs(out, 13, seed=8)
    (out / "data" / "10012_2.png").write_bytes(b"")  # a broken pair: recorded, never fatal
    return out


@pytest.fixture(scope="module")
def local(tiny_bundle, data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("local")
    res = CliRunner().invoke(main, ["run", str(tiny_bundle), "--data", str(data), "--out", str(folder / "s.csv"),
                                    "--batch-pairs", "3", "--quiet"])
    assert res.exit_code == 1 and "10012_2.png" in res.output  # the broken pair
    return folder


def test_actor_cpus_leave_one_for_the_readers():
    assert actor_cpus(2, 2, 1) == 0.5 and actor_cpus(2, 1, 1) == 1 and actor_cpus(16, 3, 4) == 4


@pytest.mark.parametrize("actors", [1, 2])
def test_ray_gives_the_files_of_a_local_run(actors, cluster, tiny_bundle, data, local, tmp_path):
    res = CliRunner().invoke(main, ["run", str(tiny_bundle), "--data", str(data), "--out", str(tmp_path / "s.csv"),
                                    "--batch-pairs", "3", "--quiet", "--engine", "ray",
                                    "--actors", str(actors)])
    assert res.exit_code == 1, res.output  # the broken pair, as locally
    assert "10012_2.png" in res.output
    for name in ("s.csv", "s.details.jsonl"):
        assert (tmp_path / name).read_bytes() == (local / name).read_bytes(), name


def test_an_interrupted_run_resumes_on_ray(cluster, tiny_bundle, data, local, tmp_path):
    pipe = Pipeline.load(tiny_bundle)
    pairs = list_pairs(data)
    out, details = tmp_path / "s.csv", tmp_path / "d.jsonl"
    run_dataset(pipe.open_sessions(), pairs, out, details, batch_pairs=3, progress=False, warn=lambda m: None)
    lines = details.read_bytes().splitlines(keepends=True)
    details.write_bytes(b"".join(lines[:5]) + lines[5][:20])  # as if killed in batch 2, mid-write
    out.unlink()
    seen = []
    execute = ray_executor(tiny_bundle, pipe.params, actors=1, warn=seen.append)

    def counting(todo):
        seen.append([start for start, _ in todo])
        yield from execute(todo)

    summary = run_dataset(pipe, pairs, out, details, batch_pairs=3, resume=True, progress=False,
                          warn=lambda m: None, execute=counting)
    # 5 whole lines kept (batch 1 and two pairs of batch 2): batch 2 is rerun whole, then 3 and 4
    assert summary.done_before == 5 and seen[-1] == [3, 6, 9, 12]
    assert out.read_bytes() == (local / "s.csv").read_bytes()
    assert details.read_bytes() == (local / "s.details.jsonl").read_bytes()


def test_run_on_ray_for_a_dataset_of_pairs(cluster, tiny_bundle, data):
    pipe = Pipeline.load(tiny_bundle).open_sessions()
    rows = [{"pair_id": str(i), "a": str(data / "data" / f"{i}_1.png"), "b": str(data / "data" / f"{i}_2.png")}
            for i in (10000, 10001, 10012)]
    got = {r["pair_id"]: json.loads(r["result"]) for r in
           run_on_ray(ray.data.from_items(rows), tiny_bundle, actors=1).iter_rows()}
    for r in rows[:2]:
        want = pipe.diff(r["a"], r["b"], r["pair_id"]).to_json()
        assert got[r["pair_id"]]["added"] == want["added"] and got[r["pair_id"]]["removed"] == want["removed"]
    assert "10012_2.png" in got["10012"]["error"]


# ---- hostile use: addresses that are not a cluster ------------------------------------------
def test_addresses_are_parsed_or_refused():
    assert parse_address(None) == ("local", None, None) == parse_address("local")
    assert parse_address("auto") == ("auto", None, None)
    assert parse_address("10.0.0.5:6379") == ("gcs", "10.0.0.5", 6379)
    assert parse_address("ray://head") == ("client", "head", 10001)
    assert parse_address("ray://[::1]:10002/") == ("client", "::1", 10002)
    for bad in ("head", "http://head:6379", "head:http", "head:0", ":6379", "ray://head:99999"):
        with pytest.raises(RayConnectError, match="not a Ray address"):
            parse_address(bad)


@pytest.fixture
def not_joined(monkeypatch):
    """init_ray as in a fresh process: no cluster joined yet, no RAY_ADDRESS. (Every
    failing check raises before ray.init, so the test's own local cluster is never touched.)"""
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_ray
def test_a_closed_port_fails_at_once_naming_the_address(not_joined):
    address = f"127.0.0.1:{closed_port()}"
    t = time.monotonic()
    with pytest.raises(RayConnectError) as e:
        init_ray(address)
    assert time.monotonic() - t < 5  # ray.init alone retries it for minutes
    assert f"at {address}:" in str(e.value) and "refused" in str(e.value)
    assert "ray status" in str(e.value) and "GCS port" in str(e.value)


def test_a_host_that_never_answers_fails_within_the_bound(monkeypatch):
    released = threading.Event()

    def silent(address, timeout=None):  # a firewall that drops the packets (10.255.255.1:6379)
        released.wait(timeout)
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", silent)
    t = time.monotonic()
    try:
        with pytest.raises(RayConnectError, match=r"at 10\.255\.255\.1:6379: 10\.255\.255\.1:6379 did not "
                                                  r"answer within 1 s; check that the cluster is up"):
            check_reachable("10.255.255.1:6379", "gcs", "10.255.255.1", 6379, timeout_s=1)
    finally:
        released.set()
    assert time.monotonic() - t < 3


@needs_ray
def test_a_port_that_is_no_ray_cluster_fails_within_the_bound(not_joined):
    with socket.socket() as listener:  # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        t = time.monotonic()
        with pytest.raises(RayConnectError, match="no Ray GCS answered within") as e:
            init_ray(address, timeout_s=3)
        assert time.monotonic() - t < 8
    assert address in str(e.value)


@needs_ray
def test_ray_client_without_its_extra_says_what_to_install(not_joined, monkeypatch):
    monkeypatch.setitem(sys.modules, "grpc", None)  # as if `pip install ray` left Ray Client out
    t = time.monotonic()
    with pytest.raises(RayError, match=r"pip install 'ray\[client\]'") as e:
        init_ray(f"ray://127.0.0.1:{closed_port()}")
    assert time.monotonic() - t < 5 and "ray://127.0.0.1:" in str(e.value)


# ---- hostile use: more actors than the cluster holds ----------------------------------------
@pytest.mark.parametrize("args, want_n, said", [
    ((2, 1, 2), 2, ""),  # fits: 2 actors x 1 CPU on 2 CPUs
    ((8, 1, 2), 2, "capped to 2: the Ray cluster has 2 CPU(s)"),
    ((3, 0.1, 0.3), 3, ""),  # 0.3 / 0.1 is 2.9999...: still 3
    ((2, 4, 2), 1, "capped to 1"),  # the first actor always gets CPUs (fewer than it asked)
    ((1, 4, 2), 1, ""),
    ((8, 1, 16, 2 * GiB, 5 * GiB), 2, "capped to 2: the Ray cluster has 5.0 GiB of memory free"),
    ((8, 1, 4, 1 * GiB, 64 * GiB), 4, "4 CPU(s)"),  # the tighter of CPUs and memory
    ((2, 1, 16, 8 * GiB, 3 * GiB), 0, "not even one actor fits the Ray cluster: it has 3.0 GiB"),
    ((2, 1, 16, 8 * GiB, None), 2, ""),  # memory unknown: not counted
    ((1, 1, 16, None, None, 1.0, 0.0), 0, "0 GPU(s), 1 per actor"),
    ((4, 1, 16, None, None, 0.5, 1.0), 2, "capped to 2: the Ray cluster has 1 GPU(s)"),
])
def test_actors_that_fit(args, want_n, said):
    n, message = actors_that_fit(*args)
    assert n == want_n
    assert (said in message) if said else message == ""
    assert n == 0 or message == "" or message.startswith("warning:")


def test_an_actor_needs_the_bundle_s_graphs_and_its_working_memory(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    files = sum((tiny_bundle / manifest["models"][m]["graphs"][g]["file"]).stat().st_size
                for m, g in (("owlvit", "image"), ("gdino", "model"), ("siamese", "pair"), ("clip", "visual")))
    need = actor_memory(tiny_bundle)
    assert ACTOR_OVERHEAD_BYTES + files < need < ACTOR_OVERHEAD_BYTES + files + 2 * GiB
    assert actor_memory(tiny_bundle, "40G") == ACTOR_OVERHEAD_BYTES + files + 40 * GiB  # a budget larger than any call


def test_too_many_actors_are_capped_with_a_warning(cluster, tiny_bundle, data, local, tmp_path):
    res = CliRunner().invoke(main, ["run", str(tiny_bundle), "--data", str(data), "--out", str(tmp_path / "s.csv"),
                                    "--batch-pairs", "3", "--quiet", "--engine", "ray", "--actors", "8"])
    assert res.exit_code == 1, res.output  # the broken pair, as locally
    assert "--actors 8 capped to 2: the Ray cluster has 2 CPU(s)" in res.output
    for name in ("s.csv", "s.details.jsonl"):
        assert (tmp_path / name).read_bytes() == (local / name).read_bytes(), name


def test_actors_that_do_not_fit_the_memory_are_refused(cluster, tiny_bundle, data):
    execute = ray_executor(tiny_bundle, {}, actors=2, memory_budget=2**50, warn=pytest.fail)
    t = time.monotonic()
    with pytest.raises(RayError, match="not even one actor fits the Ray cluster"):
        next(execute([(0, [PairSource("10000", data / "data" / "10000_1.png", data / "data" / "10000_2.png")])]))
    assert time.monotonic() - t < 10  # before any actor starts


def test_actors_that_cannot_start_time_out(cluster):
    ds = bound_actor_start(ray.data.from_items([{"start": 0, "batch": "[]"}]), 2).map_batches(
        PairBatchActor, batch_size=1, fn_constructor_kwargs={"bundle": "-", "provider": "cpu", "threads": 1,
                                                             "params": {}},
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5, num_gpus=1)  # the cluster has no GPU
    t = time.monotonic()
    with pytest.raises(RayError, match="did not start within 2 s"):
        list(_started_or_fail(ray, ds.iter_rows(), Pool(1, 0.5, 1.0, None, 1), 2))
    assert time.monotonic() - t < 30
