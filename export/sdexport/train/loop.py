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
    vocabulary.json    per-class heads: the labels, in head order

`--out` must be new, empty, or such a run folder holding nothing else (and then only with
--resume); JSON files hold standard JSON only (a non-finite number is written as null).
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from sdrun.errors import SpotdiffError
from sdrun.files import atomic_path, atomic_write, check_output_folder

from ..models.siamese import HEADS, SiameseViTChange, backbone_for
from ..sources import parse_source
from .data import (
    PairDataset,
    balanced_weights,
    check_both_kinds,
    collate,
    read_rows,
    split,
    write_split,
)
from .losses import LOSSES
from .metrics import best_f1, macro_f1, roc_auc

logger = logging.getLogger(__name__)

FORMAT = "spotdiff-train-change/1"
SAMPLERS = ("balanced", "shuffle")

# What a run writes into its folder (see the module docstring), and the temporary files
# a run killed while writing leaves beside them (".last.pt.tmp", ".best.safetensors.tmp":
# those of earlier versions).
RUN_FILES = ("config.json", "split.json", "metrics.jsonl", "last.pt", "best.safetensors",
             "best.json", "vocabulary.json", ".last.pt.tmp", ".best.safetensors.tmp")
_ATOMIC_TMP = re.compile(r"\.(config\.json|split\.json|metrics\.jsonl|best\.json|vocabulary\.json"
                         r"|last\.pt|best\.safetensors)"
                         r"\..+\.tmp")  # sdrun.files.atomic_write's and atomic_path's


class TrainError(SpotdiffError):
    """A run that cannot start or resume; the message says what differs."""


@dataclass
class TrainConfig:
    data: str
    csv: str
    backbone: str = "vit_base_patch16_224"
    heads: str = "change"  # "change" or "per-class"
    head: str = "notebook"  # the change head: "notebook" or "patch-diff" (models.siamese.HEADS)
    loss: str = "focal"  # "focal" (the notebook's) or "bce" (losses.LOSSES)
    sampler: str = "balanced"  # "balanced" (class-balanced, with replacement) or "shuffle" (SAMPLERS)
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


def read_run_config(run: Path) -> tuple[dict | None, str]:
    """(config.json of the train-change run in `run`, "") or (None, why it is not one)."""
    path = run / "config.json"
    if not path.exists():
        return None, f"no {path.name}: not a train-change run folder"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{path} cannot be read ({getattr(e, 'strerror', None) or type(e).__name__})"
    except json.JSONDecodeError as e:
        return None, f"{path} is not JSON (line {e.lineno}: {e.msg})"
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        fmt = config.get("format") if isinstance(config, dict) else None
        return None, (f"{path} is not the configuration of a train-change run (format {fmt!r}, "
                      f"expected {FORMAT!r})")
    return config, ""


def run_files(run: Path) -> list[str]:
    """The files of `run` that a train-change run wrote (`check_output_folder`'s `owned`):
    none unless it is a run folder (its config.json has the run format), and never a
    symbolic link (a run writes plain files; writing through a link could reach anywhere)."""
    if read_run_config(run)[0] is None:
        return []
    tmp = [p.name for p in run.iterdir() if _ATOMIC_TMP.fullmatch(p.name)]
    return [name for name in (*RUN_FILES, *tmp) if not (run / name).is_symlink()]


