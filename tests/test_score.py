"""Issue 5: the metric (`sdrun score`), the model-output cache, `sdrun eval`, and writing
a bundle's parameters."""
from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
from conftest import TRAIN_CSV, run_without_torch

from sdrun.apps.score import ScoreError, read_label_csv, row_f1, score_files, score_sets
from sdrun.apps.synth import write_synthetic_pairs
from sdrun.bundle.bundle import Bundle, write_params
from sdrun.bundle.params import ParamError
from sdrun.errors import BundleError
from sdrun.pipeline import Pipeline

N_PAIRS = 8


# ---- shared by test_tune.py: a faster tiny bundle, labelled pairs, one filled cache ----
def fast_bundle(tmp_path_factory, tiny_bundle):
    """The tiny bundle with wbf_skip_box_thr 0.2: the random detectors give ~180 WBF
    candidates per image at 0.05, and the cache embeds every candidate (a CLIP crop each,
    ~4 ms of preprocessing apiece); 0.2 keeps about a third of them."""
    path = tmp_path_factory.getbasetemp() / "issue5-fast-bundle"
    if not (path / "manifest.json").exists():
        shutil.copytree(tiny_bundle, path)
        write_params(path, {**Bundle.load(path).params, "wbf_skip_box_thr": 0.2}, backup=False)
    return path


def labelled_pairs(tmp_path_factory):
    out = tmp_path_factory.getbasetemp() / "issue5-synth"
    if not (out / "labels.csv").exists():
        write_synthetic_pairs(out, N_PAIRS, seed=5)
    return out


def shared_cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "issue5-cache"


def filled(tmp_path_factory, tiny_bundle):
    """(pipeline, labelled data, cache fill) with every pair's outputs cached."""
    from sdrun.apps.cache import OutputCache
    from sdrun.apps.evaluate import load_labelled

    pipe = Pipeline.load(fast_bundle(tmp_path_factory, tiny_bundle))
    lab = load_labelled(labelled_pairs(tmp_path_factory), labelled_pairs(tmp_path_factory) / "labels.csv")
    fill = OutputCache(pipe, shared_cache(tmp_path_factory)).fill(lab.pairs, progress=False)
    assert not fill.errors
    return pipe, lab, fill


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_bundle):
    return filled(tmp_path_factory, tiny_bundle)


# ---- the metric --------------------------------------------------------------------
def test_row_f1_rules():
    e = frozenset()
    assert row_f1(e, e) == 1.0
    assert row_f1(frozenset({"car"}), e) == 0.0
    assert row_f1(e, frozenset({"car"})) == 0.0
    assert row_f1(frozenset({"car", "person"}), frozenset({"car"})) == pytest.approx(2 / 3)
    assert row_f1(frozenset({"car"}), frozenset({"car"})) == 1.0
    s = score_sets([(frozenset({"car"}), e, e), (e, e, frozenset({"box"}))],
                   [(frozenset({"car", "bag"}), e, e), (e, frozenset({"cone"}), frozenset({"box"}))])
    assert s.row_f1 == {"added_objs": pytest.approx((2 / 3 + 1) / 2), "removed_objs": 0.5,
                        "changed_objs": 1.0}
    assert s.mean == pytest.approx(((2 / 3 + 1) / 2 + 0.5 + 1.0) / 3)
    # micro: added tp 1, fn 1 -> 2/3; removed tp 0 fn 1 -> 0; changed tp 1 -> 1
    assert s.micro_f1 == {"added_objs": pytest.approx(2 / 3), "removed_objs": 0.0, "changed_objs": 1.0}
    # the notebook's set_f1 (departure 5): a row with both sides empty scores 0, not 1
    assert s.notebook_f1 == {"added_objs": pytest.approx(2 / 3 / 2, abs=1e-8), "removed_objs": 0.0,
                             "changed_objs": pytest.approx(1 / 2, abs=1e-8)}
    assert s.notebook_mean < s.mean


def test_notebook_set_f1_is_the_notebooks():
    from sdrun.apps.score import notebook_set_f1

    e = frozenset()
    assert notebook_set_f1(e, e) == 0.0 and row_f1(e, e) == 1.0  # where the two metrics part
    assert notebook_set_f1(frozenset({"car", "bag"}), frozenset({"car"})) == pytest.approx(2 / 3, abs=1e-8)
    assert notebook_set_f1(frozenset({"car"}), frozenset({"box"})) == 0.0


def test_all_none_on_the_real_train_csv_scores_0_5572(tmp_path):
    if not TRAIN_CSV.exists():
        pytest.skip(f"{TRAIN_CSV} not available")
    truth = read_label_csv(TRAIN_CSV)
    assert len(truth) == 4536
    sub = tmp_path / "none.csv"
    sub.write_text("img_id,added_objs,removed_objs,changed_objs\n" +
                   "".join(f"{i},none,none,none\n" for i in truth))
    s = score_files(sub, TRAIN_CSV)
    assert round(s.mean, 4) == 0.5572
    assert [round(s.row_f1[c], 4) for c in ("added_objs", "removed_objs", "changed_objs")] == \
        [0.4306, 0.5752, 0.6660]
    # the truth against itself: 1 raw; normalised (man person -> person) it is still 1
    assert score_files(TRAIN_CSV, TRAIN_CSV).mean == 1.0
    assert score_files(TRAIN_CSV, TRAIN_CSV, normalize=True).mean == 1.0
    res = run_without_torch(["score", str(sub), str(TRAIN_CSV)])
    assert res.returncode == 0, res.stderr
    assert "0.5572" in res.stdout and "0.4306" in res.stdout and "micro" in res.stdout
    assert "notebook set_f1" in res.stdout


