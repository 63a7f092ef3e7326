"""Stage 7: the query phase. Test gradient, same projection, FAISS candidates, exact re-rank."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import IndexMismatchError, InputError
from .gradients import select
from .model import (
    Checkpoint,
    ModelBundle,
    TriplesData,
    load_checkpoints,
    load_model,
    parse_triple,
    select_parameters,
    triples_fingerprint,
)
from .projection import ProjectionSpec
from .runtime import resolve_device
from .search import load_index, search
from .store import Store
from .tracer import Tracer

__all__ = ["Influence", "QueryResult", "TracinIndex", "open_index", "default_candidates"]


def default_candidates(k: int) -> tuple[int, int]:
    """FAISS candidates re-ranked exactly, per end: (proponents, opponents).

    Opponents get more: their influences are small and projection noise swamps them (DESIGN section 3).
    """
    return max(10 * k, 100), max(50 * k, 500)


@dataclass(frozen=True)
class Influence:
    rank: int
    train_index: int
    head: str
    relation: str
    tail: str
    influence: float


@dataclass(frozen=True)
class QueryResult:
    """Top proponents (largest positive influence) and opponents (most negative) of one test triple."""

    test: dict[str, str]
    test_ids: tuple[int, int, int]
    proponents: list[Influence] = field(default_factory=list)
    opponents: list[Influence] = field(default_factory=list)
    exact: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "test": self.test,
            "proponents": [asdict(p) for p in self.proponents],
            "opponents": [asdict(o) for o in self.opponents],
        }


class TracinIndex:
    """A built index, opened with the model and checkpoints it was built from.

    Use :func:`open_index`. ``query`` answers top-K proponents and opponents.
    """

    def __init__(self, store: Store, tracer: Tracer, labels: TriplesData) -> None:
        self.store = store
        self.tracer = tracer
        self.labels = labels
        self.triples = torch.from_numpy(np.asarray(store.array("triples")[:], dtype=np.int64))
        self._faiss = load_index(store.faiss_path)

    @property
    def num_train(self) -> int:
        return int(self.triples.shape[0])

    def info(self) -> dict[str, Any]:
        """The store's attributes (settings, fingerprints, tracked parameters)."""
        return self.store.attrs

    def parse(self, triples: str | tuple[int, int, int] | list[Any] | torch.Tensor) -> torch.Tensor:
        """Labels (``"h r t"`` strings) or raw ids to an ``(M, 3) int64`` tensor."""
        if isinstance(triples, torch.Tensor):
            out = triples.reshape(-1, 3).to(torch.long)
        else:
            items = [triples] if isinstance(triples, str) or (
                isinstance(triples, tuple) and len(triples) == 3 and isinstance(triples[0], int)) else list(triples)
            rows = []
            for item in items:
                if isinstance(item, str):
                    rows.append(parse_triple(item, self.labels))
                else:
                    h, r, t = (int(x) for x in item)
                    rows.append((h, r, t))
            out = torch.tensor(rows, dtype=torch.long).reshape(-1, 3)
        num_e, num_r = len(self.labels.entity_labels), len(self.labels.relation_labels)
        bad = (out < 0).any(1) | (out[:, 0] >= num_e) | (out[:, 2] >= num_e) | (out[:, 1] >= num_r)
        if bool(bad.any()):
            raise InputError(f"triple ids {out[bad][0].tolist()} are out of range ({num_e} entities, {num_r} relations)")
        return out

    def test_rows(self, test: torch.Tensor) -> tuple[np.ndarray, list[list[Any]]]:
        """Projected query rows ``(M, C*k) float32`` and the exact gradient blocks per checkpoint."""
        r = self.tracer.rows(test, keep_blocks=True)
        return r.rows.cpu().numpy().astype(np.float32), r.blocks

    def exact_influence(self, test: Any, train_index: torch.Tensor | None = None) -> torch.Tensor:
        """Exact TracIn ``(M, n) float32`` of test triples against training rows (all by default)."""
        t = self.parse(test)
        _, blocks = self.test_rows(t)
        train = self.triples if train_index is None else self.triples[train_index]
        return self.tracer.exact(blocks, train).cpu()

    def query(
        self,
        triples: Any,
        k: int = 10,
        *,
        candidates: int | None = None,
        opponent_candidates: int | None = None,
        rerank: bool = True,
    ) -> list[QueryResult]:
        """Top-``k`` proponents and opponents of each test triple.

        ``triples``: one ``"head relation tail"`` string, a list of them, or raw ids ``(M, 3) int64``.
        FAISS retrieves ``candidates`` rows for each end (opponents by searching with ``-q``); with
        ``rerank`` they are scored by exact TracIn and the lists hold exact values.
        """
        if not 1 <= k <= self.num_train:
            raise InputError(f"--top-k {k} is out of range; choose 1..{self.num_train} (the training triples)")
        test = self.parse(triples)
        q, blocks = self.test_rows(test)
        dp, do = default_candidates(k)
        n_pro = max(k, candidates or dp)
        n_opp = max(k, opponent_candidates or candidates or do)
        s_pro, i_pro = search(self._faiss, q, n_pro)
        s_opp, i_opp = search(self._faiss, -q, n_opp)
        results = []
        for m in range(test.shape[0]):
            ids_p, ids_o = i_pro[m][i_pro[m] >= 0], i_opp[m][i_opp[m] >= 0]
            if rerank:
                union = np.unique(np.concatenate([ids_p, ids_o]))
                mine = [select(per_ckpt, torch.tensor([m])) for per_ckpt in blocks]
                exact = self.tracer.exact(mine, self.triples[torch.from_numpy(union)])[0].cpu().numpy()
                scores = dict(zip(union.tolist(), exact.tolist(), strict=True))
                pro = sorted(((scores[i], i) for i in ids_p.tolist()), key=lambda x: (-x[0], x[1]))
                opp = sorted(((scores[i], i) for i in ids_o.tolist()), key=lambda x: (x[0], x[1]))
            else:
                pro = list(zip(s_pro[m][: len(ids_p)].tolist(), ids_p.tolist(), strict=True))
                opp = list(zip((-s_opp[m][: len(ids_o)]).tolist(), ids_o.tolist(), strict=True))
            results.append(self._result(test[m], [p for p in pro if p[0] > 0][:k], [o for o in opp if o[0] < 0][:k], rerank))
        return results

    def _labels(self, ids: Any) -> tuple[str, str, str]:
        h, r, t = (int(x) for x in ids)
        ent, rel = self.labels.entity_labels, self.labels.relation_labels
        return ent[h], rel[r], ent[t]

    def _result(self, test: torch.Tensor, pro: list[tuple[float, int]], opp: list[tuple[float, int]], exact: bool) -> QueryResult:
        def entries(items: list[tuple[float, int]]) -> list[Influence]:
            out = []
            for rank, (score, i) in enumerate(items, start=1):
                h, r, t = self._labels(self.triples[i])
                out.append(Influence(rank=rank, train_index=int(i), head=h, relation=r, tail=t, influence=float(score)))
            return out

        h, r, t = self._labels(test)
        return QueryResult(
            test={"head": h, "relation": r, "tail": t},
            test_ids=tuple(int(x) for x in test.tolist()),  # type: ignore[arg-type]
            proponents=entries(pro),
            opponents=entries(opp),
            exact=exact,
        )


