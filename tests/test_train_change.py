"""`sdexport train-change`: the notebook's change model trained on labelled pairs, built into
a bundle, resumed after a kill, with per-class heads through export, runtime and tune."""
from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("albumentations")

from conftest import TRAIN_TINY as TINY  # noqa: E402
from conftest import train_change as train  # noqa: E402

from sdexport.train.losses import focal_loss_with_logits  # noqa: E402
from sdexport.train.metrics import best_f1, macro_f1, roc_auc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pairs(train_pairs):
    return train_pairs


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# ---- the pieces against their definitions ---------------------------------------
def test_metrics_equal_their_definitions():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.random(30) < 0.4
        s = np.round(rng.standard_normal(30), 1)  # ties on purpose
        pos, neg = s[y], s[~y]
        pairwise = np.mean([(p > q) + 0.5 * (p == q) for p, q in itertools.product(pos, neg)])
        assert roc_auc(y, s) == pytest.approx(pairwise, abs=1e-12)
        brute = max((2 * (y & (s >= t)).sum() / ((s >= t).sum() + y.sum()), t) for t in np.unique(s))
        assert best_f1(y, s)[0] == pytest.approx(brute[0], abs=1e-12)
    assert roc_auc(np.ones(4, bool), np.arange(4)) is None
    assert macro_f1(np.array([[1, 0, 0], [0, 1, 0]]),
                    np.array([[1, 0, 0], [1, 0, 0]])) == pytest.approx((2 / 3 + 0) / 2)


def test_focal_loss_is_the_notebooks():
    logits = torch.tensor([[-2.0, 0.3], [1.5, 4.0]])
    targets = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    p = torch.sigmoid(logits)
    bce = -(targets * torch.log(p) + (1 - targets) * torch.log(1 - p))
    expected = (0.25 * (1 - torch.exp(-bce)) ** 2 * bce).mean()
    assert float(focal_loss_with_logits(logits, targets)) == pytest.approx(float(expected), rel=1e-6)


def test_geometric_augmentation_is_drawn_once_per_pair(pairs):
    """Departure: flip and affine are drawn once and applied to both images (the notebook
    draws them per image); colour jitter and dropout stay per image; tensors in [0, 1]."""
    from sdexport.train.data import PairDataset, item_seed, read_rows, transforms
    from sdrun.stages.images import load_image

    rows, _ = read_rows(pairs, pairs / "labels.csv", None, lambda m: None)
    img = load_image(rows[0].a)
    geometric, photometric, _ = transforms()
    moved = 0
    for i in range(40):
        geometric.set_random_seed(item_seed(3, 1, i))
        out = geometric(image=img, image2=img)
        assert np.array_equal(out["image"], out["image2"])  # one draw for both
        moved += not np.array_equal(out["image"], geometric(image=img, image2=img)["image"])
    assert moved > 10  # and the draws do vary
    ds = PairDataset(rows, train=True, seed=3)
    ds.epoch = 2
    _, x, _, _ = ds[5]
    assert x.dtype == np.float32 and x.shape == (2, 3, 224, 224) and 0.0 <= x.min() and x.max() <= 1.0
    again = PairDataset(rows, train=True, seed=3)
    again.epoch = 2
    assert np.array_equal(again[5][1], x)  # a function of (seed, epoch, index)
    again.epoch = 3
    assert not np.array_equal(again[5][1], x)


# ---- acceptance: two epochs, a bundle that checks, resume ---------------------------
def test_two_epochs_in_under_a_minute_build_and_check(pairs, tmp_path):
    from sdexport.build import build_bundle, resolve_sources
    from sdrun.apps.check import check_bundle
    from sdrun.bundle.bundle import Bundle
    from sdrun.bundle.vocab import default_vocabulary

    t0 = time.perf_counter()
    res = train("--data", pairs, "--csv", pairs / "labels.csv", "--out", tmp_path / "run",
                "--epochs", "2", *TINY)
    seconds = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    assert seconds < 60, seconds
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1, 2]
    for m in lines[1:]:
        assert np.isfinite(m["train_loss"]) and np.isfinite(m["val_loss"]) and 0 <= m["val_best_f1"] <= 1
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert len(split["val"]) == round(0.2 * 32) and not set(split["val"]) & set(split["train"])
    sd = tensors(tmp_path / "run" / "best.safetensors")
    assert any(k.startswith("backbone.") for k in sd) and "head.0.weight" in sd and "head.2.weight" in sd

    out = tmp_path / "bundle"
    sources = resolve_sources("tiny-random", {"gdino": "none"})
    build_bundle(out, sources, default_vocabulary(), siamese_ckpt=tmp_path / "run" / "best.safetensors",
                 log=lambda s: None)
    b = Bundle.load(out)
    assert b.model("siamese")["source"]["head"] == str(tmp_path / "run" / "best.safetensors")
    checks = list(check_bundle(b))
    assert checks and all(c.ok for c in checks)
    # the bundle's graph computes the trained head: its logit differs from the random init's
    from sdexport.models.siamese import SiameseViTChange, backbone_for
    from sdexport.sources import parse_source

    torch.manual_seed(0)
    model = SiameseViTChange(backbone_for(parse_source("siamese", "tiny-random", None))).eval()
    model.load_state_dict(sd)
    golden = b.arrays(b.model("siamese")["golden_file"])
    x = torch.from_numpy(golden["random__pair__in__pairs"])
    with torch.no_grad():
        _, logit = model(x[:, 0], x[:, 1])
    np.testing.assert_allclose(golden["random__pair__out__logit"], logit.numpy(), rtol=1e-5, atol=1e-6)


