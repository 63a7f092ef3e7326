"""What a query returns: rankings of training triples, their settings, and their flat output schema.

:class:`QueryResult` (one test triple), :class:`Results` (several), :class:`AggregateResult` (a test set's
summed influence) and :class:`Ranking` (e.g. self-influence) hold :class:`Influence` entries and turn into
records and DataFrames with the columns ``TEST_COLUMNS`` + ``TRAIN_COLUMNS``. :class:`ScoreSettings` says
what a ranking depends on besides the index and the test triples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InputError, arg
from .location import Where
from .registry import MODES, OPTIMIZERS
from .store import Store

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["COLUMN_TYPES", "MODES", "PREDICTION_COLUMNS", "TEST_COLUMNS", "TRAIN_COLUMNS", "AggregateResult", "Influence",
           "QueryResult", "Ranking", "Results", "ScoreSettings", "default_candidates", "result_columns", "self_influence_ranking"]



def default_candidates(k: int) -> tuple[int, int]:
    """Search candidates re-ranked exactly, per end: (proponents, opponents).

    Opponents get more: their influences are small and projection noise swamps them.
    """
    return max(10 * k, 100), max(50 * k, 500)


@dataclass(frozen=True)
class Influence:
    """One training triple in a ranking. ``train_index`` is its position in the training triples."""

    rank: int
    train_index: int
    head: str
    relation: str
    tail: str
    head_id: int
    relation_id: int
    tail_id: int
    influence: float


TRAIN_COLUMNS = ("kind", "rank", "train_index", "head", "relation", "tail", "head_id", "relation_id", "tail_id",
                 "influence")
TEST_COLUMNS = ("test_index", "test_head", "test_relation", "test_tail", "test_head_id", "test_relation_id",
                "test_tail_id", "mode")
PREDICTION_COLUMNS = ("question", "prediction_score", "prediction_rank")
# each column's type in a result table (Parquet's schema)
COLUMN_TYPES = {c: "string" for c in ("test_head", "test_relation", "test_tail", "mode", "question", "kind", "head",
                                        "relation", "tail")}
COLUMN_TYPES.update({c: "float64" for c in ("prediction_score", "influence")})
COLUMN_TYPES.update({c: "int64" for c in (*TEST_COLUMNS, *PREDICTION_COLUMNS, *TRAIN_COLUMNS) if c not in COLUMN_TYPES})


def result_columns(predictions: bool = False) -> tuple[str, ...]:
    """The columns of a result table; a test set with questions adds which question each prediction answers."""
    return TEST_COLUMNS + (PREDICTION_COLUMNS if predictions else ()) + TRAIN_COLUMNS


def _html(results: list[QueryResult]) -> str:
    """Results as an HTML table (Jupyter shows it): one block of rows per test triple, its lists under it."""
    from html import escape

    rows = []
    for res in results:
        t = res.test
        title = " ".join(escape(str(t[k])) for k in ("head", "relation", "tail"))
        if res.prediction is not None:
            p = res.prediction
            title += (f" <small>(prediction {p['rank']} for {escape(str(p['question']))}, score "
                      f"{float(p['score']):.4g})</small>")
        if res.versus is not None:
            title += " <small>over " + " ".join(escape(str(res.versus[k])) for k in ("head", "relation", "tail")) + "</small>"
        optimizer = "" if res.optimizer == OPTIMIZERS.default else f", {escape(res.optimizer)}"
        rows.append(f'<tr><th colspan="6" style="text-align:left">{title} <small>[{escape(res.mode)}{optimizer}'
                    f'{"" if res.exact else ", projected"}]</small></th></tr>')
        for kind, items in _lists(res):
            for i in items:
                colour = "#1a7f37" if i.influence > 0 else "#cf222e"
                rows.append(f"<tr><td>{escape(kind)}</td><td>{i.rank}</td><td>{escape(i.head)}</td>"
                            f"<td>{escape(i.relation)}</td><td>{escape(i.tail)}</td>"
                            f'<td style="color:{colour};text-align:right">{i.influence:+.6g}</td></tr>')
    head = "<tr><th>list</th><th>rank</th><th>head</th><th>relation</th><th>tail</th><th>influence</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def _lists(result: QueryResult | AggregateResult) -> list[tuple[str, list[Influence]]]:
    if result.mode == "abs":
        return [("top", result.top)]
    return [("proponent", result.proponents), ("opponent", result.opponents)]


def _lists_dict(result: QueryResult | AggregateResult) -> dict[str, Any]:
    return {("top" if kind == "top" else kind + "s"): [asdict(i) for i in items] for kind, items in _lists(result)}


def _train_record(kind: str, item: Influence) -> dict[str, Any]:
    return {"kind": kind, **asdict(item)}


@dataclass(frozen=True)
class QueryResult:
    """The ranking of one test triple.

    ``mode`` dot/cosine: ``proponents`` (largest positive influence first) and ``opponents`` (most
    negative first). ``mode`` abs: ``top``, largest ``|influence|`` first, signs kept (the earlier
    tool's ranking). ``exact`` is False when the values are projected estimates (no re-rank).
    ``optimizer``: whose training step the influences follow; ``to_dict`` names it unless it is ``sgd``.
    """

    test: dict[str, str]
    test_ids: tuple[int, int, int]
    mode: str = "dot"
    proponents: list[Influence] = field(default_factory=list)
    opponents: list[Influence] = field(default_factory=list)
    top: list[Influence] = field(default_factory=list)
    exact: bool = True
    # the model's prediction this triple is (question, target, label, id, score, rank, filtered), if it is one
    prediction: dict[str, Any] | None = None
    # the triple the test triple is preferred over: the influences are on the margin between their scores
    versus: dict[str, str] | None = None
    # the training optimizer whose step the influences follow (the registry's OPTIMIZERS)
    optimizer: str = OPTIMIZERS.default

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"test": self.test, "mode": self.mode}
        if self.optimizer != OPTIMIZERS.default:
            out["optimizer"] = self.optimizer
        if self.prediction is not None:
            out["prediction"] = self.prediction
        if self.versus is not None:
            out["versus"] = self.versus
        return {**out, **_lists_dict(self)}

    def records(self, test_index: int = 0) -> list[dict[str, Any]]:
        """One flat row per (kind, rank): the bulk output schema (``docs/cli.md``)."""
        h, r, t = self.test_ids
        test = {"test_index": test_index, "test_head": self.test["head"], "test_relation": self.test["relation"],
                "test_tail": self.test["tail"], "test_head_id": h, "test_relation_id": r, "test_tail_id": t,
                "mode": self.mode}
        p = self.prediction or {}
        test.update(question=p.get("question"), prediction_score=p.get("score"), prediction_rank=p.get("rank"))
        return [{**test, **_train_record(kind, i)} for kind, items in _lists(self) for i in items]

    def to_frame(self) -> pd.DataFrame:
        return Results([self]).to_frame()

    def _repr_html_(self) -> str:
        return _html([self])


class Results(list[QueryResult]):
    """Results of several test triples, in input order; ``to_frame()`` gives the bulk output schema.

    ``positions``: each result's position in the input (a question's predictions share their question's);
    None means ``0, 1, 2, ...``."""

    positions: list[int] | None = None

    def to_frame(self) -> pd.DataFrame:
        import pandas as pd

        positions = self.positions if self.positions is not None else range(len(self))
        rows = [rec for m, res in zip(positions, self, strict=True) for rec in res.records(m)]
        return pd.DataFrame(rows, columns=list(result_columns(any(r.prediction is not None for r in self))))

    def _repr_html_(self) -> str:
        return _html(self)


@dataclass(frozen=True)
class AggregateResult:
    """Training triples ranked by their influence summed over a whole test set."""

    mode: str
    num_test: int
    proponents: list[Influence] = field(default_factory=list)
    opponents: list[Influence] = field(default_factory=list)
    top: list[Influence] = field(default_factory=list)
    exact: bool = True
    optimizer: str = OPTIMIZERS.default

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "num_test": self.num_test}
        if self.optimizer != OPTIMIZERS.default:
            out["optimizer"] = self.optimizer
        return {**out, **_lists_dict(self)}

    def records(self) -> list[dict[str, Any]]:
        return [{"mode": self.mode, **_train_record(kind, i)} for kind, items in _lists(self) for i in items]

    def to_frame(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame(self.records(), columns=["mode", *TRAIN_COLUMNS])

    def _repr_html_(self) -> str:
        return str(self.to_frame().to_html(index=False))


class Ranking(list[Influence]):
    """A ranked list of training triples (e.g. by self-influence); ``to_frame()`` gives a DataFrame."""

    def to_frame(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame([asdict(i) for i in self], columns=list(TRAIN_COLUMNS[1:]))

    def _repr_html_(self) -> str:
        return str(self.to_frame().to_html(index=False))


@dataclass(frozen=True)
class ScoreSettings:
    """What a ranking depends on, besides the index and the test triples.

    ``relations``: relation ids a listed training triple must have (None = any). ``neighbourhood``:
    listed training triples must share an entity with their test triple. Both restrict the search
    before the top-K cut. ``candidates`` / ``opponent_candidates``: rows retrieved per end and
    re-ranked exactly (None = :func:`default_candidates`, times the search's ``candidate_factor``).
    ``optimizer``: the training optimizer whose step the influences follow (the test gradient preconditioned as it
    stepped; ``sgd`` is plain TracIn).
    """

    k: int = 10
    mode: str = "dot"
    relations: tuple[int, ...] | None = None
    neighbourhood: bool = False
    candidates: int | None = None
    opponent_candidates: int | None = None
    rerank: bool = True
    predictions: int = 1  # completions explained per question ("head relation ?")
    filtered: bool = True  # questions rank completions without the other known training triples
    optimizer: str = OPTIMIZERS.default

    def per_end(self) -> tuple[int, int]:
        dp, do = default_candidates(self.k)
        return max(self.k, self.candidates or dp), max(self.k, self.opponent_candidates or self.candidates or do)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ranked(values: np.ndarray, ids: np.ndarray, sign: float, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of ``(M, n)`` places: the ``k`` with ``sign * value > 0``, largest ``sign * value`` first, ties by
    row id. Returns ``(values, ids, counts)``: each row's first ``counts[m]`` places are its list. One lexsort
    for all rows, not many small sorts (one per test and end)."""
    keep = (ids >= 0) & (values * sign > 0)
    order = np.lexsort((ids, -sign * values, ~keep), axis=-1)[:, :k]
    return np.take_along_axis(values, order, 1), np.take_along_axis(ids, order, 1), np.minimum(keep.sum(1), k)


def _influence(rank: int, train_index: int, head: str, relation: str, tail: str, head_id: int, relation_id: int,
               tail_id: int, influence: float) -> Influence:
    """``Influence(...)`` without the frozen dataclass's ``object.__setattr__`` per field (a query makes one per
    listed entry, so the per-field overhead adds up)."""
    item = object.__new__(Influence)
    item.__dict__.update(rank=rank, train_index=train_index, head=head, relation=relation, tail=tail, head_id=head_id,
                         relation_id=relation_id, tail_id=tail_id, influence=influence)
    return item


@dataclass(frozen=True)
class RowTable:
    """What turns index rows into ranking entries: each row's raw-id triple ``(N, 3)``, its position in the
    training triples, and the labels."""

    triples: np.ndarray
    train_index: np.ndarray
    entity_labels: list[str]
    relation_labels: list[str]

    def entries(self, values: np.ndarray, rows: np.ndarray, counts: np.ndarray) -> list[list[Influence]]:
        """Per row of ``(M, n)`` ranked places, its first ``counts[m]`` as entries (ids and positions gathered
        once for all)."""
        safe = np.maximum(rows, 0)
        triples, positions, scores = self.triples[safe].tolist(), self.train_index[safe].tolist(), values.tolist()
        ent, rel = self.entity_labels, self.relation_labels
        return [[_influence(j + 1, pos[j], ent[h], rel[r], ent[t], h, r, t, sc[j]) for j, (h, r, t) in enumerate(trip[:c])]
                for trip, pos, sc, c in zip(triples, positions, scores, counts.tolist(), strict=True)]

    def results(self, test: list[list[int]], s: ScoreSettings, pi: np.ndarray, pv: np.ndarray, oi: np.ndarray,
                ov: np.ndarray) -> list[QueryResult]:
        """The rankings of raw-id test triples from their candidates' row ids and values per end ``(M, n)``
        (-1: no candidate): proponents and opponents, or ``top`` by magnitude in the abs mode."""
        ent, rel = self.entity_labels, self.relation_labels
        common: list[dict[str, Any]] = [
            {"test": {"head": ent[h], "relation": rel[r], "tail": ent[t]}, "test_ids": (h, r, t), "mode": s.mode,
             "exact": s.rerank, "optimizer": s.optimizer} for h, r, t in test]
        if s.mode == "abs":
            out = []
            for m, c in enumerate(common):
                merged = {int(i): float(v) for v, i in zip(np.r_[pv[m], ov[m]], np.r_[pi[m], oi[m]], strict=True) if i >= 0}
                top = sorted(((v, i) for i, v in merged.items()), key=lambda x: (-abs(x[0]), x[1]))[: s.k]
                values, ids = np.array([v for v, _ in top], dtype=np.float64), np.array([i for _, i in top], dtype=np.int64)
                out.append(QueryResult(top=self.entries(values[None], ids[None], np.array([len(top)]))[0], **c))
            return out
        pro = self.entries(*_ranked(pv, pi, 1.0, s.k))
        opp = self.entries(*_ranked(ov, oi, -1.0, s.k))
        return [QueryResult(proponents=p, opponents=o, **c) for p, o, c in zip(pro, opp, common, strict=True)]


def self_influence_ranking(index: Store | Where, top: int | None = None, values: np.ndarray | None = None) -> Ranking:
    """:meth:`TracinIndex.self_influence` from the store alone (no model needed: the values are stored), or
    the rows ranked by ``values`` (one per row) when given."""
    store = index if isinstance(index, Store) else Store.open(index)
    if values is None:
        values = store.read("self_influence").astype(np.float64)
    if top is not None and not 1 <= top <= len(values):
        raise InputError(f"{arg('top', top)} is out of range; choose 1..{len(values)} (the indexed training triples)")
    train_index = store.read("train_index").astype(np.int64)
    order = np.lexsort((train_index, -values))[:top]
    triples = store.read("triples").astype(np.int64)[order]
    ent, rel = store.labels()
    return Ranking(
        Influence(rank=rank, train_index=int(train_index[i]), head=ent[h], relation=rel[r], tail=ent[t],
                  head_id=int(h), relation_id=int(r), tail_id=int(t), influence=float(values[i]))
        for rank, (i, (h, r, t)) in enumerate(zip(order, triples, strict=True), start=1)
    )
