"""Per-triple losses whose gradients TracIn compares; their names are registered in :data:`~tracin_index.registry.LOSSES`.

Each loss maps ``(model, rows)`` with model-internal ``(R, 3) int64`` rows to the *sum* of the rows'
losses (``fn``), or to each row's loss ``(R,)`` (``per_row``). In eval mode rows are independent, so the
gradient of the sum with respect to a row's activations is that row's own gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .registry import LOSSES

__all__ = ["DEFAULT_LOSS", "Loss", "bce_loss", "ce_loss", "get_loss", "score_loss"]


@dataclass(frozen=True)
class Loss:
    name: str
    description: str
    per_row: Callable[[Any, torch.Tensor], torch.Tensor]

    def fn(self, model: Any, rows: torch.Tensor) -> torch.Tensor:
        """The rows' summed loss (a scalar)."""
        return self.per_row(model, rows).sum()


def bce_loss(model: Any, rows: torch.Tensor) -> torch.Tensor:
    # BCE with logits, label 1: softplus(-s). Under LCWA + BCE training this is exactly the positive
    # triple's own term of the objective.
    return F.softplus(-model.score_hrt(rows)).reshape(-1)


def ce_loss(model: Any, rows: torch.Tensor) -> torch.Tensor:
    # 1-N cross-entropy -log p(t | h, r) over all tails.
    scores = model.score_t(rows[:, :2])
    return F.cross_entropy(scores, rows[:, 2], reduction="none")


def score_loss(model: Any, rows: torch.Tensor) -> torch.Tensor:
    # The raw score, negated: gradients proportional to -grad s(h, r, t), whatever the training loss.
    return -model.score_hrt(rows).reshape(-1)


DEFAULT_LOSS = LOSSES.default


def get_loss(name: str) -> Loss:
    """The loss registered as ``name`` (:data:`tracin_index.registry.LOSSES`)."""
    entry = LOSSES[name]
    return Loss(entry.name, entry.help, entry.load())
