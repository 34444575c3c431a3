"""Does `sdexport train-change` learn? Per epoch, on held-out synthetic pairs, against the
untrained model and the majority; both change heads; and does `sdrun tune` then use the heads?

Training: `--train-pairs` synthetic pairs (`sdrun synth`, seed 21; 20% of them are
train-change's own validation split), per-class heads over synth's 8 labels, one epoch per
`train_change(..., stop_after=1)` call (a resumed run repeats the uninterrupted one exactly),
until `--epochs` or the `--budget-minutes` of training time would be passed. Each contender
starts from the same seeded random initialisation.

Scoring: after every epoch, on `--heldout-pairs` pairs of another seed (22, never seen in
training): the change logit's ROC-AUC and best F1, and the per-class heads' macro F1
(probability >= 0.5) against the training set's majority for every (column, label) and
against the untrained model (epoch 0).

Tune (`--tune`): the first contender's best checkpoint is built into a bundle (tiny
detectors: random, so the heads are the only informed label source) and `sdrun tune` runs
on the held-out pairs: which head mode it picks (off, confirming the detectors, or the heads
alone) and the metric of each on its train and validation split.

Cost: seconds per optimisation step (forward + backward + AdamW, augmentation and loading
included) of each backbone, and the seconds per epoch of 1000 pairs they imply.

    python benchmarks/train_change.py                 # writes benchmarks/results/train_change.*
    python benchmarks/train_change.py --train-pairs 300 --heldout-pairs 100 --epochs 2 \\
        --backbone tiny-random --contenders patch-diff --name train_change_smoke
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (threads, before torch)
from common import RESULTS, machine, md_table, pyplot, save_figure, save_partial, write_outputs

import numpy as np
import torch

# name -> (change head, loss, sampler): the notebook's recipe, and patch-diff with the
# options that let it learn in CPU minutes (docs/departures.md)
CONTENDERS = {
    "patch-diff": ("patch-diff", "bce", "shuffle"),
    "notebook": ("notebook", "focal", "balanced"),
    "patch-diff-focal": ("patch-diff", "focal", "balanced"),
    "notebook-bce": ("notebook", "bce", "shuffle"),
}
TRAIN_SEED, HELDOUT_SEED = 21, 22


def heldout_scores(model, rows, batch_size: int, loss: str) -> dict:
    """train-change's own validation metrics (sdexport.train.loop.evaluate) on `rows`."""
    from torch.utils.data import DataLoader

    from sdexport.train.data import PairDataset, collate
    from sdexport.train.loop import evaluate

    loader = DataLoader(PairDataset(rows, train=False, seed=0), batch_size=batch_size, collate_fn=collate)
    out = evaluate(model, loader, per_class=True, warn=lambda m: None, loss=loss)
    return {"loss": out["val_loss"], "auc": out["val_auc"], "best_f1": out["val_best_f1"],
            "class_macro_f1": out["val_class_macro_f1"]}