def _finite(value):
    """`value` with every non-finite float (inf, nan) replaced by None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def to_json(value, **kwargs) -> str:
    """Standard JSON (never NaN or Infinity): non-finite numbers become null."""
    return json.dumps(_finite(value), allow_nan=False, **kwargs)


def _number(value) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _score(record: dict) -> float:
    """What picks the best epoch: validation AUC, else minus the validation loss; -inf
    when neither is a number (a diverged epoch is never the best)."""
    auc, loss = _number(record.get("val_auc")), _number(record.get("val_loss"))
    return auc if auc is not None else -loss if loss is not None else -math.inf


def _check_config(cfg: TrainConfig) -> None:
    if cfg.heads not in ("change", "per-class"):
        raise TrainError(f"--heads {cfg.heads!r}: choose change or per-class")
    if cfg.head not in HEADS:
        raise TrainError(f"--head {cfg.head!r}: choose one of {', '.join(HEADS)}")
    if cfg.loss not in LOSSES:
        raise TrainError(f"--loss {cfg.loss!r}: choose one of {', '.join(LOSSES)}")
    if cfg.sampler not in SAMPLERS:
        raise TrainError(f"--sampler {cfg.sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if cfg.vocab is not None and cfg.heads != "per-class":
        raise TrainError("--vocab names the labels of per-class heads: add --heads per-class, "
                         "or leave --vocab out")
    if cfg.vocab is not None and not cfg.vocab:
        raise TrainError("--vocab names no labels")
    numbers = [("--epochs", cfg.epochs, 1, None), ("--batch-size", cfg.batch_size, 1, None),
               ("--lr", cfg.lr, 0.0, None), ("--weight-decay", cfg.weight_decay, 0.0, None),
               ("warmup_frac", cfg.warmup_frac, 0.0, 1.0)]
    for flag, value, low, high in numbers:
        if (not isinstance(value, (int, float)) or not math.isfinite(value) or value < low
                or (high is not None and value > high) or (flag == "--lr" and value == 0)):
            bounds = f"between {low} and {high}" if high is not None else (
                "above 0" if flag == "--lr" else f"at least {low}")
            raise TrainError(f"{flag} {value}: must be a finite number {bounds}")
    if len(cfg.size) != 2 or any(not isinstance(v, int) or v < 32 for v in cfg.size):
        raise TrainError(f"size {cfg.size}: expected [height, width], each at least 32")


def _prepare_folder(run: Path, resume: bool, inputs: Sequence[tuple[str, str | Path | None]]) -> dict | None:
    """Check `--out` before anything is read or written; returns the config.json of the
    run to resume (None for a new run)."""
    hint = (" (--out must be new, empty, or the folder of a train-change run holding nothing "
            "but its own files)")
    if resume:
        before = None
        if not run.exists():
            raise TrainError(f"--resume: --out {run} does not exist, so there is no run to "
                             "continue; check the path, or leave out --resume to start a run there")
        if run.is_dir():
            before, why = read_run_config(run)
            if before is None:
                raise TrainError(f"--resume: --out {run} holds no run to continue: {why}")
        check_output_folder(run, "--out", owned=run_files, inputs=inputs, hint=hint)
        return before
    check_output_folder(run, "--out", owned=run_files, inputs=inputs, hint=hint)
    if run.exists() and read_run_config(run)[0] is not None:
        raise TrainError(f"--out {run} holds a train-change run already ({run / 'config.json'}); "
                         "add --resume to continue it, or choose another --out folder")
    return None


def _not_ours(path: Path, why: str) -> TrainError:
    return TrainError(f"--resume: {path} is not a checkpoint written by sdexport train-change: {why}; "
                      "start a new run in another --out folder")


def _load_checkpoint(path: Path, model, opt, sched, epochs: int, device: str) -> tuple[int, dict | None]:
    """(the last finished epoch, the best record) of `last.pt`, its states loaded into
    `model`, `opt` and `sched`; TrainError naming the file for anything else (torch's own
    messages are not shown: a file that is no checkpoint of ours is never to be unpickled)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated, random bytes, another zip, a folder
        raise _not_ours(path, "it cannot be read as a torch checkpoint (truncated, or another kind of "
                              f"file; {type(e).__name__})") from None
    if not isinstance(state, dict):
        raise _not_ours(path, f"it holds a {type(state).__name__}, not a dict of states")
    missing = [k for k in ("model", "optimizer", "scheduler", "epoch", "best") if k not in state]
    if missing:
        raise _not_ours(path, f"it lacks {', '.join(missing)} (its keys: "
                              f"{', '.join(map(repr, list(state)[:8])) or 'none'})")
    epoch = state["epoch"]
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 1 <= epoch <= epochs:
        raise _not_ours(path, f"its epoch {epoch!r} is not one of 1..{epochs}")
    try:
        best = json.loads(state["best"]) if isinstance(state["best"], str) else state["best"]
    except json.JSONDecodeError:
        best = ()
    if best is not None and not (isinstance(best, dict) and isinstance(best.get("epoch"), int)):
        raise _not_ours(path, "its best-epoch record is not one")
    sd, own = state["model"], model.state_dict()
    if not isinstance(sd, dict):
        raise _not_ours(path, f"its model is a {type(sd).__name__}, not a state dict")
    absent = sorted(set(own) - set(sd))
    extra = sorted(map(str, set(sd) - set(own)))
    shapes = sorted(k for k in set(own) & set(sd)
                    if not torch.is_tensor(sd[k]) or tuple(sd[k].shape) != tuple(own[k].shape))
    if absent or extra or shapes:
        parts = [f"{what} {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
                 for what, keys in (("missing", absent), ("unexpected", extra),
                                    ("other shapes for", shapes)) if keys]
        raise _not_ours(path, "its model weights do not fit this --backbone and --heads ("
                              + "; ".join(parts) + ")")
    try:
        model.load_state_dict(sd)
        opt.load_state_dict(state["optimizer"])
        if not isinstance(state["scheduler"], dict):
            raise TypeError("scheduler")
        sched.load_state_dict(state["scheduler"])
    except Exception as e:
        raise _not_ours(path, f"its optimizer or scheduler state does not fit this model "
                              f"({type(e).__name__})") from None
    return epoch, best


