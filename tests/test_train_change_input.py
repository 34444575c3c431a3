"""`sdexport train-change` against hostile input: the --out folder (other people's files,
inputs inside it, --resume), labels of one kind, a foreign or broken last.pt or
metrics.jsonl, a --backbone that is not there. Each is refused up front with one line
"error: ..." naming the file or flag, and nothing is written."""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("albumentations")

from conftest import TRAIN_TINY as TINY  # noqa: E402
from conftest import snapshot  # noqa: E402
from conftest import train_change as train  # noqa: E402


@pytest.fixture(scope="module")
def pairs(train_pairs):
    return train_pairs


@pytest.fixture(scope="module")
def finished(pairs, tmp_path_factory):
    """A finished one-epoch run (config.json, split.json, metrics.jsonl, last.pt, best.*)."""
    run = tmp_path_factory.mktemp("train-input-run") / "run"
    res = train(*base(pairs), "--out", run, "--epochs", "1")
    assert res.exit_code == 0, res.output
    return run


def base(pairs):
    return ["--data", pairs, "--csv", pairs / "labels.csv", *TINY]


def refused(res, *needles):
    """Exit 2 with one "error: ..." line holding every needle, and never a traceback."""
    errors = [line for line in res.output.splitlines() if line.startswith("error: ")]
    assert res.exit_code == 2 and len(errors) == 1, res.output
    assert "Traceback" not in res.output, res.output
    for needle in needles:
        assert str(needle) in errors[0], (needle, res.output)
    return errors[0]


def strict_json(text: str):
    def reject(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=reject)


