"""The notebook's loss, and plain binary cross-entropy (an option: docs/departures.md)."""
from __future__ import annotations

import torch
from torch.nn import functional as F


def focal_loss_with_logits(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                           gamma: float = 2.0) -> torch.Tensor:
    """The notebook's `focal_loss_with_logits`: alpha * (1 - p_t)^gamma * BCE, p_t = exp(-BCE),
    averaged over every element (the same alpha for both classes, as the notebook has it)."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    pt = torch.exp(-bce)
    return (alpha * (1 - pt) ** gamma * bce).mean()


def bce_with_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, targets)


LOSSES = {"focal": focal_loss_with_logits, "bce": bce_with_logits}