def _read_metrics(path: Path, start: int) -> list[dict]:
    """The records of metrics.jsonl before epoch `start`; TrainError naming the file and
    line for a line that is not a record."""
    if not path.is_file():
        raise TrainError(f"--resume: {path} is missing (the run's last.pt is there); "
                         "start a new run in another --out folder")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TrainError(f"--resume: {path} cannot be read "
                         f"({getattr(e, 'strerror', None) or type(e).__name__})") from None
    kept = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainError(f"--resume: {path} line {n}: not a JSON record ({e.msg}, column "
                             f"{e.colno}); fix or delete that line") from None
        epoch = record.get("epoch") if isinstance(record, dict) else None
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise TrainError(f"--resume: {path} line {n}: not an epoch's record (no whole "
                             "\"epoch\" number); fix or delete that line")
        if epoch < start:
            kept.append(record)
    return kept


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _set_seed(seed: int, epoch: int) -> None:
    torch.manual_seed(int(np.random.SeedSequence((seed, epoch, 7)).generate_state(1)[0]))


def _loss(model_out, y, c, per_class: bool, kind: str) -> torch.Tensor:
    """The change logit's loss plus the per-class heads' (a mean over their 3 x V cells)."""
    loss_fn = LOSSES[kind]
    loss = loss_fn(model_out[1], y)
    if per_class:
        loss = loss + loss_fn(model_out[2], c)
    return loss


