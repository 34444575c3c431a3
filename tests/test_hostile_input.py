"""The second sweep of hostile input (issue "Bad input, tried 195 more ways"), one section per
class of mistake, each fixed at one place:

1. an id from a CSV is a name, never a path (`sdrun.files.pair_id_problem`, `id_file_stem`);
2. nothing a user gives is overwritten or deleted (`check_output_paths`,
   `check_output_folder`, `replace_folder`);
3. every source of parameters goes through one check (`sdrun.bundle.params.resolve`);
6. messages that name the file and what is wrong.

The service's limits (class 4) are in test_serve_limits.py, Ray (5) in test_ray_run.py,
training (6) in test_train_change_input.py.
"""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from click.testing import CliRunner
from conftest import sdrun, snapshot

from sdrun.apps.synth import write_synthetic_pairs
from sdrun.bundle.bundle import Bundle, bundle_files, write_params
from sdrun.bundle.params import ParamError
from sdrun.files import (
    OutputPathError,
    check_output_folder,
    id_file_stem,
    pair_id_problem,
    replace_folder,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile-pairs")
    write_synthetic_pairs(out, 4, seed=6)
    return out


def text(res) -> str:
    return " ".join((res.output or "").split())


# ---- 1. ids are names ----------------------------------------------------------------------
@pytest.mark.parametrize("bad_id", ["../outside/p", "/tmp/abs", "..\\outside\\p", "a\tb", "x/../10000"])
def test_an_id_that_is_a_path_is_never_read_or_written(bad_id, tiny_bundle, data, tmp_path):
    root = tmp_path / "root"
    (root / "pairs").mkdir(parents=True)
    shutil.copytree(data / "data", root / "pairs" / "data")
    (root / "outside").mkdir()  # what the id points at, beside the data folder
    for k in (1, 2):
        shutil.copy(data / "data" / f"10000_{k}.png", root / "outside" / f"p_{k}.png")
    ids = root / "ids.csv"
    ids.write_text(f"img_id\n10001\n\"{bad_id}\"\n")
    before = snapshot(root)
    res = sdrun("run", tiny_bundle, "--data", root / "pairs", "--csv", ids, "--quiet",
                "--out", tmp_path / "o" / "s.csv", "--viz", tmp_path / "o" / "pics")
    assert res.exit_code == 1, res.output
    assert "ids are file names, not paths" in text(res)
    assert snapshot(root) == before  # nothing new beside or inside the data
    assert sorted(p.name for p in (tmp_path / "o" / "pics").iterdir()) == ["10001.png"]
    rows = (tmp_path / "o" / "s.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[2].endswith("none,none,none")  # the pair is there, as none


def test_ids_become_plain_distinct_file_names():
    names = ["10000", "a/b", "a_b", "a\\b", "..", ".", ".hidden", "x y", "é", "a" * 300]
    stems = [id_file_stem(n) for n in names]
    assert stems[0] == "10000" and stems[2] == "a_b"
    assert len(set(stems)) == len(stems)
    for s in stems:
        assert "/" not in s and "\\" not in s and not s.startswith(".") and len(s) <= 80
    assert pair_id_problem("10000") is None and pair_id_problem("x y") is None
    assert pair_id_problem("") and pair_id_problem("a/b") and pair_id_problem("a\x00b")
    assert pair_id_problem("a" * 201)


def test_eval_leaves_out_rows_whose_id_is_a_path(tiny_bundle, data, tmp_path):
    labels = tmp_path / "labels.csv"
    rows = (data / "labels.csv").read_text().splitlines()
    labels.write_text("\n".join(rows + ["../../etc/passwd,none,none,none"]) + "\n")
    res = sdrun("eval", tiny_bundle, "--data", data, "--csv", labels, "--out", tmp_path / "report",
                "--cache", tmp_path / "cache", "--quiet")
    assert res.exit_code == 0, res.output  # the row is left out, with a warning
    assert "../../etc/passwd" in res.output and "left out" in res.output
    assert "ids are file names, not paths" in text(res)
    assert (tmp_path / "report" / "report.md").is_file()
    assert all(p.resolve().is_relative_to(tmp_path) for p in tmp_path.rglob("*"))


# ---- 2. nothing given is overwritten ---------------------------------------------------------
def test_tune_json_never_replaces_an_input_or_the_bundle(tiny_bundle, data, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    labels = tmp_path / "labels.csv"
    shutil.copy(data / "labels.csv", labels)
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"det_thr": [0.2]}))
    before = snapshot(bundle, labels, grid, data)
    base = ["tune", bundle, "--data", data, "--csv", labels, "--cache", tmp_path / "cache", "--quiet",
            "--dry-run", "--grid", grid]
    for target, names in ((labels, ["--json", "the --csv file"]), (grid, ["the --grid file"]),
                          (bundle / "manifest.json", ["lies inside the bundle"]),
                          (data / "data" / "10000_1.png", ["pair 10000's image 1"])):
        res = sdrun(*base, "--json", target)
        assert res.exit_code == 2, res.output
        for n in names:
            assert n in text(res), (n, res.output)
    assert snapshot(bundle, labels, grid, data) == before
    Bundle.load(bundle)
    res = sdrun(*base, "--json", tmp_path / "new" / "folder" / "tune.json")  # folders made
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "new" / "folder" / "tune.json").read_text())["written"] is False


