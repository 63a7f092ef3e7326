"""The trained model's own predictions: the completions of ``head relation ?`` and ``? relation tail``.

:class:`Predictions` ranks a question's candidate entities by the trained model's scores (filtered by the known
training triples, as PyKEEN's filtered evaluation does) and resolves the questions in a test set to the triples
they predict, so that the query engine explains each prediction as a full triple. :func:`with_predictions`
attaches the prediction to each result.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from .rankings import Results
from .tracer import Tracer
from .triples import QUESTION, TriplesData

__all__ = ["Predictions", "trained_state", "with_predictions"]


def trained_state(tracer: Tracer) -> dict[str, torch.Tensor]:
    """The model's state as the tracer received it (the trained model, before any checkpoint is loaded into
    the same module): the last checkpoint's own tensors when they hold the same values, else a copy."""
    state = tracer.model.state_dict()
    last = tracer.checkpoints[-1].state if tracer.checkpoints else {}
    if state.keys() == last.keys() and all(
        last[k].shape == v.shape and torch.equal(last[k].to(v.device), v) for k, v in state.items()
    ):
        return last
    return {k: v.detach().clone() for k, v in state.items()}


class Predictions:
    """The trained model's completions of questions (one ``QUESTION`` end in a raw-id triple)."""

    def __init__(self, tracer: Tracer, labels: TriplesData) -> None:
        self.tracer = tracer
        self.labels = labels
        self._state = trained_state(tracer)  # taken now: the tracer loads checkpoints into the same module

    def top(self, questions: torch.Tensor, n: int, filtered: bool) -> list[list[dict[str, Any]]]:
        """Top-``n`` completions of each question ``(Q, 3)``, best first: dicts with ``target`` (``tail`` or
        ``head``), ``question``, ``label``, ``id``, ``score`` (``predict_t`` / ``predict_h``), ``rank`` and
        ``filtered``."""
        ent, rel = self.labels.entity_labels, self.labels.relation_labels
        out = []
        with torch.no_grad(), self.tracer.with_state(self._state) as module:
            model: Any = module
            for h, r, t in questions.tolist():
                target = "tail" if t == QUESTION else "head"
                pair = torch.tensor([[h, r]] if target == "tail" else [[r, t]], device=self.tracer.device)
                scores = (model.predict_t(pair) if target == "tail" else model.predict_h(pair))[0].float().cpu()
                if filtered:
                    scores[torch.from_numpy(self.known_ends(h if target == "tail" else t, r, target))] = -math.inf
                order = torch.sort(-scores, stable=True).indices[:n]
                order = order[torch.isfinite(scores[order])]
                text = f"{ent[h]} {rel[r]} ?" if target == "tail" else f"? {rel[r]} {ent[t]}"
                out.append([{"target": target, "question": text, "label": ent[i], "id": i,
                             "score": float(scores[i]), "rank": j + 1, "filtered": filtered}
                            for j, i in enumerate(order.tolist())])
        return out

    def known_ends(self, entity: int, relation: int, target: str) -> np.ndarray:
        """Entities at the asked end of the known training triples with this relation and other end."""
        mapped = self.labels.mapped.numpy()
        if target == "tail":
            return mapped[(mapped[:, 0] == entity) & (mapped[:, 1] == relation), 2]
        return mapped[(mapped[:, 2] == entity) & (mapped[:, 1] == relation), 0]

    def resolve(self, t: torch.Tensor, n: int, filtered: bool) -> tuple[torch.Tensor, list[dict[str, Any] | None], np.ndarray]:
        """Raw-id test triples ``(M, 3)`` with each question replaced by its top ``n`` completions: the triples
        ``(M', 3)``, each one's prediction (None for a given triple) and the position of its line in ``t``."""
        asked = ((t[:, 0] == QUESTION) | (t[:, 2] == QUESTION)).numpy()
        if not asked.any():
            return t, [None] * len(t), np.arange(len(t))
        answers = iter(self.top(t[torch.from_numpy(asked)], n, filtered))
        rows: list[tuple[int, int, int]] = []
        info: list[dict[str, Any] | None] = []
        origin: list[int] = []
        for m, (h, r, tail) in enumerate(t.tolist()):
            for p in next(answers) if asked[m] else [None]:
                if p is None:
                    rows.append((h, r, tail))
                else:
                    rows.append((p["id"], r, tail) if p["target"] == "head" else (h, r, p["id"]))
                info.append(p)
                origin.append(m)
        return torch.tensor(rows, dtype=torch.long).reshape(-1, 3), info, np.asarray(origin, dtype=np.int64)


def with_predictions(results: Results, answers: list[dict[str, Any] | None], origin: np.ndarray | None = None) -> Results:
    """``results`` with each one's prediction (from :meth:`Predictions.resolve`) attached, and with ``origin``
    their positions in the input."""
    out = Results(r if p is None else replace(r, prediction=p) for r, p in zip(results, answers, strict=True))
    if origin is not None and any(p is not None for p in answers):
        out.positions = [int(i) for i in origin]
    return out