def test_resume_after_a_kill_gives_the_same_weights(pairs, tmp_path):
    args = ["--data", pairs, "--csv", pairs / "labels.csv", "--epochs", "3", *TINY]
    res = train(*args, "--out", tmp_path / "straight")
    assert res.exit_code == 0, res.output

    killed = tmp_path / "killed"
    code = ("import sys\nfrom sdexport.cli import main\nsys.argv = ['sdexport', 'train-change'] + "
            f"{[str(a) for a in args] + ['--out', str(killed)]!r}\nmain()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL, cwd=ROOT)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill during epoch 2, after epoch 1's checkpoint
        if metrics.exists() and '"epoch": 1' in metrics.read_text() and (killed / "last.pt").exists():
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [json.loads(x)["epoch"] for x in metrics.read_text().splitlines()]
    assert 1 in done and 3 not in done, done
    res = train(*args, "--out", killed, "--resume")
    assert res.exit_code == 0, res.output
    assert "resuming" in res.output
    a, b = tensors(tmp_path / "straight" / "best.safetensors"), tensors(killed / "best.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    lb = torch.load(killed / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(la[k], lb[k]) for k in la)
    def strip(p):
        return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in p.read_text().splitlines()]
    assert strip(tmp_path / "straight" / "metrics.jsonl") == strip(metrics)


# ---- per-class heads: train, export, runtime, tune ---------------------------------
def test_per_class_heads_through_export_runtime_and_tune(pairs, tmp_path):
    from sdexport.build import build_bundle, resolve_sources
    from sdrun.apps.evaluate import load_labelled
    from sdrun.apps.tune import run_tune
    from sdrun.bundle.vocab import vocabulary_from_csv
    from sdrun.pipeline import Pipeline

    run = tmp_path / "run"
    res = train("--data", pairs, "--csv", pairs / "labels.csv", "--out", run, "--epochs", "1",
                "--heads", "per-class", *TINY)
    assert res.exit_code == 0, res.output
    vocab = json.loads((run / "vocabulary.json").read_text())
    assert vocab == vocabulary_from_csv(pairs / "labels.csv")
    sd = tensors(run / "best.safetensors")
    assert sd["class_head.2.weight"].shape[0] == 3 * len(vocab)
    assert "val_class_macro_f1" in json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])

    out = tmp_path / "bundle"
    build_bundle(out, resolve_sources("tiny-random", {"gdino": "none"}), vocab,
                 siamese_ckpt=run / "best.safetensors", log=lambda s: None)  # golden check included
    pipe = Pipeline.load(out)
    data = pairs / "data"
    r = pipe.diff(data / "10000_1.png", data / "10000_2.png", "10000")
    assert set(r.class_probs) == {"added", "removed", "changed"}
    assert list(r.class_probs["added"]) == vocab
    assert all(0.0 <= v <= 1.0 for col in r.class_probs.values() for v in col.values())
    assert "class_probs" in r.to_json()
    heads_only = pipe.finish(pipe.model_outputs([("10000", data / "10000_1.png", data / "10000_2.png")])[0],
                             {"class_mode": "heads", "class_thr_added": 0.0})
    assert heads_only.added == sorted(vocab)  # every label reaches probability 0

    lab = load_labelled(pairs, pairs / "labels.csv", normalize=True)
    s = run_tune(pipe, lab, val_frac=0.25, seed=0, cache_dir=tmp_path / "cache", progress=False,
                 grid={"det_thr": [0.25], "iou_thr": [0.5], "alpha": [0.5], "heat_lambda": [0.8],
                       "heat_th": [0.5], "gate_quantiles": [], "gate_signals": []})
    assert s.heads and {h.mode for h in s.heads} == {"off", "detectors", "heads"}
    assert s.heads[0].train == max(h.train for h in s.heads)
    assert s.best_train_exact == pytest.approx(s.heads[0].train, abs=1e-9)  # finish agrees with the sweep


