"""Issue 5: `sdrun tune`: the numpy sweep equals Pipeline.finish, the gates, the split, and
the command end to end (torch blocked) writing parameters that `sdrun run` then uses."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from conftest import run_without_torch
from test_score import fast_bundle, filled, labelled_pairs, shared_cache

from sdrun.apps.tune import (
    ALWAYS,
    DEFAULT_GRID,
    SWEPT,
    TuneError,
    choose,
    finish_score,
    gate_candidates,
    load_grid,
    split_ids,
    sweep,
)
from sdrun.bundle.bundle import Bundle
from sdrun.pipeline import Pipeline


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_bundle):
    return filled(tmp_path_factory, tiny_bundle)


def test_sweep_equals_finish_for_every_configuration(cached):
    """The sweep's per-row F1 of every column equals Pipeline.finish's, config by config."""
    pipe, lab, fill = cached
    grid = {**DEFAULT_GRID, "det_thr": [0.2, 0.3], "iou_thr": [0.4, 0.6], "alpha": [0.3, 0.7],
            "heat_lambda": [0.5, 1.2], "heat_th": [0.4, 0.6]}
    sw = sweep(pipe, fill.outputs, lab.truth, grid)
    assert len(sw.configs) == 32 and sw.f1.shape == (32, 3, len(fill.outputs))
    ids = list(fill.outputs)
    for c, cfg in enumerate(sw.configs):
        s = finish_score(pipe, fill.outputs, lab.truth, ids, cfg)
        assert np.array_equal(np.array(s.per_row).T, sw.f1[c]), cfg
    assert len({sw.f1[c].tobytes() for c in range(32)}) > 4  # the parameters matter here


def test_gates_and_choice(cached):
    pipe, lab, fill = cached
    grid = {**DEFAULT_GRID, **{k: [pipe.params[k]] for k in SWEPT}}  # one configuration: the gates only
    sw = sweep(pipe, fill.outputs, lab.truth, grid)
    ids = list(fill.outputs)
    train, val = ids[:6], ids[6:]
    best = choose(sw, train, val, grid, pipe.params)[0]
    exact = finish_score(pipe, fill.outputs, lab.truth, train, best.params())
    assert exact.mean == pytest.approx(best.train, abs=1e-12)
    assert [exact.row_f1[c] for c in exact.row_f1] == pytest.approx(best.train_cols, abs=1e-12)
    assert best.val == pytest.approx(finish_score(pipe, fill.outputs, lab.truth, val, best.params()).mean)
    assert best.train >= best.train_nogate  # "off" is always a candidate
    # no gates at all: the configuration's own score
    off = choose(sw, train, val, {**grid, "gate_signals": []}, pipe.params)[0]
    assert off.n_gates == 0 and off.train == pytest.approx(off.train_nogate)
    c = gate_candidates(np.array([0.3, 0.1, 0.2, 0.2]), [0.0, 0.5])
    assert c[0] == -np.inf and c[-1] == ALWAYS and list(c[1:-1]) == [0.2]


def test_split_is_deterministic_and_disjoint():
    ids = [str(i) for i in range(100)]
    tr, va = split_ids(ids, 0.2, 0)
    assert len(va) == 20 and not set(tr) & set(va) and set(tr) | set(va) == set(ids)
    assert split_ids(list(reversed(ids)), 0.2, 0)[1] == list(reversed(va))  # order-free
    assert split_ids(ids, 0.2, 1)[1] != va
    assert split_ids(ids, 0.0, 0) == (ids, [])
    assert len(split_ids(["a", "b"], 0.1, 0)[1]) == 1
    with pytest.raises(TuneError):
        split_ids(ids, 1.0, 0)


def test_grid_file(tmp_path):
    g = tmp_path / "g.json"
    g.write_text(json.dumps({"det_thr": [0.2], "gate_signals": []}))
    grid = load_grid(g)
    assert grid["det_thr"] == [0.2] and grid["gate_signals"] == [] and grid["alpha"] == [0.3, 0.5, 0.7]
    g.write_text(json.dumps({"det_thresh": [0.2]}))
    with pytest.raises(TuneError, match="det_thresh"):
        load_grid(g)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_tune_end_to_end_without_torch(cached, tmp_path_factory, tiny_bundle, tmp_path):
    """tune (torch blocked) writes the winner into params.json with a sha256 that
    Bundle.load verifies; `sdrun run` then gives exactly the cached answer under the
    winner; a second tune finds nothing better and writes nothing."""
    pipe, lab, fill = cached
    bundle = tmp_path / "bundle"
    shutil.copytree(fast_bundle(tmp_path_factory, tiny_bundle), bundle)
    before = Bundle.load(bundle).params
    data = labelled_pairs(tmp_path_factory)
    argv = ["tune", str(bundle), "--data", str(data), "--csv", str(data / "labels.csv"), "--val-frac", "0.25",
            "--cache", str(shared_cache(tmp_path_factory)), "--json", str(tmp_path / "t.json"), "--quiet"]
    res = run_without_torch(argv + ["--force"])
    assert res.returncode == 0, res.stderr
    out = json.loads((tmp_path / "t.json").read_text())
    assert "243 configurations" in res.stdout and "sweep" in res.stdout
    assert "every pair read from the cache" in res.stdout
    assert len(out["configurations"]) == 243
    print(res.stdout)
    assert out["best"]["train"] > out["current"]["train"]  # gates alone beat these random models
    assert out["written"], out["verdict"]
    after = Bundle.load(bundle).params  # verifies the sha256
    assert after == {**before, **out["best"]["params"]}
    assert json.loads((bundle / "params.json.bak").read_text()) == before

    # sdrun run uses the written parameters: its answers are finish(cached, winner)
    sub, ids = tmp_path / "sub.csv", list(fill.outputs)[:3]
    (tmp_path / "ids.csv").write_text("img_id\n" + "\n".join(ids) + "\n")
    res = run_without_torch(["run", str(bundle), "--data", str(data), "--csv", str(tmp_path / "ids.csv"),
                             "--out", str(sub), "--quiet"])
    assert res.returncode == 0, res.stderr
    tuned = Pipeline.load(bundle)
    want = [["img_id", "added_objs", "removed_objs", "changed_objs"]]
    for pid in ids:
        o = fill.outputs[pid]
        r = tuned.finish(o)
        want.append([pid, *(" ".join(getattr(r, c)) or "none" for c in ("added", "removed", "changed"))])
    assert _rows(sub) == want
    untuned = [pipe.finish(fill.outputs[pid]) for pid in ids]
    assert want[1:] != [[r.pair_id, *(" ".join(getattr(r, c)) or "none" for c in ("added", "removed", "changed"))]
                        for r in untuned]

    # again (in this process): the written parameters are already the best there is ->
    # it says so, and writes nothing
    from click.testing import CliRunner

    from sdrun.cli import main

    manifest = (bundle / "manifest.json").read_bytes()
    res = CliRunner().invoke(main, argv)
    assert res.exit_code == 0, res.output
    assert "cannot improve" in res.output and "nothing written" in res.output
    assert (bundle / "manifest.json").read_bytes() == manifest