def open_index(
    path: str | os.PathLike[str],
    *,
    model: ModelBundle | str | os.PathLike[str] | None = None,
    checkpoints: list[tuple[str, float]] | None = None,
    layers: str | None = None,
    loss: str | None = None,
    projection: ProjectionSpec | None = None,
    device: str | None = "cpu",
) -> TracinIndex:
    """Open a built index with the model it was built from (or ``model``), refusing any mismatch.

    ``layers``, ``loss`` and ``projection``, when given, must equal the store's; the model's and the
    checkpoints' fingerprints must equal the recorded ones.
    """
    store = Store.open(path)
    attrs = store.attrs
    if model is None:
        src = attrs["model_source"]
        bundle = load_model(
            src["path"], model_class=src.get("model_class"), model_kwargs=src.get("model_kwargs"),
            triples=src.get("triples"), entity_to_id=src.get("entity_to_id"),
            relation_to_id=src.get("relation_to_id"), inverse_triples=src.get("inverse_triples"),
        )
    elif isinstance(model, ModelBundle):
        bundle = model
    else:
        bundle = load_model(model)
    differences = []
    if type(bundle.model).__name__ != attrs["model_class"]:
        differences.append(f"model class: index {attrs['model_class']}, query {type(bundle.model).__name__}")
    if triples_fingerprint(bundle.triples.mapped) != attrs["triples_sha256"]:
        differences.append("training triples differ from the ones indexed")
    recorded = attrs["checkpoints"]
    if checkpoints is None:
        specs = [] if recorded[0]["name"] == "model" else [(c["name"], c["lr"]) for c in recorded]
    else:
        specs = checkpoints
    ckpts: list[Checkpoint] = load_checkpoints(bundle.model, specs)
    if len(ckpts) != len(recorded):
        differences.append(f"checkpoints: index has {len(recorded)}, query gives {len(ckpts)}")
    else:
        for c, rec in zip(ckpts, recorded, strict=True):
            if c.fingerprint != rec["sha256"]:
                differences.append(f"model state {c.name} differs from the indexed one (sha256 {rec['sha256'][:12]}...)")
            elif abs(c.lr - rec["lr"]) > 1e-12 * max(1.0, rec["lr"]):
                differences.append(f"learning rate of {c.name}: index {rec['lr']}, query {c.lr}")
    names = [p["name"] for p in attrs["tracked"]]
    params = dict(bundle.model.named_parameters())
    for p in attrs["tracked"]:
        if p["name"] not in params or list(params[p["name"]].shape) != p["shape"]:
            differences.append(f"tracked parameter {p['name']} {p['shape']} is not in the model")
    if layers is not None and not differences:
        asked = select_parameters(bundle.model, layers, bundle.triples.mapped[:2])
        if asked != names:
            differences.append(f"layers: index tracks {names}, --layers {layers} selects {asked}")
    if loss is not None and loss != attrs["loss"]:
        differences.append(f"loss: index {attrs['loss']!r}, query {loss!r}")
    spec = ProjectionSpec(**{k: attrs["projection"][k] for k in ("kind", "dim", "seed")})
    if projection is not None and projection != spec:
        differences.append(f"projection: index {spec}, query {projection}")
    if differences:
        raise IndexMismatchError(f"index {Path(path)} does not match this query: " + "; ".join(differences))
    tracer = Tracer(bundle, ckpts, names, attrs["loss"], spec, resolve_device(device))
    ent, rel = store.labels()
    labels = TriplesData(mapped=bundle.triples.mapped, entity_labels=ent, relation_labels=rel)
    return TracinIndex(store, tracer, labels)