def test_an_output_folder_holding_other_files_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="notes.txt"):
        check_output_folder(out, "--out")
    with pytest.raises(OutputPathError, match="--vocab"):
        check_output_folder(tmp_path / "new", "--out", inputs=[("--vocab", tmp_path / "new" / "v.csv")])
    with pytest.raises(OutputPathError, match="is a file"):
        check_output_folder(out / "notes.txt", "--out")
    check_output_folder(out, "--out", owned=lambda f: {"notes.txt"})  # an earlier run's own file


def test_a_rebuilt_bundle_may_replace_only_its_own_files(tiny_bundle, tmp_path):
    old = tmp_path / "b"
    shutil.copytree(tiny_bundle, old)
    write_params(old, {**Bundle.load(old).params, "det_thr": 0.3})  # tune leaves params.json.bak
    check_output_folder(old, "--out", owned=bundle_files)
    new = tmp_path / "new"
    new.mkdir()
    (new / "x").write_text("new bundle")
    replace_folder(new, old, owned=bundle_files)
    assert [p.name for p in old.iterdir()] == ["x"] and not new.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # nothing left aside
    (old / "manifest.json").write_text(json.dumps({"files": {"x": {}}}))
    (old / "user.ckpt").write_text("weights")
    with pytest.raises(OutputPathError, match="user.ckpt"):
        check_output_folder(old, "--out", owned=bundle_files)


@pytest.mark.parametrize("case", ["vocab_inside", "ckpt_inside", "other_files"])
def test_sdexport_build_never_deletes_what_it_did_not_write(case, tiny_bundle, tmp_path):
    pytest.importorskip("torch")
    from sdexport.cli import main as sdexport

    out = tmp_path / "B"
    shutil.copytree(tiny_bundle, out)
    args = ["build", "--preset", "tiny-random", "--out", str(out), "--no-check"]
    if case == "vocab_inside":
        (out / "vocab.csv").write_text("img_id,added_objs,removed_objs,changed_objs\n1,car,none,none\n")
        args += ["--vocab", str(out / "vocab.csv")]
        expect = "vocab.csv"
    elif case == "ckpt_inside":
        (out / "change.pt").write_bytes(b"weights")
        args += ["--siamese-ckpt", str(out / "change.pt")]
        expect = "change.pt"
    else:
        (out / "notes").mkdir()
        (out / "notes" / "todo.md").write_text("mine")
        expect = "notes/todo.md"
    before = snapshot(out)
    res = CliRunner().invoke(sdexport, args, catch_exceptions=False)
    assert res.exit_code == 2, res.output
    assert expect in res.output and "Traceback" not in res.output
    assert snapshot(out) == before
    assert not list(tmp_path.glob(".B.*"))  # no staging folder left


def test_synth_never_replaces_a_labels_file_it_did_not_write(tmp_path):
    (tmp_path / "labels.csv").write_text("img_id,added_objs,removed_objs,changed_objs\n1,car,none,none\n")
    res = sdrun("synth", "--out", tmp_path, "--pairs", "2")
    assert res.exit_code == 2 and "labels.csv" in res.output
    assert "1,car" in (tmp_path / "labels.csv").read_text()


def test_outputs_into_folders_that_do_not_exist_are_made(tiny_bundle, data, tmp_path):
    out = tmp_path / "a" / "b" / "s.csv"
    res = sdrun("run", tiny_bundle, "--data", data, "--out", out, "--quiet")
    assert res.exit_code == 0, res.output
    assert out.is_file() and out.with_suffix(".details.jsonl").is_file()


# ---- 3. one check for every source of parameters --------------------------------------------
@pytest.mark.parametrize("threads", ["0", "-1", "two"])
def test_threads_below_one_are_refused(threads, tiny_bundle, data, tmp_path):
    res = sdrun("run", tiny_bundle, "--data", data, "--out", tmp_path / "s.csv", "--threads", threads)
    assert res.exit_code == 2 and "--threads" in res.output


def test_pipeline_threads_are_checked(tiny_bundle):
    from sdrun.errors import SpotdiffError
    from sdrun.pipeline import Pipeline

    with pytest.raises(SpotdiffError, match="threads=0"):
        Pipeline.load(tiny_bundle, threads=0)