def test_a_checkpoint_with_another_vocabulary_is_refused(pairs, tmp_path):
    from sdexport.build import build_bundle, resolve_sources
    from sdexport.sources import SourceError
    from sdrun.bundle.vocab import default_vocabulary

    run = tmp_path / "run"
    assert train("--data", pairs, "--csv", pairs / "labels.csv", "--out", run, "--epochs", "1",
                 "--heads", "per-class", *TINY).exit_code == 0
    with pytest.raises(SourceError, match="another vocabulary"):
        build_bundle(tmp_path / "b", resolve_sources("tiny-random", {"gdino": "none"}),
                     default_vocabulary(), siamese_ckpt=run / "best.safetensors", log=lambda s: None)


# ---- bad input ----------------------------------------------------------------------
def test_bad_training_input_is_named(pairs, tmp_path):
    import shutil

    csv = pairs / "labels.csv"
    rows = csv.read_text().splitlines()
    some = tmp_path / "some.csv"  # two ids without images: left out, with a warning
    some.write_text("\n".join(rows + ["90001,car,none,none", "90002,none,none,none"]) + "\n")
    res = train("--data", pairs, "--csv", some, "--out", tmp_path / "r1", "--epochs", "1", *TINY)
    assert res.exit_code == 0 and "2 row(s)" in res.output and "90001, 90002" in res.output, res.output

    none = tmp_path / "none.csv"
    none.write_text(rows[0] + "\n90001,car,none,none\n")
    res = train("--data", pairs, "--csv", none, "--out", tmp_path / "r2", *TINY)
    assert res.exit_code == 2 and f"{none}: no row has both images" in res.output

    res = train("--data", pairs, "--csv", csv, "--out", tmp_path / "r3", "--heads", "per-class",
                "--vocab", "person,car", *TINY)
    assert res.exit_code == 2 and "not in the vocabulary" in res.output and str(csv) in res.output

    res = train("--data", pairs, "--csv", csv, "--out", tmp_path / "r4", "--val-frac", "0.001", *TINY)
    assert res.exit_code == 2 and "leaves no validation pair" in res.output

    broken = tmp_path / "broken"  # an unreadable image: skipped and counted, never fatal
    shutil.copytree(pairs, broken)
    (broken / "data" / "10003_2.png").write_bytes(b"not a png")
    res = train("--data", broken, "--csv", broken / "labels.csv", "--out", tmp_path / "r5",
                "--epochs", "1", *TINY)
    assert res.exit_code == 0, res.output
    assert "10003_2.png" in res.output
    last = json.loads((tmp_path / "r5" / "metrics.jsonl").read_text().splitlines()[-1])
    split = json.loads((tmp_path / "r5" / "split.json").read_text())
    if "10003" in split["train"]:
        assert last["skipped_pairs"] >= 1
    else:
        assert last["val_pairs"] == len(split["val"]) - 1

    res = train("--data", pairs, "--csv", csv, "--out", tmp_path / "r1", "--epochs", "1", *TINY)
    assert res.exit_code == 2 and "add --resume" in res.output
    res = train("--data", pairs, "--csv", some, "--out", tmp_path / "r1", "--epochs", "1", "--lr", "0.01",
                "--resume", *TINY)
    assert res.exit_code == 2 and "another configuration" in res.output and "lr 0.0001 there, 0.01 now" in res.output