def copy_run(finished, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


# ---- 1. --out: other people's files, runs, inputs inside it ------------------------
def test_out_folder_with_other_files_is_refused_and_left_alone(pairs, tmp_path):
    theirs = tmp_path / "theirs"  # another tool's folder, with the same file names
    theirs.mkdir()
    (theirs / "config.json").write_text('{"model": "mine"}\n')
    (theirs / "metrics.jsonl").write_text('{"step": 1}\n')
    (theirs / "best.json").write_text("{}\n")
    before = snapshot(theirs)
    for extra in ([], ["--resume"]):
        res = train(*base(pairs), "--out", theirs, "--epochs", "1", *extra)
        if extra:
            refused(res, "--resume", theirs, "config.json", "not the configuration of a train-change run")
        else:
            refused(res, f"--out {theirs}", "best.json, config.json, metrics.jsonl", "did not write")
        assert snapshot(theirs) == before

    nested = tmp_path / "nested"  # a file in a subfolder counts too
    (nested / "sub").mkdir(parents=True)
    (nested / "sub" / "keep.txt").write_text("x")
    refused(train(*base(pairs), "--out", nested, "--epochs", "1"), "sub/keep.txt")


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_folder_holding_user_files_is_refused(finished, pairs, tmp_path, resume):
    run = copy_run(finished, tmp_path)
    (run / "notes.txt").write_text("my notes")
    before = snapshot(run)
    res = train(*base(pairs), "--out", run, "--epochs", "1", *(["--resume"] if resume else []))
    refused(res, f"--out {run}", "notes.txt")
    assert snapshot(run) == before


@pytest.mark.parametrize("name", [".last.pt.tmp", "best.json"])
def test_a_run_folder_holding_a_link_is_refused(finished, pairs, tmp_path, name):
    """A run writes plain files: a link among them (to a file of the user's) would be
    written through, so it is not the run's."""
    run = copy_run(finished, tmp_path)
    precious = tmp_path / "precious.txt"
    precious.write_text("mine")
    (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(precious)
    refused(train(*base(pairs), "--out", run, "--epochs", "1", "--resume"), f"--out {run}", name)
    assert precious.read_text() == "mine"


def test_an_existing_run_needs_resume(finished, pairs, tmp_path):
    run = copy_run(finished, tmp_path)
    before = snapshot(run)
    refused(train(*base(pairs), "--out", run, "--epochs", "1"), f"--out {run}", "add --resume",
            "another --out")
    assert snapshot(run) == before
    res = train(*base(pairs), "--out", run, "--epochs", "1", "--resume")  # finished: nothing to do
    assert res.exit_code == 0 and "nothing to resume" in res.output, res.output
    # leftovers of a run killed while writing are its own files
    (run / ".metrics.jsonl.abc123.tmp").write_text("")
    (run / ".last.pt.tmp").write_bytes(b"")
    res = train(*base(pairs), "--out", run, "--epochs", "1", "--resume")
    assert res.exit_code == 0, res.output


def test_out_that_is_a_file_is_refused(pairs, tmp_path):
    f = tmp_path / "out.txt"
    f.write_text("keep me")
    for extra in ([], ["--resume"]):  # click's own check (file_okay=False)
        res = train(*base(pairs), "--out", f, "--epochs", "1", *extra)
        assert res.exit_code == 2 and "is a file" in res.output and "Traceback" not in res.output
    from sdexport.train.loop import TrainConfig, train_change
    from sdrun.files import OutputPathError

    cfg = TrainConfig(data=str(pairs), csv=str(pairs / "labels.csv"), backbone="tiny-random", epochs=1)
    for resume in (False, True):  # and the library's
        with pytest.raises(OutputPathError, match="is a file"):
            train_change(cfg, f, resume=resume, progress=False, log=lambda m: None)
    assert f.read_text() == "keep me"


def test_inputs_inside_out_are_refused(pairs, tmp_path):
    refused(train(*base(pairs), "--out", pairs, "--epochs", "1"), f"--data {pairs}", "inside")

    out = tmp_path / "out"
    out.mkdir()
    csv = out / "labels.csv"
    shutil.copy(pairs / "labels.csv", csv)
    refused(train("--data", pairs, "--csv", csv, *TINY, "--out", out), f"--csv {csv}", "inside")

    vocab = out / "vocab.csv"  # a vocabulary read from a CSV inside the run folder
    csv.rename(vocab)
    refused(train(*base(pairs), "--out", out, "--heads", "per-class", "--vocab", vocab),
            f"--vocab {vocab}", "inside")

    backbone = out / "vit"  # a local timm folder inside the run folder
    backbone.mkdir()
    (backbone / "config.json").write_text("{}")
    vocab.unlink()
    refused(train("--data", pairs, "--csv", pairs / "labels.csv", "--batch-size", "8", "--quiet",
                  "--backbone", backbone, "--out", out), "--backbone", "inside")

    data_out = tmp_path / "d"  # --out inside --data is fine; --data inside --out is not
    shutil.copytree(pairs, data_out / "pairs")
    refused(train("--data", data_out / "pairs", "--csv", pairs / "labels.csv", *TINY,
                  "--out", data_out), "--data", "inside")


# ---- 2. labels of one kind; standard JSON only ------------------------------------
def _csv(pairs, tmp_path, name, keep) -> Path:
    lines = (pairs / "labels.csv").read_text().splitlines()
    out = tmp_path / name
    out.write_text("\n".join([lines[0], *[x for x in lines[1:] if keep(x)]]) + "\n")
    return out


@pytest.mark.parametrize("kind", ["changed", "unchanged"])
def test_labels_of_one_kind_are_refused_before_training(pairs, tmp_path, kind):
    def unchanged(line):
        return line.endswith("none,none,none")

    csv = _csv(pairs, tmp_path, f"{kind}.csv",
               (lambda x: not unchanged(x)) if kind == "changed" else unchanged)
    out = tmp_path / "run"
    err = refused(train("--data", pairs, "--csv", csv, *TINY, "--out", out, "--epochs", "1"),
                  f"{csv}:", f"is {kind}", "both kinds")
    assert "Infinity" not in err
    assert not out.exists()  # refused before anything is written
    # per-class heads train the same change logit: refused too
    refused(train("--data", pairs, "--csv", csv, *TINY, "--out", out, "--heads", "per-class"),
            f"{csv}:", f"is {kind}")


def test_a_training_part_of_one_kind_is_refused(pairs, tmp_path):
    from sdexport.train.data import read_rows, split

    one = {"10000"}  # a single changed pair (10000 has a label) among the unchanged ones
    csv = _csv(pairs, tmp_path, "one.csv",
               lambda x: x.endswith("none,none,none") or x.split(",")[0] in one)
    rows, _ = read_rows(pairs, csv, None, lambda m: None)
    seed = next(s for s in range(200) if all(r.change == 0 for r in split(rows, 0.2, s)[0]))
    out = tmp_path / "run"
    refused(train("--data", pairs, "--csv", csv, *TINY, "--out", out, "--seed", seed),
            f"{csv}:", "training part", f"--seed {seed}", "unchanged")
    assert not out.exists()


def test_metrics_are_standard_json_when_validation_has_one_kind(pairs, tmp_path):
    """A validation part without changed pairs has no best-F1 threshold (infinite): it is
    written as null, never as Infinity."""
    from sdexport.train.data import read_rows, split

    csv = _csv(pairs, tmp_path, "few.csv", lambda x: x.endswith("none,none,none")
               or x.split(",")[0] in {"10000", "10001", "10002"})
    rows, _ = read_rows(pairs, csv, None, lambda m: None)
    seed = next(s for s in range(500) if all(r.change == 0 for r in split(rows, 0.25, s)[1])
                and len({r.change for r in split(rows, 0.25, s)[0]}) == 2)
    run = tmp_path / "run"
    res = train("--data", pairs, "--csv", csv, *TINY, "--out", run, "--epochs", "1",
                "--val-frac", "0.25", "--seed", seed)
    assert res.exit_code == 0, res.output
    records = [strict_json(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_best_f1_logit"] for r in records] == [None, None]
    assert all(r["val_auc"] is None for r in records)
    strict_json((run / "best.json").read_text())
    strict_json(torch.load(run / "last.pt", weights_only=True)["best"])


def test_to_json_never_writes_non_finite_numbers():
    from sdexport.train.loop import to_json

    text = to_json({"a": float("inf"), "b": [float("nan"), 1.5, -float("inf")], "c": {"d": float("nan")}})
    assert strict_json(text) == {"a": None, "b": [None, 1.5, None], "c": {"d": None}}


def test_resume_rewrites_an_old_metrics_file_as_standard_json(finished, pairs, tmp_path):
    run = copy_run(finished, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["val_best_f1_logit"] = float("inf")  # as versions before this one wrote it
    (run / "metrics.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    res = train(*base(pairs), "--out", run, "--epochs", "1", "--resume")
    assert res.exit_code == 0, res.output
    records = [strict_json(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["val_best_f1_logit"] is None and len(records) == 2


# ---- 3. --resume without a run -----------------------------------------------------
def test_resume_without_a_run_is_an_error(pairs, tmp_path):
    missing = tmp_path / "nope"
    refused(train(*base(pairs), "--out", missing, "--resume"), f"--out {missing}", "does not exist",
            "--resume")
    assert not missing.exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    refused(train(*base(pairs), "--out", empty, "--resume"), f"--out {empty}", "no config.json")
    assert list(empty.iterdir()) == []


def test_resume_with_a_broken_config_is_named(finished, pairs, tmp_path):
    run = copy_run(finished, tmp_path)
    (run / "config.json").write_text('{"format": "spotdiff-train-change/1", ')
    refused(train(*base(pairs), "--out", run, "--epochs", "1", "--resume"),
            run / "config.json", "not JSON (line 1")


# ---- 4. a foreign or broken last.pt, a bad metrics.jsonl ---------------------------
def _zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hello.txt", "not a checkpoint")


FOREIGN = {
    "random bytes": lambda p, good: p.write_bytes(bytes(range(256)) * 40),
    "truncated": lambda p, good: p.write_bytes(good[: len(good) // 2]),
    "empty": lambda p, good: p.write_bytes(b""),
    "another zip": _zip,
    "other keys": lambda p, good: torch.save({"weights": torch.zeros(3), "step": 4}, p),
    "a tensor": lambda p, good: torch.save(torch.zeros(3), p),
    "other model": lambda p, good: torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, "optimizer": {},
                                               "scheduler": {}, "epoch": 1, "best": None}, p),
    "bad epoch": lambda p, good: torch.save({**torch.load(p, weights_only=True), "epoch": 99}, p),
    "bad optimizer": lambda p, good: torch.save({**torch.load(p, weights_only=True),
                                                 "optimizer": {"state": {}, "param_groups": []}}, p),
    "a folder": lambda p, good: (p.unlink(), p.mkdir()),
}


@pytest.mark.parametrize("case", FOREIGN, ids=list(FOREIGN))
def test_a_foreign_last_pt_is_named(finished, pairs, tmp_path, case):
    run = copy_run(finished, tmp_path)
    last = run / "last.pt"
    good = last.read_bytes()
    if case == "another zip":
        FOREIGN[case](last)
    else:
        FOREIGN[case](last, good)
    before = snapshot(run)
    err = refused(train(*base(pairs), "--out", run, "--epochs", "1", "--resume"),
                  last, "not a checkpoint written by sdexport train-change")
    assert "weights_only" not in err and "re-run" not in err.lower()
    assert snapshot(run) == before  # nothing rewritten


@pytest.mark.parametrize("line, why", [("{not json", "not a JSON record"), ("[1, 2]", "not an epoch's record"),
                                       ('{"epoch": "one"}', "not an epoch's record")])
def test_a_bad_metrics_line_is_named_with_its_number(finished, pairs, tmp_path, line, why):
    run = copy_run(finished, tmp_path)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], line, *lines[1:]]) + "\n")
    before = snapshot(run)
    refused(train(*base(pairs), "--out", run, "--epochs", "1", "--resume"), f"{metrics} line 2", why)
    assert snapshot(run) == before


def test_a_missing_metrics_file_is_named(finished, pairs, tmp_path):
    run = copy_run(finished, tmp_path)
    (run / "metrics.jsonl").unlink()
    refused(train(*base(pairs), "--out", run, "--epochs", "1", "--resume"), run / "metrics.jsonl", "missing")


# ---- 5. the flag the user gave -----------------------------------------------------
def test_backbone_errors_name_backbone(pairs, tmp_path):
    out = tmp_path / "run"
    for spec, needle in [("./nope", "--backbone ./nope: folder not found"),
                         (str(tmp_path / "nope") + "/", "folder not found"),
                         (str(pairs / "labels.csv"), "got a file"),
                         ("", "--backbone is empty"), ("none", "--backbone none")]:
        res = train("--data", pairs, "--csv", pairs / "labels.csv", "--quiet", "--out", out,
                    "--backbone", spec)
        err = refused(res, "--backbone", needle)
        assert "--siamese" not in err
        assert not out.exists()

    empty = tmp_path / "vit"  # a local folder that is no timm folder
    empty.mkdir()
    err = refused(train("--data", pairs, "--csv", pairs / "labels.csv", "--quiet", "--out", out,
                        "--backbone", empty), f"--backbone {empty}", "config.json is missing")
    assert "--siamese" not in err and not out.exists()


def test_source_messages_name_the_option():
    from sdexport.sources import SourceError, parse_source

    src = parse_source("siamese", "some-hub-name", None, option="--backbone")
    msg = str(src.hub_error(OSError("offline")))
    assert "(--backbone DIR)" in msg and "--backbone tiny-random" in msg and "--siamese" not in msg
    assert "--preset" not in msg
    msg = str(parse_source("siamese", "some-hub-name", None).hub_error(OSError("offline")))
    assert "(--siamese DIR)" in msg and "--preset tiny-random" in msg  # `sdexport build` unchanged
    with pytest.raises(SourceError, match="^--siamese ./nope: folder not found"):
        parse_source("siamese", "./nope", None)
    assert (parse_source("siamese", "tiny-random", None, option="--backbone")
            == parse_source("siamese", "tiny-random", None))


# ---- 6. other arguments ------------------------------------------------------------
def test_other_bad_arguments_are_one_line_errors(pairs, tmp_path):
    out = tmp_path / "run"
    refused(train(*base(pairs), "--out", out, "--lr", "inf"), "--lr inf")
    refused(train(*base(pairs), "--out", out, "--weight-decay", "nan"), "--weight-decay nan")
    refused(train(*base(pairs), "--out", out, "--val-frac", "nan"), "--val-frac nan")
    refused(train("--data", tmp_path / "no-data", "--csv", pairs / "labels.csv", *TINY, "--out", out),
            tmp_path / "no-data")
    refused(train("--data", pairs, "--csv", tmp_path / "no.csv", *TINY, "--out", out), tmp_path / "no.csv")
    res = train(*base(pairs), "--out", out, "--vocab", "person,car")  # per-class heads only
    assert res.exit_code == 2 and "--heads per-class" in res.output, res.output
    assert not out.exists()
