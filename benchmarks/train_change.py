"""Does `sdexport train-change` learn? And what does an epoch cost on this machine?

Learning (tiny preset, per-class heads): train on synthetic labelled pairs, then on
HELD-OUT synthetic pairs (another seed, never seen in training or its validation) compare
the change logit's ROC-AUC and best F1 before training (the same seeded random init) and
after (best.safetensors), and the per-class heads' macro F1 (probability >= 0.5) against
predicting the training set's majority for every (column, label).

Cost: seconds per optimisation step (forward + backward + AdamW on --batch-size pairs,
augmentations and image loading included) for the tiny preset and the ViT-B/16
architecture (full-random: timm vit_base_patch16_224, the same compute as the pretrained
model), measured over a few steps, and the seconds per epoch of 1000 pairs they imply.

    python benchmarks/train_change.py                       # writes benchmarks/results/train_change.*
    python benchmarks/train_change.py --train-pairs 400 --heldout-pairs 240 --epochs 8
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (threads, before torch)
from common import RESULTS, machine, md_table, write_outputs

import numpy as np
import torch


def heldout_scores(model, rows, batch_size) -> dict:
    from torch.utils.data import DataLoader

    from sdexport.train.data import PairDataset, collate
    from sdexport.train.metrics import best_f1, macro_f1, roc_auc

    loader = DataLoader(PairDataset(rows, train=False, seed=0), batch_size=batch_size, collate_fn=collate)
    logits, ys, probs, cs = [], [], [], []
    model.eval()
    with torch.no_grad():
        for batch, _ in loader:
            _, x, y, c = batch
            out = model(x[:, 0], x[:, 1])
            logits.append(out[1].numpy())
            ys.append(y.numpy())
            if len(out) > 2:
                probs.append(torch.sigmoid(out[2]).numpy())
                cs.append(c.numpy())
    logit, y = np.concatenate(logits), np.concatenate(ys)
    out = {"auc": roc_auc(y, logit), "best_f1": best_f1(y, logit)[0], "pairs": int(len(y)),
           "positives": int(y.sum())}
    if probs:
        out["class_macro_f1"] = macro_f1(np.concatenate(cs), np.concatenate(probs) >= 0.5)
    return out


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-pairs", type=int, default=400)
    ap.add_argument("--heldout-pairs", type=int, default=240)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--timing-steps", type=int, default=3)
    ap.add_argument("--skip-vit-b", action="store_true", help="time the tiny preset only")
    ap.add_argument("--name", default="train_change")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()

    from safetensors.torch import load_file

    from sdexport.models.siamese import SiameseViTChange, backbone_for
    from sdexport.sources import parse_source
    from sdexport.train.data import read_rows
    from sdexport.train.loop import TrainConfig, train_change
    from sdexport.train.metrics import macro_f1
    from sdrun.apps.synth import CLASSES, write_synthetic_pairs
    from sdrun.bundle.vocab import normalize_label

    work = Path(tempfile.mkdtemp(prefix="train-bench-"))
    train_dir, held_dir = work / "train", work / "heldout"
    write_synthetic_pairs(train_dir, args.train_pairs, seed=21)
    write_synthetic_pairs(held_dir, args.heldout_pairs, seed=22)
    cfg = TrainConfig(data=str(train_dir), csv=str(train_dir / "labels.csv"), backbone="tiny-random",
                      heads="per-class", epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      vocab=sorted({normalize_label(c) for c in CLASSES}))  # every label synth draws
    t0 = time.perf_counter()
    best = train_change(cfg, work / "run", progress=False, log=lambda m: print(m, file=sys.stderr))
    train_seconds = time.perf_counter() - t0
    vocab = json.loads((work / "run" / "vocabulary.json").read_text())
    held_rows, _ = read_rows(held_dir, held_dir / "labels.csv", vocab, lambda m: None)

    torch.manual_seed(cfg.seed)  # the initialisation train_change starts from
    before = SiameseViTChange(backbone_for(parse_source("siamese", "tiny-random", None)), n_labels=len(vocab))
    after = SiameseViTChange(backbone_for(parse_source("siamese", "tiny-random", None)), n_labels=len(vocab))
    after.load_state_dict(load_file(str(work / "run" / "best.safetensors")))
    s_before = heldout_scores(before, held_rows, args.batch_size)
    s_after = heldout_scores(after, held_rows, args.batch_size)
    train_rows, _ = read_rows(train_dir, train_dir / "labels.csv", vocab, lambda m: None)
    majority = np.mean([r.classes for r in train_rows], axis=0) >= 0.5
    held_truth = np.stack([r.classes for r in held_rows])
    majority_f1 = macro_f1(held_truth, np.broadcast_to(majority, held_truth.shape))
    metrics = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]

    timing = {"tiny-random": step_seconds("tiny-random", train_dir, args.batch_size, args.timing_steps)}
    if not args.skip_vit_b:
        timing["vit_base_patch16_224 (full-random)"] = step_seconds("full-random", train_dir, args.batch_size,
                                                                    args.timing_steps)
    report = {"machine": machine(), "args": vars(args) | {"out_dir": str(args.out_dir)},
              "train_seconds": round(train_seconds, 1), "best_epoch": best.get("epoch"),
              "heldout": {"before": s_before, "after": s_after, "majority_class_macro_f1": majority_f1},
              "epochs": metrics,
              "step_seconds": timing,
              "epoch_seconds_per_1000_pairs": {k: v * 1000 / args.batch_size for k, v in timing.items()}}
    def fmt(v):
        return "-" if v is None else f"{v:.3f}"
    md = [f"# train-change: learning and cost ({report['machine']['cpu']}, {report['machine']['threads']} threads)",
          "", f"Tiny preset with per-class heads, {args.train_pairs} synthetic training pairs (seed 21, 20% of "
          f"them for its validation), {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}; "
          f"scored on {s_after['pairs']} held-out synthetic pairs (seed 22, {s_after['positives']} with a change). "
          f"Training took {train_seconds:.0f} s; best epoch {best.get('epoch')}.", "",
          md_table(["held-out", "before training", "after training"],
                   [["change logit ROC-AUC", fmt(s_before["auc"]), fmt(s_after["auc"])],
                    ["change logit best F1", fmt(s_before["best_f1"]), fmt(s_after["best_f1"])],
                    ["per-class heads macro F1 (p >= 0.5)", fmt(s_before.get("class_macro_f1")),
                     fmt(s_after.get("class_macro_f1"))],
                    ["training-set majority, macro F1", fmt(majority_f1), fmt(majority_f1)]]), "",
          "Seconds per training step (forward + backward + AdamW, augmentation and loading included), "
          "median of the measured steps, and the epoch of 1000 pairs it implies:", "",
          md_table(["backbone", f"s / step of {args.batch_size} pairs", "s / epoch of 1000 pairs"],
                   [[k, f"{v:.2f}", f"{v * 1000 / args.batch_size:.0f}"] for k, v in timing.items()])]
    write_outputs(args.out_dir, args.name, report, "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