def test_the_patch_diff_head_trains_and_builds_into_a_bundle(pairs, tmp_path):
    """`--head patch-diff` (docs/departures.md): trained, recorded in the checkpoint's keys,
    built into a bundle whose Siamese graph gives PyTorch's answers (its golden check, and
    the golden logit against the trained model here)."""
    from sdexport.build import build_bundle, resolve_sources
    from sdexport.models.siamese import SiameseViTChange, backbone_for, head_of_state_dict
    from sdexport.sources import parse_source
    from sdrun.apps.check import check_bundle
    from sdrun.bundle.bundle import Bundle
    from sdrun.bundle.vocab import default_vocabulary

    res = train("--data", pairs, "--csv", pairs / "labels.csv", "--out", tmp_path / "run",
                "--head", "patch-diff", "--epochs", "1", *TINY)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["head"] == "patch-diff"
    sd = tensors(tmp_path / "run" / "best.safetensors")
    assert head_of_state_dict(sd)[0] == "patch-diff" and "head.0.weight" not in sd
    model = SiameseViTChange(backbone_for(parse_source("siamese", "tiny-random", None)), head="patch-diff")
    model.load_state_dict(sd)

    out = tmp_path / "bundle"
    build_bundle(out, resolve_sources("tiny-random", {"gdino": "none"}), default_vocabulary(),
                 siamese_ckpt=tmp_path / "run" / "best.safetensors", log=lambda s: None)
    b = Bundle.load(out)
    assert b.model("siamese")["change_head"] == "patch-diff"
    checks = list(check_bundle(b))
    assert checks and all(c.ok for c in checks)
    golden = b.arrays(b.model("siamese")["golden_file"])
    for case in ("image", "random"):
        x = torch.from_numpy(golden[f"{case}__pair__in__pairs"])
        with torch.no_grad():
            heat, logit = model.eval()(x[:, 0], x[:, 1])
        np.testing.assert_allclose(golden[f"{case}__pair__out__logit"], logit.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(golden[f"{case}__pair__out__heat"], heat.numpy(), rtol=1e-5, atol=1e-6)
    resumed = train("--data", pairs, "--csv", pairs / "labels.csv", "--out", tmp_path / "run",
                    "--epochs", "1", "--resume", *TINY)  # the notebook's head: not the run's
    assert resumed.exit_code != 0 and "head" in resumed.output


# ---- it learns ---------------------------------------------------------------------
def test_training_learns_on_held_out_pairs(tmp_path):
    """On a small easy case (240 synthetic pairs for training, 120 held out from another
    seed, the tiny backbone with the patch-diff head, BCE, every pair once per epoch) the
    held-out change-logit ROC-AUC after training beats the untrained model's (the same
    seeded initialisation) by at least 0.15, and the training loss falls. Seeded: the same
    numbers on every run of one machine; the margin is what CPU kinds may move."""
    from torch.utils.data import DataLoader

    from sdexport.models.siamese import SiameseViTChange, backbone_for
    from sdexport.sources import parse_source
    from sdexport.train.data import PairDataset, collate, read_rows
    from sdexport.train.loop import evaluate
    from sdrun.apps.synth import write_synthetic_pairs

    train_dir, held_dir = tmp_path / "train", tmp_path / "held"
    write_synthetic_pairs(train_dir, 300, seed=31)  # 240 to train on, 60 for train-change's validation
    write_synthetic_pairs(held_dir, 120, seed=32)
    t0 = time.perf_counter()
    res = train("--data", train_dir, "--csv", train_dir / "labels.csv", "--out", tmp_path / "run",
                "--head", "patch-diff", "--loss", "bce", "--sampler", "shuffle", "--lr", "1e-3",
                "--epochs", "5", "--backbone", "tiny-random", "--batch-size", "16", "--quiet")
    seconds = time.perf_counter() - t0
    assert res.exit_code == 0, res.output

    rows, _ = read_rows(held_dir, held_dir / "labels.csv", None, lambda m: None)
    assert 0 < sum(r.change for r in rows) < len(rows)
    loader = DataLoader(PairDataset(rows, train=False, seed=0), batch_size=16, collate_fn=collate)

    def held_out_auc(state: dict | None) -> float:
        torch.manual_seed(0)  # train-change's --seed: the initialisation it starts from
        model = SiameseViTChange(backbone_for(parse_source("siamese", "tiny-random", None)), head="patch-diff")
        if state is not None:
            model.load_state_dict(state)
        return evaluate(model, loader, per_class=False, warn=lambda m: None, loss="bce")["val_auc"]

    before = held_out_auc(None)
    after = held_out_auc(tensors(tmp_path / "run" / "best.safetensors"))
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [e["train_loss"] for e in epochs[1:]]
    print(f"held-out AUC {before:.3f} -> {after:.3f}; train loss {losses}; {seconds:.0f} s")
    assert after >= before + 0.15, (before, after)
    assert losses[-1] < losses[0], losses


def test_small_random_is_a_siamese_preset_between_tiny_and_b16():
    from sdexport.models.siamese import backbone_for
    from sdexport.sources import parse_source

    source = parse_source("siamese", "small-random", None, option="--backbone")
    assert source.is_random
    vit = backbone_for(source)
    assert (vit.num_features, len(vit.blocks), vit.patch_embed.grid_size) == (192, 4, (14, 14))
    assert parse_source("owlvit", "small-random", None).kind == "hub"  # the Siamese ViT's only


def test_an_unknown_loss_or_sampler_is_named(pairs, tmp_path):
    from sdexport.train.loop import TrainConfig, TrainError, train_change

    for option, value in (("loss", "mse"), ("sampler", "weighted")):
        cfg = TrainConfig(data=str(pairs), csv=str(pairs / "labels.csv"), backbone="tiny-random",
                          **{option: value})
        with pytest.raises(TrainError, match=f"--{option} '{value}': choose one of"):
            train_change(cfg, tmp_path / "run", progress=False)
        assert not (tmp_path / "run").exists()
