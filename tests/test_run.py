"""`sdrun run` / `sdrun diff` end to end, bad inputs, kill -9 and --resume, the Python API."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
from conftest import BLOCK_TORCH, run_without_torch

from sdrun.apps.synth import write_synthetic_pairs
from sdrun.pipeline import Pipeline


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    write_synthetic_pairs(out, 30, seed=3)
    return out


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_run_end_to_end_without_torch(tiny_bundle, synth_dir, tmp_path):
    sub, details, viz = tmp_path / "sub.csv", tmp_path / "d.jsonl", tmp_path / "viz"
    ids = tmp_path / "ids.csv"
    ids.write_text("img_id\n10000\n10001\n10002\n")
    res = run_without_torch(["run", str(tiny_bundle), "--data", str(synth_dir), "--csv", str(ids),
                             "--out", str(sub), "--details", str(details), "--viz", str(viz),
                             "--batch-pairs", "2"])
    assert res.returncode == 0, res.stderr
    rows = _read_csv(sub)
    assert rows[0] == ["img_id", "added_objs", "removed_objs", "changed_objs"]
    assert [r[0] for r in rows[1:]] == ["10000", "10001", "10002"]
    for r in rows[1:]:
        for cell in r[1:]:
            assert cell == "none" or cell.split() == sorted(set(cell.split()))
    lines = [json.loads(x) for x in details.read_text().splitlines()]
    assert [x["img_id"] for x in lines] == ["10000", "10001", "10002"]
    for line, row in zip(lines, rows[1:]):
        assert line["error"] is None
        assert (" ".join(line["added"]) or "none") == row[1]
        assert {o["status"] for o in line["objects"]} <= {"added", "removed", "changed", "matched"}
    assert sorted(p.name for p in viz.iterdir()) == ["10000.png", "10001.png", "10002.png"]
    assert "pair" in res.stderr  # the progress bar


def test_diff_command_without_torch(tiny_bundle, synth_dir, tmp_path):
    a, b = synth_dir / "data" / "10004_1.png", synth_dir / "data" / "10004_2.png"
    res = run_without_torch(["diff", str(tiny_bundle), str(a), str(b), "--json",
                             "--viz", str(tmp_path / "v.png")])
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert set(out) >= {"added", "removed", "changed", "objects", "change_score"}
    img = cv2.imread(str(tmp_path / "v.png"))
    assert img is not None and img.shape[1] > 2 * 224


def _write_bad_inputs(src, dst):
    """A data folder with every kind of bad (and odd but valid) input."""
    data = dst / "data"
    data.mkdir(parents=True)
    good = [f"{i}" for i in range(10000, 10003)]
    for i in good:
        for k in (1, 2):
            shutil.copy(src / "data" / f"{i}_{k}.png", data / f"{i}_{k}.png")
    img = cv2.imread(str(src / "data" / "10003_1.png"))
    png = (src / "data" / "10003_1.png").read_bytes()
    cases = {
        "missing": None,
        "zero": b"",
        "truncated": png[: len(png) // 2],
        "text": b"this is not an image at all\n" * 20,
    }
    for name, payload in cases.items():
        cv2.imwrite(str(data / f"{name}_1.png"), img)
        if payload is not None:
            (data / f"{name}_2.png").write_bytes(payload)
    cv2.imwrite(str(data / "deep_1.png"), img.astype(np.uint16) * 257)
    cv2.imwrite(str(data / "deep_2.png"), img.astype(np.uint16) * 257)
    cv2.imwrite(str(data / "grey_1.png"), cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(data / "grey_2.png"), cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(data / "rgba_1.png"), cv2.cvtColor(img, cv2.COLOR_BGR2BGRA))
    cv2.imwrite(str(data / "rgba_2.png"), cv2.cvtColor(img, cv2.COLOR_BGR2BGRA))
    cv2.imwrite(str(data / "sizes_1.png"), img)
    cv2.imwrite(str(data / "sizes_2.png"), cv2.resize(img, (300, 180)))
    ids = good + list(cases) + ["deep", "grey", "rgba", "sizes", "noimages", "10001"]
    (dst / "ids.csv").write_text("img_id\n" + "\n".join(ids) + "\n")
    return ids


def test_bad_inputs_are_named_and_lose_no_other_pair(tiny_bundle, synth_dir, tmp_path):
    ids = _write_bad_inputs(synth_dir, tmp_path / "bad")
    sub, details = tmp_path / "sub.csv", tmp_path / "d.jsonl"
    res = run_without_torch(["run", str(tiny_bundle), "--data", str(tmp_path / "bad"),
                             "--csv", str(tmp_path / "bad" / "ids.csv"), "--out", str(sub),
                             "--details", str(details), "--quiet"])
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    rows = {r[0]: r for r in _read_csv(sub)[1:]}
    assert list(rows) == list(dict.fromkeys(ids))  # every id once, in order
    lines = {x["img_id"]: x for x in map(json.loads, details.read_text().splitlines())}
    expect_error = {"missing": "missing_2.png", "zero": "zero_2.png", "truncated": "truncated_2.png",
                    "text": "text_2.png", "noimages": "noimages_1.png"}
    for pair_id, fragment in expect_error.items():
        err = lines[pair_id]["error"]
        assert err and fragment in err, (pair_id, err)
        assert fragment.split("_")[0] in res.stderr
        assert rows[pair_id][1:] == ["none", "none", "none"]
    assert "empty" in lines["zero"]["error"] or "0 bytes" in lines["zero"]["error"]
    assert "truncated" in lines["truncated"]["error"]
    assert "duplicate id '10001'" in res.stderr
    for pair_id in ("10000", "10001", "10002", "deep", "grey", "rgba", "sizes"):
        assert lines[pair_id]["error"] is None, (pair_id, lines[pair_id]["error"])
    assert lines["sizes"]["image_sizes"] == [[224, 224], [180, 300]]
    for o in lines["sizes"]["objects"]:  # boxes come back in each image's own pixels
        h, w = lines["sizes"]["image_sizes"][o["image"] - 1]
        assert 0 <= o["box"][0] <= o["box"][2] <= w and 0 <= o["box"][1] <= o["box"][3] <= h


def test_kill_during_run_then_resume_gives_identical_files(tiny_bundle, synth_dir, tmp_path):
    def cmd(out_dir, extra=()):
        return ["run", str(tiny_bundle), "--data", str(synth_dir), "--out", str(out_dir / "s.csv"),
                "--details", str(out_dir / "d.jsonl"), "--batch-pairs", "2", "--quiet", *extra]

    clean, killed = tmp_path / "clean", tmp_path / "killed"
    clean.mkdir()
    killed.mkdir()
    res = run_without_torch(cmd(clean))
    assert res.returncode == 0, res.stderr

    code = BLOCK_TORCH + textwrap.dedent(f"""
        sys.argv = ["sdrun"] + {cmd(killed)!r}
        from sdrun.cli import main
        main()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    details = killed / "d.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if details.exists() and details.read_text().count("\n") >= 7:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = details.read_text().count("\n")
    assert 7 <= n_before < 30, n_before
    assert not (killed / "s.csv").exists()
    with open(details, "ab") as f:  # as if killed in the middle of a write
        f.write(b'{"img_id": "100')
    res = run_without_torch(cmd(killed, ["--resume"]))
    assert res.returncode == 0, res.stderr
    assert f"({n_before} done before)" in res.stderr
    for name in ("s.csv", "d.jsonl"):
        assert (killed / name).read_bytes() == (clean / name).read_bytes(), name


def test_api_paths_arrays_and_threads(tiny_bundle, synth_dir):
    from sdrun.stages.images import load_image

    pipe = Pipeline.load(tiny_bundle)
    data = synth_dir / "data"
    pairs = [(str(i), data / f"{i}_1.png", data / f"{i}_2.png") for i in range(10010, 10018)]
    sequential = [pipe.diff(a, b, pid).to_json() for pid, a, b in pairs]
    from_arrays = pipe.diff(load_image(pairs[0][1]), load_image(pairs[0][2]), pairs[0][0])
    assert from_arrays.to_json() == sequential[0]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(lambda p: pipe.diff(p[1], p[2], p[0]).to_json(), pairs))
    assert threaded == sequential
    batched = [r.to_json() for r in pipe.run(pairs, batch_pairs=3)]
    assert [(r["added"], r["removed"], r["changed"]) for r in batched] == \
        [(r["added"], r["removed"], r["changed"]) for r in sequential]
