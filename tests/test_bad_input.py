"""Bad or unusual input, as a demanding user gives it: every case exits with a clear code,
names the thing that is wrong, and changes no input and no earlier output.

Cases 1-5 are the ones the input sweep found (issue "Bad input, tried 113 ways"):
1 an output path that is an input, 2 resuming what another run wrote, 3 parameters,
4 how the metric reads label cells, 5 files that are not what they claim to be.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import run_without_torch, sdrun, snapshot

from sdrun.apps.synth import write_synthetic_pairs
from sdrun.bundle.params import ParamError, parse_overrides, validate
from sdrun.files import atomic_write


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    write_synthetic_pairs(out, 6, seed=5)
    return out


@pytest.fixture(scope="module")
def earlier(tiny_bundle, data, tmp_path_factory):
    """A finished run: its submission and details, to prove later mistakes leave them be."""
    folder = tmp_path_factory.mktemp("earlier")
    res = sdrun("run", tiny_bundle, "--data", data, "--out", folder / "s.csv", "--batch-pairs", "2")
    assert res.exit_code == 0, res.output
    return folder


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_listed_file(bundle: Path, rel: str, data: bytes) -> None:
    """Replace a bundle file and record its new digest (a bundle edited on purpose)."""
    (bundle / rel).write_bytes(data)
    m = json.loads((bundle / "manifest.json").read_text())
    m["files"][rel].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2))


def message(res) -> str:
    return " ".join((res.output or "").split())  # click wraps nothing, but be safe


# ---- 1. nothing the user gave is overwritten --------------------------------------
@pytest.mark.parametrize("case", ["out_is_input_image", "details_is_out", "details_is_csv",
                                  "out_in_bundle", "viz_picture_is_input", "diff_viz_is_image"])
def test_output_that_is_an_input_is_refused(case, tiny_bundle, data, earlier, tmp_path):
    img = data / "data" / "10000_1.png"
    ids = tmp_path / "ids.csv"
    ids.write_text("img_id\n10000\n10001\n")
    if case == "viz_picture_is_input":  # pair "p_1" draws p_1.png, which is pair "p"'s image 1
        folder = tmp_path / "named"
        folder.mkdir()
        for name in ("p_1.png", "p_2.png", "p_1_1.png", "p_1_2.png"):
            shutil.copy(img, folder / name)
    before = snapshot(data, tiny_bundle, earlier, tmp_path)
    base = ["run", tiny_bundle, "--data", data, "--quiet"]
    args, names = {
        "out_is_input_image": (base + ["--out", img], ["--out", str(img)]),
        "details_is_out": (base + ["--out", earlier / "s.csv", "--details", earlier / "s.csv"],
                           ["--details", "--out", str(earlier / "s.csv")]),
        "details_is_csv": (base + ["--csv", ids, "--out", tmp_path / "o.csv", "--details", ids],
                           ["--details", "--csv", str(ids)]),
        "out_in_bundle": (base + ["--out", tiny_bundle / "sub.csv"], ["--out", "the bundle", str(tiny_bundle)]),
        "viz_picture_is_input": (["run", tiny_bundle, "--data", tmp_path / "named", "--quiet",
                                  "--out", tmp_path / "o.csv", "--viz", tmp_path / "named"],
                                 ["--viz", "p_1.png", "pair p"]),
        "diff_viz_is_image": (["diff", tiny_bundle, img, data / "data" / "10000_2.png", "--viz", img],
                              ["--viz", "IMAGE_A", str(img)]),
    }[case]
    res = sdrun(*args)
    assert res.exit_code == 2, res.output
    for name in names:
        assert name in message(res), (name, res.output)
    assert "Traceback" not in res.output
    assert snapshot(data, tiny_bundle, earlier, tmp_path) == before


def test_two_runs_on_one_details_file_do_not_mix(tiny_bundle, data, earlier):
    """A second run on a details file another run is writing stops at once (the lock),
    and leaves that file alone."""
    import fcntl

    details = earlier / "s.details.jsonl"
    before = snapshot(earlier)
    with open(details, "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        res = sdrun("run", tiny_bundle, "--data", data, "--out", earlier / "other.csv",
                    "--details", details, "--quiet")
    assert res.exit_code == 2, res.output
    assert str(details) in res.output and "another sdrun run" in res.output
    assert snapshot(earlier) == before


def test_atomic_writes_use_a_temp_file_per_writer(tmp_path):
    target = tmp_path / "out.csv"
    texts = [f"writer {i}\n" * 20000 for i in range(8)]
    errors = []

    def write(t):
        try:
            atomic_write(target, t)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert target.read_text() in texts  # one writer's whole text, never a mix
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]  # no temp file left


# ---- 2. resume knows what it resumes ------------------------------------------------
def _resume_setup(tiny_bundle, data, tmp_path):
    out = tmp_path / "s.csv"
    res = sdrun("run", tiny_bundle, "--data", data, "--out", out, "--quiet")
    assert res.exit_code == 0, res.output
    return out, tmp_path / "s.details.jsonl"


@pytest.mark.parametrize("case", ["other_param", "other_bundle", "other_version", "no_record"])
def test_resume_refuses_what_other_settings_wrote(case, tiny_bundle, data, tmp_path):
    out, details = _resume_setup(tiny_bundle, data, tmp_path / "run")
    bundle, extra = tiny_bundle, []
    record = details.with_name(details.name + ".run.json")
    if case == "other_param":
        extra, expect = ["--param", "det_thr=0.9"], ["det_thr 0.25 there, 0.9 now"]
    elif case == "other_bundle":
        bundle = copy_bundle(tiny_bundle, tmp_path / "other")
        q = np.load(bundle / "owlvit" / "query_embeds.npy")
        import io

        buf = io.BytesIO()
        np.save(buf, q * 1.01)
        rewrite_listed_file(bundle, "owlvit/query_embeds.npy", buf.getvalue())
        expect = ["bundle", str(tiny_bundle.resolve()), str(bundle.resolve())]
    elif case == "other_version":
        r = json.loads(record.read_text())
        r["spotdiff"] = "0.0.1"
        record.write_text(json.dumps(r))
        expect = ["spotdiff version 0.0.1 there"]
    else:
        record.unlink()
        expect = ["no record of what produced it", str(record)]
    before = snapshot(tmp_path / "run", data)
    res = sdrun("run", bundle, "--data", data, "--out", out, "--quiet", "--resume", *extra)
    assert res.exit_code == 2, res.output
    assert str(details) in res.output
    for text in expect:
        assert text in res.output, (text, res.output)
    assert "--force-rerun" in res.output
    assert snapshot(tmp_path / "run", data) == before
    # --force-rerun: every pair again, with these settings
    res = sdrun("run", bundle, "--data", data, "--out", out, "--quiet", "--resume", "--force-rerun", *extra)
    assert res.exit_code == 0, res.output
    assert "(0 done before)" in res.output
    assert json.loads(record.read_text())["params"]["det_thr"] == (0.9 if case == "other_param" else 0.25)


def test_resume_retries_the_pairs_that_failed(tiny_bundle, data, tmp_path):
    broken = tmp_path / "pairs"
    shutil.copytree(data, broken)
    image = broken / "data" / "10002_1.png"
    good = image.read_bytes()
    image.write_bytes(b"")
    out = tmp_path / "s.csv"
    res = sdrun("run", tiny_bundle, "--data", broken, "--out", out, "--quiet")
    assert res.exit_code == 1 and "10002_1.png" in res.output
    image.write_bytes(good)  # the user replaces the bad image
    res = sdrun("run", tiny_bundle, "--data", broken, "--out", out, "--quiet", "--resume")
    assert res.exit_code == 0, res.output
    assert "(5 done before), 0 failed" in res.output
    clean = tmp_path / "clean.csv"
    assert sdrun("run", tiny_bundle, "--data", data, "--out", clean, "--quiet").exit_code == 0
    assert out.read_bytes() == clean.read_bytes()
    assert (tmp_path / "s.details.jsonl").read_bytes() == (tmp_path / "clean.details.jsonl").read_bytes()


# ---- 3. every parameter validated in one place --------------------------------------
@pytest.mark.parametrize("item, expect", [
    ("det_thr=nan", "det_thr=NaN: must be a finite number"),
    ("det_thr=-inf", "det_thr=-Infinity: must be a finite number"),
    ("det_thr=-1", "det_thr=-1.0: must be >= 0"),
    ("iou_thr=5", "iou_thr=5.0: must lie in [0, 1]"),
    ("det_th=0.3", "unknown parameter 'det_th'"),
    ("det_thr=abc", "'abc' is not a number"),
    ("none_gate_signal=heat", "none_gate_signal is one of change_score, change_logit"),
    ("none_gate_added=inf", "write null (or --param KEY=off)"),
    ("det_thr=2.5", "det_thr=2.5 keeps no box"),
])
def test_bad_param_flag_is_an_error_naming_flag_key_value(item, expect, tiny_bundle, data, earlier):
    before = snapshot(earlier, tiny_bundle)
    res = sdrun("run", tiny_bundle, "--data", data, "--out", earlier / "s.csv", "--quiet", "--param", item)
    assert res.exit_code == 2, res.output
    assert expect in res.output, res.output
    assert "--param" in res.output or "keeps no box" in res.output
    assert snapshot(earlier, tiny_bundle) == before


@pytest.mark.parametrize("value, expect", [
    ([0.1], "det_thr=[0.1]: expected a number, got list"),
    ("0.3", 'det_thr="0.3": expected a number, got str'),
    (None, "det_thr=null: expected a number, got null"),
    (-1, "det_thr=-1: must be >= 0"),
    ("MISSING", "missing parameter(s) det_thr"),
    ("UNKNOWN", "unknown parameter 'det_threshold'"),
])
def test_bad_params_json_fails_at_load_naming_file_and_key(value, expect, tiny_bundle, data, earlier,
                                                           tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    params = json.loads((bundle / "params.json").read_text())
    if value == "MISSING":
        del params["det_thr"]
    elif value == "UNKNOWN":
        params["det_threshold"] = 0.3
    else:
        params["det_thr"] = value
    rewrite_listed_file(bundle, "params.json", json.dumps(params).encode())
    before = snapshot(earlier, data)
    for argv in (["run", bundle, "--data", data, "--out", earlier / "s.csv", "--quiet"],
                 ["info", bundle], ["check", bundle]):
        res = sdrun(*argv)
        assert res.exit_code == 2, (argv[0], res.output)
        assert str(bundle / "params.json") in res.output and expect in res.output, res.output
        assert "pairs" not in res.output  # failed at load, not pair after pair
    assert snapshot(earlier, data) == before
    from sdrun.pipeline import Pipeline

    with pytest.raises(ParamError, match="params.json"):
        Pipeline.load(bundle)


def test_params_in_the_api_and_a_tune_grid_are_checked(tiny_bundle, tmp_path):
    from sdrun.apps.tune import TuneError, load_grid  # noqa: F401
    from sdrun.pipeline import Pipeline

    with pytest.raises(ParamError, match=r"Pipeline\(params=...\): iou_thr=1.5: must lie in \[0, 1\]"):
        Pipeline.load(tiny_bundle, params={"iou_thr": 1.5})
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"det_thr": [0.2, -0.1]}))
    with pytest.raises(ParamError, match=r"grid.json: det_thr\[1\]: det_thr=-0.1: must be >= 0"):
        load_grid(grid)
    assert validate({"none_gate_added": None, "det_thr": 1}, "x") == {"none_gate_added": None, "det_thr": 1.0}
    assert parse_overrides(["none_gate_removed=off", "none_gate_signal=change_logit"]) == {
        "none_gate_removed": None, "none_gate_signal": "change_logit"}
    with pytest.raises(ParamError, match="expected a number or null"):
        validate({"none_gate_added": True}, "x")


# ---- 4. the metric reads what people write ------------------------------------------
def test_score_reads_none_in_any_case_empty_cells_and_commas(tmp_path):
    sub, truth = tmp_path / "sub.csv", tmp_path / "truth.csv"
    sub.write_text("img_id,added_objs,removed_objs,changed_objs\n"
                   "1,none,box,none\n2,none,box cone,none\n3,car,none,none\n")
    truth.write_text("img_id,added_objs,removed_objs,changed_objs\n"
                     "1,None,box,NONE\n2, ,\"box,cone\",\n3,car, none ,\t\n")
    before = snapshot(tmp_path)
    res = sdrun("score", sub, truth, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["row_f1_mean"] == pytest.approx(1.0)
    res = sdrun("score", sub, truth, "--json", "--normalize")
    assert json.loads(res.output)["row_f1_mean"] == pytest.approx(1.0)
    assert snapshot(tmp_path) == before


def test_score_refuses_unquoted_commas_that_spill_into_other_columns(tmp_path):
    sub = tmp_path / "sub.csv"
    sub.write_text("img_id,added_objs,removed_objs,changed_objs\n1,box,cone,none,none\n2,none,none,none\n")
    res = sdrun("score", sub, sub)
    assert res.exit_code == 2
    assert str(sub) in res.output and "line(s) 2" in res.output and "quoted" in res.output


# ---- 5. files that are not what they claim to be ------------------------------------
def test_details_lines_that_are_not_records_are_reported_and_rerun(tiny_bundle, data, tmp_path):
    out, details = _resume_setup(tiny_bundle, data, tmp_path)
    clean = details.read_bytes()
    lines = clean.splitlines(keepends=True)
    lines[1], lines[3], lines[4] = b"\xff\xfe not text\n", b"[1, 2]\n", b'{"a": 1}\n'
    details.write_bytes(b"".join(lines))
    sub_before = out.read_bytes()
    res = run_without_torch(["run", str(tiny_bundle), "--data", str(data), "--out", str(out),
                             "--quiet", "--resume"])
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    for number, what in ((2, "not UTF-8"), (4, "a JSON list"), (5, "an object without img_id")):
        assert f"{details} line {number}: {what}" in res.stderr, res.stderr
    assert "(3 done before)" in res.stderr
    assert details.read_bytes() == clean and out.read_bytes() == sub_before


def test_a_graph_that_onnxruntime_cannot_load_is_named(tiny_bundle, data, earlier, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    graph = bundle / "clip" / "visual.onnx"
    rewrite_listed_file(bundle, "clip/visual.onnx", graph.read_bytes()[:5000])  # digest updated
    before = snapshot(earlier, data)
    for argv in (["run", bundle, "--data", data, "--out", earlier / "s.csv", "--quiet"], ["check", bundle]):
        res = sdrun(*argv)
        assert res.exit_code == 2, (argv[0], res.output)
        assert f"{graph}: onnxruntime cannot load this graph (InvalidProtobuf" in res.output
    assert snapshot(earlier, data) == before


# ---- the same classes, beyond the listed cases --------------------------------------
@pytest.mark.parametrize("encoding, text", [
    ("utf-8-sig", "img_id,x\n10000,a\n10001,b\n"),       # Excel's UTF-8 with a byte-order mark
    ("utf-16", "img_id,x\n10000,a\n10001,b\n"),          # Excel's "Unicode text"
    ("utf-8", "img_id;x\n10000;a\n10001;b\n"),           # semicolon-separated
    ("utf-8", " img_id , x\r\n10000,a\r\n\r\n10001,b\r\n"),  # spaces in the header, CRLF, a blank line
])
def test_ids_csv_in_the_encodings_and_dialects_people_save(encoding, text, tiny_bundle, data, tmp_path):
    ids = tmp_path / "ids.csv"
    ids.write_bytes(text.encode(encoding))
    res = sdrun("run", tiny_bundle, "--data", data, "--csv", ids, "--out", tmp_path / "s.csv", "--quiet")
    assert res.exit_code == 0, res.output
    assert [r.split(",")[0] for r in (tmp_path / "s.csv").read_text().splitlines()[1:]] == ["10000", "10001"]


def test_csv_that_is_not_text_or_not_there_is_named(tiny_bundle, data, tmp_path):
    latin = tmp_path / "latin.csv"
    latin.write_bytes("img_id,added_objs\n10000,caf\xe9\n".encode("latin-1"))
    for path, expect in ((latin, "not UTF-8 text (byte 0xe9 on line 2)"),
                         (tmp_path / "nope.csv", "no such file")):
        res = sdrun("run", tiny_bundle, "--data", data, "--csv", path, "--out", tmp_path / "s.csv", "--quiet")
        assert res.exit_code == 2 and f"{path}: {expect}" in res.output, res.output
    res = sdrun("score", latin, latin)
    assert res.exit_code == 2 and f"{latin} (submission): not UTF-8" in res.output, res.output


def test_image_extensions_in_upper_case_are_found(tiny_bundle, data, tmp_path):
    folder = tmp_path / "upper" / "data"
    folder.mkdir(parents=True)
    for k in (1, 2):
        shutil.copy(data / "data" / f"10000_{k}.png", folder / f"10000_{k}.PNG")
    res = sdrun("run", tiny_bundle, "--data", folder.parent, "--out", tmp_path / "s.csv", "--quiet")
    assert res.exit_code == 0, res.output
    assert "1 pairs (0 done before), 0 failed" in res.output


def test_synth_never_mixes_into_or_replaces_another_dataset(tmp_path):
    folder = tmp_path / "real"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "31795_1.png").write_bytes(b"a real image")
    before = snapshot(folder)
    res = sdrun("synth", "--out", folder, "--pairs", "2")
    assert res.exit_code == 2 and "31795_1.png" in res.output and "--overwrite" in res.output
    assert snapshot(folder) == before
    assert sdrun("synth", "--out", tmp_path / "new", "--pairs", "2").exit_code == 0
    assert sdrun("synth", "--out", tmp_path / "new", "--pairs", "2").exit_code == 0  # its own pairs again
    assert sdrun("synth", "--out", tmp_path / "new", "--pairs", "1").exit_code == 2  # would leave 10001
    res = sdrun("synth", "--out", tmp_path / "new", "--pairs", "1", "--overwrite")
    assert res.exit_code == 0
    assert sorted(p.name for p in (tmp_path / "new" / "data").iterdir()) == ["10000_1.png", "10000_2.png"]
