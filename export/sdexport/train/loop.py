"""Training the change model: AdamW with a linear warm-up and a cosine decay, the
notebook's focal loss, a class-balanced sampler, one validation per epoch.

A run folder holds:

    config.json        what was asked (compared on --resume)
    split.json         the training and validation ids
    metrics.jsonl      one line per epoch (epoch 0: before training)
    last.pt            model, optimizer and scheduler state after the last epoch
                       (plain tensors and numbers: read with torch.load(weights_only=True))
    best.safetensors   the best epoch's SiameseViTChange state dict (`backbone.*`, `head.*`,
                       and `class_head.*` with per-class heads), what
                       `sdexport build --siamese-ckpt` reads
    best.json          which epoch that was, and its metrics
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from sdrun.errors import SpotdiffError
from sdrun.files import atomic_write

from ..models.siamese import SiameseViTChange, backbone_for
from ..sources import parse_source
from .data import PairDataset, balanced_weights, collate, read_rows, split, write_split
from .losses import focal_loss_with_logits
from .metrics import best_f1, macro_f1, roc_auc

FORMAT = "spotdiff-train-change/1"


class TrainError(SpotdiffError):
    """A run that cannot start or resume; the message says what differs."""


@dataclass
class TrainConfig:
    data: str
    csv: str
    backbone: str = "vit_base_patch16_224"
    heads: str = "change"  # "change" or "per-class"
    epochs: int = 5
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_frac: float = 0.1
    val_frac: float = 0.2
    seed: int = 0
    vocab: list[str] | None = None  # per-class heads: None takes the CSV's labels
    size: list[int] = field(default_factory=lambda: [224, 224])

    def compared(self) -> dict:
        """What a resumed run must share with the one it resumes."""
        return {**asdict(self), "data": str(Path(self.data).resolve()), "csv": str(Path(self.csv).resolve())}


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _set_seed(seed: int, epoch: int) -> None:
    torch.manual_seed(int(np.random.SeedSequence((seed, epoch, 7)).generate_state(1)[0]))


def _loss(model_out, y, c, per_class: bool) -> torch.Tensor:
    loss = focal_loss_with_logits(model_out[1], y)
    if per_class:
        loss = loss + focal_loss_with_logits(model_out[2], c)
    return loss


def evaluate(model, loader, per_class: bool, warn, device: str = "cpu") -> dict:
    """Validation loss, ROC-AUC and best F1 of the change logit (and the heads' macro F1
    at probability 0.5), over the readable validation pairs."""
    model.eval()
    losses, logits, ys, probs, cs, weights = [], [], [], [], [], []
    with torch.no_grad():
        for batch, broken in loader:
            for i, err in broken:
                warn(f"warning: validation pair skipped: {err}")
            if batch is None:
                continue
            _, x, y, c = (t.to(device) for t in batch)
            out = model(x[:, 0], x[:, 1])
            losses.append(float(_loss(out, y, c, per_class)))
            weights.append(len(y))
            logits.append(out[1].cpu().numpy())
            ys.append(y.cpu().numpy())
            if per_class:
                probs.append(torch.sigmoid(out[2]).cpu().numpy())
                cs.append(c.cpu().numpy())
    if not ys:
        raise TrainError("no validation pair could be read")
    logit, y = np.concatenate(logits), np.concatenate(ys)
    f1, thr = best_f1(y, logit)
    out = {"val_loss": float(np.average(losses, weights=weights)), "val_auc": roc_auc(y, logit),
           "val_best_f1": f1, "val_best_f1_logit": thr, "val_pairs": int(len(y))}
    if per_class:
        out["val_class_macro_f1"] = macro_f1(np.concatenate(cs), np.concatenate(probs) >= 0.5)
    return out


def _state_for_build(model: SiameseViTChange) -> dict:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def train_change(cfg: TrainConfig, run_dir: str | Path, resume: bool = False, device: str = "cpu",
                 workers: int = 0, progress: bool = True,
                 log: Callable[[str], None] | None = None,
                 stop_after: int | None = None) -> dict:
    """Train (or resume) into `run_dir`; returns the best epoch's record. `stop_after`
    stops after that many epochs of this call (tests: a run interrupted between epochs)."""
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader, WeightedRandomSampler
    from tqdm import tqdm

    log = log or (lambda msg: print(msg, file=sys.stderr))
    run = Path(run_dir)
    config_path, last_path = run / "config.json", run / "last.pt"
    if cfg.heads not in ("change", "per-class"):
        raise TrainError(f"--heads {cfg.heads!r}: choose change or per-class")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA GPU is visible to torch")
    if resume and config_path.exists():
        before = json.loads(config_path.read_text())
        now = {"format": FORMAT, **cfg.compared()}
        diffs = [f"{k} {before.get(k)!r} there, {now.get(k)!r} now" for k in sorted(set(before) | set(now))
                 if before.get(k) != now.get(k)]
        if diffs:
            raise TrainError(f"--resume {run}: that run was started with another configuration "
                             f"({config_path}): " + "; ".join(diffs))
    elif not resume and last_path.exists():
        raise TrainError(f"{run}: holds a run already (last.pt); add --resume to continue it, "
                         "or choose another --out")
    run.mkdir(parents=True, exist_ok=True)

    per_class = cfg.heads == "per-class"
    rows, vocab = read_rows(cfg.data, cfg.csv, cfg.vocab if per_class else None, log)
    train_rows, val_rows = split(rows, cfg.val_frac, cfg.seed)  # both non-empty, or TrainDataError
    write_split(run / "split.json", train_rows, val_rows)
    atomic_write(config_path, json.dumps({"format": FORMAT, **cfg.compared()}, indent=2) + "\n")
    if per_class:
        atomic_write(run / "vocabulary.json", json.dumps(vocab) + "\n")

    torch.manual_seed(cfg.seed)
    source = parse_source("siamese", cfg.backbone, None)
    model = SiameseViTChange(backbone_for(source), n_labels=len(vocab) if per_class else 0).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_frac * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))

    train_set = PairDataset(train_rows, train=True, seed=cfg.seed, size=tuple(cfg.size))
    val_set = PairDataset(val_rows, train=False, seed=cfg.seed, size=tuple(cfg.size))
    val_loader = DataLoader(val_set, batch_size=cfg.batch_size, shuffle=False, num_workers=workers,
                            collate_fn=collate)
    metrics_path = run / "metrics.jsonl"
    start, best = 1, None
    if resume and last_path.exists():
        state = torch.load(last_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, best = int(state["epoch"]) + 1, json.loads(state["best"]) if state["best"] else None
        kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["epoch"] < start]
        atomic_write(metrics_path, "".join(line + "\n" for line in kept))
        log(f"resuming {run} after epoch {start - 1} of {cfg.epochs}")
    else:
        m0 = {"epoch": 0, **evaluate(model, val_loader, per_class, log, device), "seconds": 0.0}
        atomic_write(metrics_path, json.dumps(m0) + "\n")
        log(f"before training: val AUC {m0['val_auc']}, best F1 {m0['val_best_f1']:.3f}")

    weights = torch.from_numpy(balanced_weights(train_rows))
    skipped_total = 0
    for done, epoch in enumerate(range(start, cfg.epochs + 1)):
        if stop_after is not None and done >= stop_after:
            break
        t0 = time.perf_counter()
        _set_seed(cfg.seed, epoch)
        train_set.epoch = epoch
        sampler = WeightedRandomSampler(weights, num_samples=len(train_rows), replacement=True,
                                        generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
                            collate_fn=collate)
        model.train()
        losses, seen = [], 0
        bar = tqdm(loader, total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch",
                   disable=not progress, dynamic_ncols=True)
        for batch, broken in bar:
            for i, err in broken:
                skipped_total += 1
                log(f"warning: training pair skipped: {err}")
            if batch is not None:
                _, x, y, c = (t.to(device) for t in batch)
                loss = _loss(model(x[:, 0], x[:, 1]), y, c, per_class)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()) * len(y))
                seen += len(y)
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            sched.step()
        bar.close()
        record = {"epoch": epoch, "train_loss": sum(losses) / max(seen, 1), "lr": sched.get_last_lr()[0],
                  **evaluate(model, val_loader, per_class, log, device), "skipped_pairs": skipped_total,
                  "seconds": round(time.perf_counter() - t0, 2)}
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        score = record["val_auc"] if record["val_auc"] is not None else -record["val_loss"]
        if best is None or score > best["score"]:
            best = {"epoch": epoch, "score": score, **record}
            save_file(_state_for_build(model), str(run / ".best.safetensors.tmp"),
                      metadata={"format": FORMAT, "heads": cfg.heads, "epoch": str(epoch),
                                "vocabulary": json.dumps(vocab if per_class else [])})
            Path(run / ".best.safetensors.tmp").replace(run / "best.safetensors")
            atomic_write(run / "best.json", json.dumps(best, indent=2) + "\n")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "epoch": epoch, "best": json.dumps(best)},
                   run / ".last.pt.tmp")
        Path(run / ".last.pt.tmp").replace(last_path)
        auc = "n/a" if record["val_auc"] is None else f"{record['val_auc']:.3f}"
        log(f"epoch {epoch}: train loss {record['train_loss']:.4f}, val loss {record['val_loss']:.4f}, "
            f"AUC {auc}, best F1 {record['val_best_f1']:.3f} ({record['seconds']:.1f} s)")
    return best or {}