def train_contender(name: str, args, train_dir: Path, held_rows, vocab: list[str], work: Path,
                    log) -> dict:
    from sdexport.models.siamese import SiameseViTChange, backbone_for
    from sdexport.sources import parse_source
    from sdexport.train.loop import TrainConfig, train_change

    head, loss, sampler = CONTENDERS[name]
    cfg = TrainConfig(data=str(train_dir), csv=str(train_dir / "labels.csv"), backbone=args.backbone,
                      heads="per-class", head=head, loss=loss, sampler=sampler, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, vocab=vocab)
    run = work / f"run-{name}"
    model = SiameseViTChange(backbone_for(parse_source("siamese", args.backbone, None)),
                             n_labels=len(vocab), head=head)

    torch.manual_seed(cfg.seed)  # the initialisation train_change starts from
    untrained = SiameseViTChange(backbone_for(parse_source("siamese", args.backbone, None)),
                                 n_labels=len(vocab), head=head)
    epochs = [{"epoch": 0, "train_seconds": 0.0,
               "heldout": heldout_scores(untrained, held_rows, args.batch_size, loss)}]
    log(f"{name}: untrained: {epochs[0]['heldout']}")
    spent, budget = 0.0, args.budget_minutes * 60
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        train_change(cfg, run, resume=epoch > 1, progress=False, stop_after=1, log=lambda m: None)
        seconds = time.perf_counter() - t0
        spent += seconds
        record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        model.load_state_dict(torch.load(run / "last.pt", weights_only=True)["model"])
        epochs.append({"epoch": epoch, "train_seconds": round(spent, 1), "train_loss": record["train_loss"],
                       "val_loss": record["val_loss"], "val_auc": record["val_auc"],
                       "heldout": heldout_scores(model, held_rows, args.batch_size, loss)})
        log(f"{name}: epoch {epoch} ({spent:.0f} s): loss {record['train_loss']:.4f}, held-out "
            f"{epochs[-1]['heldout']}")
        if spent + seconds > budget and epoch < args.epochs:
            log(f"{name}: stopping after epoch {epoch}: another epoch would pass the "
                f"{args.budget_minutes} min budget")
            break
    best = json.loads((run / "best.json").read_text())
    return {"head": head, "loss": loss, "sampler": sampler, "epochs": epochs, "best_epoch": best["epoch"],
            "checkpoint": str(run / "best.safetensors")}


def tune_with_heads(checkpoint: str, vocab: list[str], backbone: str, held_dir: Path, work: Path,
                    pairs: int) -> dict:
    """Build the checkpoint into a tiny bundle and run `sdrun tune` on the first `pairs`
    held-out pairs (the sweep's time grows with the pairs times their candidate boxes, and
    random detectors give many)."""
    rows = (held_dir / "labels.csv").read_text().splitlines()
    csv = work / "tune-labels.csv"
    csv.write_text("\n".join(rows[:pairs + 1]) + "\n")
    bundle = work / "bundle"
    bin_dir = Path(sys.executable).parent
    subprocess.run([str(bin_dir / "sdexport"), "-q", "build", "--preset", "tiny-random", "--siamese", backbone,
                    "--siamese-ckpt", checkpoint, "--vocab", ",".join(vocab), "--out", str(bundle)],
                   check=True, stdout=subprocess.DEVNULL)
    report = work / "tune.json"
    t0 = time.perf_counter()
    subprocess.run([str(bin_dir / "sdrun"), "tune", str(bundle), "--data", str(held_dir),
                    "--csv", str(csv), "--json", str(report), "--quiet"],
                   check=True, stdout=subprocess.DEVNULL)
    out = json.loads(report.read_text())
    return {"seconds": round(time.perf_counter() - t0, 1), "heads": out["class_heads"],
            "best": out["best"], "all_none": out["all_none"], "pairs": out["pairs"]}


