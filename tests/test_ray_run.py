"""`sdrun run --engine ray`: the same files as a local run, with 1 and 2 actors, a failing
pair recorded, an interrupted run resumed; and `run_on_ray` for a Ray Dataset of pairs."""
from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ray = pytest.importorskip("ray")

from click.testing import CliRunner  # noqa: E402
from sdrun.apps.dataset import list_pairs  # noqa: E402
from sdrun.apps.ray_run import actor_cpus, init_ray, ray_executor, run_on_ray  # noqa: E402
from sdrun.apps.runner import run_dataset  # noqa: E402
from sdrun.apps.synth import write_synthetic_pairs  # noqa: E402
from sdrun.cli import main  # noqa: E402
from sdrun.pipeline import Pipeline  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
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