def test_normalize_maps_synonyms(tmp_path):
    truth, sub = tmp_path / "t.csv", tmp_path / "s.csv"
    truth.write_text("img_id,added_objs,removed_objs,changed_objs\n1,man guy,auto,none\n")
    sub.write_text("img_id,added_objs,removed_objs,changed_objs\n1,person,car,none\n")
    assert score_files(sub, truth).row_f1["added_objs"] == 0.0
    s = score_files(sub, truth, normalize=True)
    assert s.mean == 1.0


def test_malformed_csvs_name_the_ids(tmp_path):
    head = "img_id,added_objs,removed_objs,changed_objs\n"
    truth = tmp_path / "truth.csv"
    truth.write_text(head + "".join(f"{i},car,none,none\n" for i in range(1, 6)))

    def err(text, args=()):
        sub = tmp_path / "sub.csv"
        sub.write_text(text)
        with pytest.raises(ScoreError) as e:
            score_files(sub, truth, *args)
        return str(e.value)

    e = err("img_id,added_objs,removed_objs\n1,car,none\n")
    assert "missing column(s) changed_objs" in e and "sub.csv" in e
    e = err(head + "1,car,none,none\n1,car,none,none\n2,none,none,none\n2,x,none,none\n3,a,b,c\n4,a,b,c\n5,a,b,c\n")
    assert "duplicate id(s)" in e and "1 (x2)" in e and "2 (x2)" in e
    e = err(head + "1,a,b,c\n2,a,b,c\n9,a,b,c\n77,a,b,c\n")
    assert "missing from" in e and "3, 4, 5" in e
    assert "not in" in e and "9, 77" in e
    with pytest.raises(ScoreError, match="nope.csv \\(submission\\): no such file"):
        score_files(tmp_path / "nope.csv", truth)
    # the CLI: one line, exit status 2, no traceback
    (tmp_path / "sub.csv").write_text(head + "1,a,b,c\n")
    res = run_without_torch(["score", str(tmp_path / "sub.csv"), str(truth)])
    assert res.returncode == 2 and "2, 3, 4, 5" in res.stderr and "Traceback" not in res.stderr


