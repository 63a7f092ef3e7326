"""Mislabel-detection helpers shared by ``tests/test_self_influence.py`` and ``benchmarks/bench_self_influence.py``.

Independent of the package: label noise injection, the model's own loss per triple (the usual
mislabel-detection baseline), and ranking metrics in plain numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def flip_tails(mapped: torch.Tensor, rate: float, num_entities: int, seed: int,
               forbidden: torch.Tensor | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Replace the tail of a seeded ``rate`` fraction of ``mapped`` ``(N, 3)`` by a random other entity.

    A flipped triple is never one of ``mapped`` or ``forbidden`` (e.g. the validation and test triples),
    nor equal to another flipped triple. Returns the noisy triples (same order) and the flipped positions.
    """
    rng = np.random.default_rng(seed)
    triples = mapped.numpy().copy()
    taken = {tuple(int(x) for x in row) for row in triples}
    if forbidden is not None:
        taken |= {tuple(int(x) for x in row) for row in forbidden.numpy()}
    n_flip = max(1, round(rate * len(triples)))
    flipped = np.sort(rng.choice(len(triples), size=n_flip, replace=False))
    for i in flipped:
        h, r, t = (int(x) for x in triples[i])
        while True:
            new = int(rng.integers(num_entities))
            if new != t and (h, r, new) not in taken:
                break
        triples[i, 2] = new
        taken.add((h, r, new))
    return torch.from_numpy(triples), flipped.astype(np.int64)


def bce_loss_per_triple(model: Any, triples: torch.Tensor, batch_size: int = 2048) -> np.ndarray:
    """The model's own loss on each raw-id triple ``(N, 3)``: ``softplus(-score_hrt)`` in eval mode.

    With inverse triples it is summed over the triple's two rows ``(h, 2r, t)`` and ``(t, 2r+1, h)``:
    the package's ``bce`` loss, per triple.
    """
    inverse = bool(getattr(model, "use_inverse_triples", False))
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(triples), batch_size):
            h, r, t = triples[s : s + batch_size].unbind(dim=1)
            if inverse:
                fwd = torch.stack([h, 2 * r, t], dim=1)
                inv = torch.stack([t, 2 * r + 1, h], dim=1)
                loss = F.softplus(-model.score_hrt(fwd)) + F.softplus(-model.score_hrt(inv))
            else:
                loss = F.softplus(-model.score_hrt(torch.stack([h, r, t], dim=1)))
            out.append(loss.reshape(-1))
    model.train(was_training)
    return torch.cat(out).double().numpy()


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of ``scores`` (higher = more likely positive) for boolean ``labels``.

    Mann-Whitney U from average ranks (ties get their mean rank, i.e. count one half).
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs at least one positive and one negative")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # average 1-based rank over each run of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + 1 + b) / 2.0
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def precision_at(order: np.ndarray, labels: np.ndarray, fraction: float) -> float:
    """Fraction of positives among the first ``round(fraction * N)`` positions of a ranking ``order``."""
    labels = np.asarray(labels, dtype=bool)
    n = max(1, round(fraction * len(labels)))
    return float(labels[np.asarray(order)[:n]].mean())