def evaluate(model, loader, per_class: bool, warn, device: str = "cpu", loss: str = "focal") -> dict:
    """Validation loss, ROC-AUC and best F1 of the change logit (and the heads' macro F1
    at probability 0.5), over the readable validation pairs."""
    model.eval()
    losses, logits, ys, probs, cs, weights = [], [], [], [], [], []
    with torch.no_grad():
        for batch, broken in loader:
            for _i, err in broken:
                warn(f"warning: validation pair skipped: {err}")
            if batch is None:
                continue
            _, x, y, c = (t.to(device) for t in batch)
            out = model(x[:, 0], x[:, 1])
            losses.append(float(_loss(out, y, c, per_class, loss)))
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
                 stop_after: int | None = None,
                 inputs: Iterable[tuple[str, str | Path | None]] = ()) -> dict:
    """Train (or resume) into `run_dir`; returns the best epoch's record. `stop_after`
    stops after that many epochs of this call (tests: a run interrupted between epochs).
    `inputs` ((what, path): e.g. the --vocab file) must not lie inside `run_dir`, nor must
    --data, --csv or a local --backbone. Every check (the folder, the data, the backbone,
    a checkpoint to resume) is done before anything is written."""
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler
    from tqdm import tqdm

    log = log or logger.info
    run = Path(run_dir)
    config_path, last_path = run / "config.json", run / "last.pt"
    _check_config(cfg)
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA GPU is visible to torch")
    source = parse_source("siamese", cfg.backbone, None, option="--backbone")
    folder_inputs = [("--data", cfg.data), ("--csv", cfg.csv), *inputs,
                     *([("--backbone", source.id)] if source.kind == "local" else [])]
    before = _prepare_folder(run, resume, folder_inputs)
    now = {"format": FORMAT, **cfg.compared()}
    if before is not None:
        for option, default in (("head", "notebook"), ("loss", "focal"), ("sampler", "balanced")):
            before.setdefault(option, default)  # runs from before these options
        diffs = [f"{k} {before.get(k)!r} there, {now.get(k)!r} now" for k in sorted(set(before) | set(now))
                 if before.get(k) != now.get(k)]
        if diffs:
            raise TrainError(f"--resume {run}: that run was started with another configuration "
                             f"({config_path}): " + "; ".join(diffs))

    # everything is read and checked before the folder is written
    per_class = cfg.heads == "per-class"
    rows, vocab = read_rows(cfg.data, cfg.csv, cfg.vocab if per_class else None, log)
    train_rows, val_rows = split(rows, cfg.val_frac, cfg.seed)  # both non-empty, or TrainDataError
    check_both_kinds(rows, train_rows, cfg.csv, cfg.val_frac, cfg.seed)

    torch.manual_seed(cfg.seed)
    model = SiameseViTChange(backbone_for(source), n_labels=len(vocab) if per_class else 0,
                             head=cfg.head).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_frac * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))

    metrics_path = run / "metrics.jsonl"
    start, best, kept = 1, None, None
    if resume and last_path.exists():
        last_epoch, best = _load_checkpoint(last_path, model, opt, sched, cfg.epochs, device)
        start = last_epoch + 1
        kept = _read_metrics(metrics_path, start)
    elif resume:
        log(f"resuming {run}: no epoch finished there yet, starting from the beginning")

    run.mkdir(parents=True, exist_ok=True)
    atomic_write(config_path, json.dumps(now, indent=2) + "\n")
    write_split(run / "split.json", train_rows, val_rows)
    if per_class:
        atomic_write(run / "vocabulary.json", json.dumps(vocab) + "\n")

    train_set = PairDataset(train_rows, train=True, seed=cfg.seed, size=tuple(cfg.size))
    val_set = PairDataset(val_rows, train=False, seed=cfg.seed, size=tuple(cfg.size))
    val_loader = DataLoader(val_set, batch_size=cfg.batch_size, shuffle=False, num_workers=workers,
                            collate_fn=collate)
    if kept is not None:
        atomic_write(metrics_path, "".join(to_json(r) + "\n" for r in kept))
        if start > cfg.epochs:
            log(f"{run}: all {cfg.epochs} epochs are done already; nothing to resume")
        else:
            log(f"resuming {run} after epoch {start - 1} of {cfg.epochs}")
    else:
        m0 = {"epoch": 0, **evaluate(model, val_loader, per_class, log, device, cfg.loss), "seconds": 0.0}
        atomic_write(metrics_path, to_json(m0) + "\n")
        log(f"before training: val AUC {m0['val_auc']}, best F1 {m0['val_best_f1']:.3f}")

    weights = torch.from_numpy(balanced_weights(train_rows))
    skipped_total = 0
    for done, epoch in enumerate(range(start, cfg.epochs + 1)):
        if stop_after is not None and done >= stop_after:
            break
        t0 = time.perf_counter()
        _set_seed(cfg.seed, epoch)
        train_set.epoch = epoch
        draws = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        sampler = (WeightedRandomSampler(weights, num_samples=len(train_rows), replacement=True, generator=draws)
                   if cfg.sampler == "balanced" else RandomSampler(train_set, generator=draws))
        loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
                            collate_fn=collate)
        model.train()
        losses, seen = [], 0
        bar = tqdm(loader, total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch",
                   disable=not progress, dynamic_ncols=True)
        for batch, broken in bar:
            for _i, err in broken:
                skipped_total += 1
                log(f"warning: training pair skipped: {err}")
            if batch is not None:
                _, x, y, c = (t.to(device) for t in batch)
                loss = _loss(model(x[:, 0], x[:, 1]), y, c, per_class, cfg.loss)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()) * len(y))
                seen += len(y)
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            sched.step()
        bar.close()
        record = {"epoch": epoch, "train_loss": sum(losses) / max(seen, 1), "lr": sched.get_last_lr()[0],
                  **evaluate(model, val_loader, per_class, log, device, cfg.loss), "skipped_pairs": skipped_total,
                  "seconds": round(time.perf_counter() - t0, 2)}
        with open(metrics_path, "a") as f:
            f.write(to_json(record) + "\n")
        score = _score(record)
        best_score = _number(best.get("score")) if best is not None else None
        if best is None or score > (best_score if best_score is not None else -math.inf):
            best = {"epoch": epoch, "score": score, **record}
            with atomic_path(run / "best.safetensors") as tmp:
                save_file(_state_for_build(model), str(tmp),
                          metadata={"format": FORMAT, "heads": cfg.heads, "epoch": str(epoch),
                                    "vocabulary": json.dumps(vocab if per_class else [])})
            atomic_write(run / "best.json", to_json(best, indent=2) + "\n")
        with atomic_path(last_path) as tmp:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "epoch": epoch, "best": to_json(best)}, tmp)
        auc = "n/a" if record["val_auc"] is None else f"{record['val_auc']:.3f}"
        log(f"epoch {epoch}: train loss {record['train_loss']:.4f}, val loss {record['val_loss']:.4f}, "
            f"AUC {auc}, best F1 {record['val_best_f1']:.3f} ({record['seconds']:.1f} s)")
    return best or {}