# ---- writing parameters ------------------------------------------------------------------
def test_write_params_keeps_the_bundle_verifiable(tiny_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    old = Bundle.load(b).params
    write_params(b, {**old, "det_thr": 0.3, "none_gate_added": None})
    loaded = Bundle.load(b)  # verifies every sha256, params.json's included
    assert loaded.params["det_thr"] == 0.3 and loaded.params["none_gate_added"] is None
    assert json.loads((b / "params.json.bak").read_text()) == old
    assert not list(b.glob(".*.tmp"))
    with pytest.raises(ParamError, match="det_thr=NaN: must be a finite number"):
        write_params(b, {**old, "det_thr": float("nan")})
    assert Bundle.load(b).params["det_thr"] == 0.3  # a refused write changes nothing
    (b / "params.json").write_text(json.dumps({**old, "det_thr": 0.9}))  # by hand: caught
    with pytest.raises(BundleError, match="params.json"):
        Bundle.load(b)


# ---- the cache ---------------------------------------------------------------------------
def test_clip_embedding_does_not_depend_on_its_batch(cached):
    pipe, lab, fill = cached
    o = next(iter(fill.outputs.values()))
    from sdrun.stages.images import load_image

    pid, a, _ = lab.pairs[0]
    img = load_image(a)
    h, w = img.shape[:2]
    boxes = o.detections[0].boxes * np.array([w, h, w, h])
    pick = np.arange(0, len(boxes), 3)
    alone = pipe.embed_crops([img], [boxes[pick]])[0]
    assert np.array_equal(alone, o.embeds[0][pick])  # bit for bit, in another batch
    assert np.array_equal(pipe.embed_crops([img], [boxes[:1]])[0], o.embeds[0][:1])


SETTINGS = [{}, {"det_thr": 0.15, "heat_th": 0.4}, {"det_thr": 0.35, "alpha": 0.3, "iou_thr": 0.6},
            {"heat_lambda": 1.2, "heat_th": 0.6}, {"heat_lambda": 0.5, "alpha": 0.7, "iou_thr": 0.4},
            {"none_gate_signal": "change_logit", "none_gate_added": 0.5, "none_gate_changed": -1e9},
            {"none_gate_removed": 0.6, "none_gate_changed": 2.0}]


def test_cached_outputs_give_exactly_the_models_answers(cached, tmp_path_factory, tiny_bundle):
    """finish(cache) == diff (running every model) for several pairs and parameters,
    gates included; and reading the cache back from disk changes nothing."""
    from sdrun.apps.cache import OutputCache

    pipe, lab, fill = cached
    again = OutputCache(pipe, shared_cache(tmp_path_factory)).fill(lab.pairs, progress=False)
    assert again.computed == 0 and list(again.outputs) == list(fill.outputs)
    n_objects, differs = 0, set()
    for params in SETTINGS:
        live = Pipeline(pipe.bundle, params=params)  # its own sessions, these parameters
        for pid, a, b in lab.pairs[:2]:
            want = live.diff(a, b, pid).to_json()
            got = pipe.finish(again.outputs[pid], params).to_json()
            assert got == want, (pid, params)
            n_objects += len(want["objects"])
            differs.add(json.dumps([want["added"], want["removed"], want["changed"]]))
    assert n_objects > 100 and len(differs) > 4  # the settings do change the answers


def test_cache_misses_on_changed_images_and_survives_torn_files(cached, tmp_path):
    from sdrun.apps.cache import OutputCache, pair_digest

    pipe, lab, fill = cached
    pid, a, b = lab.pairs[1]
    cache = OutputCache(pipe, tmp_path / "c")
    cache.put(fill.outputs[pid], pair_digest(pid, a, b))
    assert cache.get(pid, pair_digest(pid, a, b)) is not None
    b2 = tmp_path / "b2.png"
    img = cv2.imread(str(b))
    img[0, 0] = 255 - img[0, 0]
    cv2.imwrite(str(b2), img)
    assert cache.get(pid, pair_digest(pid, a, b2)) is None  # another image: another entry
    path = cache.path(pid, pair_digest(pid, a, b))
    path.write_bytes(path.read_bytes()[:100])  # torn: a miss, not a crash
    assert cache.get(pid, pair_digest(pid, a, b)) is None
    res = cache.fill([(pid, a, b)], progress=False)
    assert res.computed == 1 and cache.get(pid, pair_digest(pid, a, b)) is not None
    # tuning rewrites params.json, which must not change the cache key; a WBF setting must
    from types import SimpleNamespace

    from sdrun.apps.cache import model_key

    def key(**params):
        return model_key(SimpleNamespace(bundle=pipe.bundle, params={**pipe.params, **params},
                                         provider=pipe.provider))

    assert key() == cache.key
    assert key(det_thr=0.9, none_gate_added=0.5) == cache.key
    assert key(wbf_iou_thr=0.6) != cache.key


def test_finish_refuses_boxes_without_embeddings(cached):
    pipe, lab, _ = cached
    pid, a, b = lab.pairs[0]
    o = pipe.model_outputs([(pid, a, b)])[0]  # embeds only what the default keeps
    assert not o.embeds_all
    assert pipe.finish(o).to_json() == pipe.diff(a, b, pid).to_json()
    with pytest.raises(ValueError, match="not\\s+embedded"):
        pipe.finish(o, {"det_thr": 0.0})


# ---- eval ------------------------------------------------------------------------------
def test_eval_end_to_end_without_torch(cached, tmp_path_factory, tiny_bundle, tmp_path):
    pipe, lab, fill = cached
    data = labelled_pairs(tmp_path_factory)
    out = tmp_path / "report"
    res = run_without_torch(["eval", str(fast_bundle(tmp_path_factory, tiny_bundle)), "--data", str(data),
                             "--csv", str(data / "labels.csv"), "--out", str(out), "--worst", "3",
                             "--cache", str(shared_cache(tmp_path_factory))])
    assert res.returncode == 0, res.stderr
    assert "0 pair(s) computed now" in (out / "report.md").read_text()  # every pair from the cache
    md = (out / "report.md").read_text()
    for part in ("## Metric", "| **mean** |", "most missed", "most wrongly predicted", "## Worst pairs",
                 "score_vs_change.png", "all \"none\""):
        assert part in md, part
    assert len(list((out / "worst").glob("*.png"))) == 3
    plot = cv2.imread(str(out / "score_vs_change.png"))
    assert plot is not None and plot.shape[1] > plot.shape[0]
    # its number is `sdrun score --normalize` of its predictions, and finish()'s
    res2 = run_without_torch(["score", str(out / "predictions.csv"), str(data / "labels.csv"),
                              "--normalize", "--json"])
    assert res2.returncode == 0, res2.stderr
    mean = json.loads(res2.stdout)["row_f1_mean"]
    assert f"{mean:.4f}" in res.stdout
    from sdrun.apps.tune import finish_score

    assert finish_score(pipe, fill.outputs, lab.truth, list(fill.outputs)).mean == pytest.approx(mean)
    # a validation split evaluates only its pairs
    res3 = run_without_torch(["eval", str(fast_bundle(tmp_path_factory, tiny_bundle)), "--data", str(data),
                              "--csv", str(data / "labels.csv"), "--out", str(tmp_path / "r2"), "--worst", "0",
                              "--val-frac", "0.25", "--cache", str(shared_cache(tmp_path_factory)), "--quiet"])
    assert res3.returncode == 0, res3.stderr
    assert "pairs: 2 (the validation split" in (tmp_path / "r2" / "report.md").read_text()