def test_class_heads_settings_on_a_bundle_without_heads_are_refused(tiny_bundle, data, tmp_path):
    res = sdrun("run", tiny_bundle, "--data", data, "--out", tmp_path / "s.csv", "--param", "class_mode=heads")
    assert res.exit_code == 2 and "no per-class change heads" in res.output
    res = sdrun("run", tiny_bundle, "--data", data, "--out", tmp_path / "s.csv", "--param", "class_thr_added=0.5")
    assert res.exit_code == 2 and "class_thr_added" in res.output
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    with pytest.raises(ParamError, match="no per-class change heads"):
        write_params(bundle, {**Bundle.load(bundle).params, "class_mode": "heads"})
    Bundle.load(bundle)  # unchanged, still loads


def test_per_call_params_get_the_combination_check(tiny_bundle):
    from sdrun.apps.batcher import request_params
    from sdrun.pipeline import Pipeline

    pipe = Pipeline.load(tiny_bundle)
    with pytest.raises(ParamError, match="keeps no box"):
        request_params({"det_thr": 50, "heat_lambda": 0}, pipe)
    with pytest.raises(ParamError, match="keeps no box"):
        pipe.resolve_params({"det_thr": 3, "heat_lambda": 1})
    assert request_params({"det_thr": 0.5}, pipe) == {"det_thr": 0.5}


def test_tune_never_writes_parameters_the_bundle_would_refuse(tiny_bundle, data, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    grid = tmp_path / "grid.json"
    base = ["tune", bundle, "--data", data, "--csv", data / "labels.csv", "--cache", tmp_path / "c",
            "--quiet", "--force", "--val-frac", "0", "--grid", grid]
    grid.write_text(json.dumps({"det_thr": [5.0], "heat_lambda": [0.0], "gate_signals": []}))
    res = sdrun(*base)
    assert res.exit_code == 2 and "no combination of the grid is usable" in res.output
    grid.write_text(json.dumps({"det_thr": [5.0, 0.9], "heat_lambda": [0.0], "iou_thr": [0.5],
                                "alpha": [0.5], "heat_th": [0.5], "gate_signals": []}))
    res = sdrun(*base)
    assert res.exit_code == 0, res.output
    assert "1 configurations" in res.output
    assert Bundle.load(bundle).params["det_thr"] in (0.9, 0.25)  # loads; never 5 with lambda 0


def test_a_params_file_no_box_can_pass_is_refused_at_load(tiny_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    p = bundle / "params.json"
    params = json.loads(p.read_text())
    p.write_text(json.dumps({**params, "det_thr": 5.0, "heat_lambda": 0.0}))
    m = json.loads((bundle / "manifest.json").read_text())
    m["files"]["params.json"].update(sha256=hashlib.sha256(p.read_bytes()).hexdigest(), bytes=p.stat().st_size)
    (bundle / "manifest.json").write_text(json.dumps(m))
    res = sdrun("info", bundle)
    assert res.exit_code == 2 and str(p) in res.output and "keeps no box" in res.output


# ---- 6. messages ---------------------------------------------------------------------------
def test_a_header_only_csv_is_named(tiny_bundle, data, tmp_path):
    ids = tmp_path / "ids.csv"
    ids.write_text("img_id\n")
    res = sdrun("run", tiny_bundle, "--data", data, "--csv", ids, "--out", tmp_path / "s.csv")
    assert res.exit_code == 2 and f"{ids}: no ids" in res.output


def test_run_refuses_an_image_over_max_pixels_and_goes_on(tiny_bundle, data, tmp_path):
    import cv2
    import numpy as np

    pairs = tmp_path / "pairs"
    shutil.copytree(data, pairs)
    big = pairs / "data" / "10001_1.png"
    ok, png = cv2.imencode(".png", np.zeros((3000, 4000, 3), np.uint8))  # 12 megapixels, ~40 KB
    big.write_bytes(png.tobytes())
    res = sdrun("run", tiny_bundle, "--data", pairs, "--out", tmp_path / "s.csv", "--quiet",
                "--max-pixels", "10M")
    assert res.exit_code == 1, res.output
    assert "4000x3000" in res.output and str(big) in res.output
    assert len((tmp_path / "s.csv").read_text().splitlines()) == 5  # every pair has its row
    res = sdrun("diff", tiny_bundle, big, pairs / "data" / "10001_2.png", "--max-pixels", "10M")
    assert res.exit_code == 2 and "--max-pixels" in res.output
    res = sdrun("run", tiny_bundle, "--data", pairs, "--out", tmp_path / "t.csv", "--quiet",
                "--max-pixels", "lots")
    assert res.exit_code == 2 and "--max-pixels" in res.output


def test_a_cache_inside_the_bundle_is_refused(tiny_bundle, data, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    before = snapshot(bundle)
    res = sdrun("tune", bundle, "--data", data, "--csv", data / "labels.csv", "--cache", bundle / "c",
                "--quiet", "--dry-run")
    assert res.exit_code == 2 and "--cache" in res.output and "the bundle" in res.output
    assert snapshot(bundle) == before
