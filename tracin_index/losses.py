"""Per-triple losses whose gradients TracIn compares, resolved by name through one table.

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

from .errors import InputError

__all__ = ["LOSSES", "DEFAULT_LOSS", "Loss", "get_loss"]


@dataclass(frozen=True)
class Loss:
    name: str
    description: str
    per_row: Callable[[Any, torch.Tensor], torch.Tensor]

    def fn(self, model: Any, rows: torch.Tensor) -> torch.Tensor:
        """The rows' summed loss (a scalar)."""
        return self.per_row(model, rows).sum()


def _bce(model: Any, rows: torch.Tensor) -> torch.Tensor:
    # BCE with logits, label 1: softplus(-s). Under LCWA + BCE training this is exactly the positive
    # triple's own term of the objective.
    return F.softplus(-model.score_hrt(rows)).reshape(-1)


def _ce(model: Any, rows: torch.Tensor) -> torch.Tensor:
    # 1-N cross-entropy -log p(t | h, r) over all tails.
    scores = model.score_t(rows[:, :2])
    return F.cross_entropy(scores, rows[:, 2], reduction="none")


def _score(model: Any, rows: torch.Tensor) -> torch.Tensor:
    # The raw score, negated: gradients proportional to -grad s(h, r, t), whatever the training loss.
    return -model.score_hrt(rows).reshape(-1)


LOSSES: dict[str, Loss] = {
    loss.name: loss
    for loss in (
        Loss("bce", "binary cross-entropy with label 1 on score_hrt (the earlier tool's loss; default)", _bce),
        Loss("ce", "1-N cross-entropy -log p(t | h, r) over all tails (needs score_t)", _ce),
        Loss("score", "-score_hrt(h, r, t): the raw score's gradient", _score),
    )
}
DEFAULT_LOSS = "bce"


def get_loss(name: str) -> Loss:
    try:
        return LOSSES[name]
    except KeyError:
        raise InputError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}") from None