def step_seconds(backbone: str, data: Path, batch_size: int, steps: int) -> float:
    """Median seconds of one training step (after one warm-up step)."""
    from torch.utils.data import DataLoader

    from sdexport.models.siamese import SiameseViTChange, backbone_for
    from sdexport.sources import parse_source
    from sdexport.train.data import PairDataset, collate, read_rows
    from sdexport.train.losses import focal_loss_with_logits

    rows, _ = read_rows(data, data / "labels.csv", None, lambda m: None)
    torch.manual_seed(0)
    model = SiameseViTChange(backbone_for(parse_source("siamese", backbone, None))).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = DataLoader(PairDataset(rows, train=True, seed=0), batch_size=batch_size, shuffle=True,
                        collate_fn=collate)
    times = []
    for k, (batch, _) in enumerate(loader):
        if k > steps:
            break
        t0 = time.perf_counter()
        _, x, y, _ = batch
        loss = focal_loss_with_logits(model(x[:, 0], x[:, 1])[1], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def markdown(report: dict) -> str:
    a = report["args"]
    lines = [f"# train-change: does it learn? ({report['machine']['cpu']}, {report['machine']['threads']} threads)",
             "", f"Backbone `{a['backbone']}` (random init), per-class heads over synth's "
             f"{len(report['vocabulary'])} labels; {a['train_pairs']} synthetic training pairs (seed {TRAIN_SEED}, "
             f"20% of them train-change's validation), batch {a['batch_size']}, peak lr {a['lr']} (warm-up 10%, "
             f"cosine), at most {a['epochs']} epochs or {a['budget_minutes']} min of training each. Scored on "
             f"{report['heldout_pairs']} held-out pairs (seed {HELDOUT_SEED}, {report['heldout_positives']} with "
             "a change). Macro F1: the per-class heads at probability >= 0.5, over the (column, label) "
             f"cells that occur; the training set's majority (no label anywhere) scores "
             f"{fmt(report['majority_class_macro_f1'])}.", ""]
    rows = []
    for name, c in report["contenders"].items():
        first, last = c["epochs"][0]["heldout"], c["epochs"][-1]["heldout"]
        best = max(c["epochs"][1:], key=lambda e: e["heldout"]["auc"] or 0)
        rows.append([f"{name} ({c['head']}, {c['loss']}, {c['sampler']})", str(len(c["epochs"]) - 1),
                     f"{c['epochs'][-1]['train_seconds'] / 60:.1f}", fmt(first["auc"]), fmt(last["auc"]),
                     fmt(best["heldout"]["auc"]), fmt(first["best_f1"]), fmt(last["best_f1"]),
                     fmt(first["class_macro_f1"]), fmt(last["class_macro_f1"])])
    lines += [md_table(["contender (head, loss, sampler)", "epochs", "train min", "AUC untrained",
                        "AUC last", "AUC best epoch", "best F1 untrained", "best F1 last",
                        "macro F1 untrained", "macro F1 last"], rows), ""]
    for name, c in report["contenders"].items():
        lines += [f"## {name}: per epoch", "",
                  md_table(["epoch", "train s (cumulative)", "train loss", "val loss", "held-out AUC",
                            "held-out best F1", "held-out macro F1"],
                           [[str(e["epoch"]), f"{e['train_seconds']:.0f}", fmt(e.get("train_loss")),
                             fmt(e.get("val_loss")), fmt(e["heldout"]["auc"]), fmt(e["heldout"]["best_f1"]),
                             fmt(e["heldout"]["class_macro_f1"])] for e in c["epochs"]]), ""]
    t = report.get("tune")
    if t:
        lines += [f"## sdrun tune on {sum(t['pairs'].values())} held-out pairs ({report['tune_contender']}'s "
                  "best checkpoint, tiny random detectors)", "",
                  md_table(["head mode", "metric (tune's train split)", "metric (its validation split)"],
                           [[h["mode"], fmt(h["train"]), fmt(h["val"])] for h in t["heads"]]), "",
                  f"Picked: **{t['heads'][0]['mode']}** (best on the train split first); gain over heads off: "
                  f"{report['tune_gain']['train']:+.3f} (train), {fmt(report['tune_gain']['val'])} (validation).", ""]
    if report.get("step_seconds"):
        lines += ["Seconds per training step (median), and the epoch of 1000 pairs it implies:", "",
                  md_table(["backbone", f"s / step of {a['batch_size']} pairs", "s / epoch of 1000 pairs"],
                           [[k, f"{v:.2f}", f"{v * 1000 / a['batch_size']:.0f}"]
                            for k, v in report["step_seconds"].items()])]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, c in report["contenders"].items():
        ep = [e["epoch"] for e in c["epochs"]]
        axes[0].plot(ep[1:], [e["train_loss"] for e in c["epochs"][1:]], marker="o", label=name)
        axes[1].plot(ep, [e["heldout"]["auc"] for e in c["epochs"]], marker="o", label=name)
        axes[2].plot(ep, [e["heldout"]["class_macro_f1"] for e in c["epochs"]], marker="o", label=name)
    axes[1].axhline(0.9, color="grey", ls=":", label="target 0.90")
    axes[2].axhline(0.5, color="grey", ls=":", label="target 0.5")
    axes[2].axhline(report["majority_class_macro_f1"], color="black", ls="--", label="majority")
    for ax, title in zip(axes, ("train loss", "held-out change-logit ROC-AUC", "held-out per-class macro F1")):
        ax.set_title(title)
        ax.set_xlabel("epoch (0: untrained)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-pairs", type=int, default=2000)
    ap.add_argument("--heldout-pairs", type=int, default=500)
    ap.add_argument("--backbone", default="small-random")
    ap.add_argument("--contenders", default="patch-diff,notebook",
                    help=f"comma-separated, from {', '.join(CONTENDERS)}; the first is tuned")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--budget-minutes", type=float, default=20.0,
                    help="training time per contender (no epoch is started that would pass it)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--no-tune", action="store_true", help="leave out the sdrun tune step")
    ap.add_argument("--tune-pairs", type=int, default=150, help="held-out pairs sdrun tune runs on")
    ap.add_argument("--timing-steps", type=int, default=3)
    ap.add_argument("--timing", default="tiny-random,small-random,full-random",
                    help="backbones to time a step of ('' for none)")
    ap.add_argument("--name", default="train_change")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    names = [n for n in args.contenders.split(",") if n]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown or not names:
        ap.error(f"--contenders: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(CONTENDERS)}")

    from sdexport.train.data import read_rows
    from sdexport.train.metrics import macro_f1
    from sdrun.apps.synth import CLASSES, write_synthetic_pairs
    from sdrun.bundle.vocab import normalize_label

    def log(m):
        print(m, file=sys.stderr, flush=True)

    work = Path(tempfile.mkdtemp(prefix="train-bench-"))
    train_dir, held_dir = work / "train", work / "heldout"
    write_synthetic_pairs(train_dir, args.train_pairs, seed=TRAIN_SEED)
    write_synthetic_pairs(held_dir, args.heldout_pairs, seed=HELDOUT_SEED)
    vocab = sorted({normalize_label(c) for c in CLASSES})  # every label synth draws
    held_rows, _ = read_rows(held_dir, held_dir / "labels.csv", vocab, lambda m: None)
    train_rows, _ = read_rows(train_dir, train_dir / "labels.csv", vocab, lambda m: None)
    majority = np.mean([r.classes for r in train_rows], axis=0) >= 0.5
    held_truth = np.stack([r.classes for r in held_rows])
    report: dict = {
        "machine": machine(), "args": vars(args) | {"out_dir": str(args.out_dir)}, "vocabulary": vocab,
        "heldout_pairs": len(held_rows), "heldout_positives": int(sum(r.change > 0.5 for r in held_rows)),
        "majority_class_macro_f1": macro_f1(held_truth, np.broadcast_to(majority, held_truth.shape)),
        "contenders": {}}
    for name in names:
        report["contenders"][name] = train_contender(name, args, train_dir, held_rows, vocab, work, log)
        save_partial(args.out_dir, args.name, report)  # hours of training are not lost to a later step
    if not args.no_tune:
        first = report["contenders"][names[0]]
        t = tune_with_heads(first["checkpoint"], vocab, args.backbone, held_dir, work, args.tune_pairs)
        modes = {h["mode"]: h for h in t["heads"]}
        off = modes["off"]
        best = t["heads"][0]
        report["tune"], report["tune_contender"] = t, names[0]
        report["tune_gain"] = {"train": best["train"] - off["train"],
                               "val": None if best["val"] is None else best["val"] - off["val"]}
    timed = [b for b in args.timing.split(",") if b]
    report["step_seconds"] = {b: step_seconds(b, train_dir, args.batch_size, args.timing_steps) for b in timed}
    md = markdown(report)
    write_outputs(args.out_dir, args.name, report, md, lambda p: plot(report, p))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
