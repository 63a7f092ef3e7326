"""Stage 7: the query phase. Test gradients, the same projection, candidate search, exact re-rank.

One engine serves the ad-hoc ``query``, the bulk ``score`` and the set-level ``aggregate``: test
triples are processed in batches (gradients computed once per batch, never per triple), candidates are
retrieved for both ends by one exact scan (masked or weighted for filters and the cosine mode), and
the batch's (test, candidate) pairs are re-ranked by exact TracIn train-major: each distinct
candidate's gradient once per batch, only the asked products.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import IndexMismatchError, InputError
from .location import Where, location
from .model import (
    PYKEEN_PREFIX,
    Checkpoint,
    ModelBundle,
    TriplesData,
    load_checkpoints,
    load_model,
    load_test_triples,
    parse_triple,
    select_parameters,
    suggest,
    triples_fingerprint,
)
from .projection import ProjectionSpec
from .runtime import resolve_device
from .search import available_memory, load_rows, make_searcher
from .store import Store
from .tracer import Tracer

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "MODES",
    "AggregateResult",
    "Influence",
    "QueryResult",
    "Ranking",
    "Results",
    "ScoreSettings",
    "TracinIndex",
    "default_candidates",
    "open_index",
    "self_influence_ranking",
]

MODES = ("dot", "cosine", "abs")
Progress = Callable[[int, int], None]


BULK_MEMORY = 2 * 2**30  # bytes of test gradients and candidate pairs per bulk batch
PAIR_BYTES = 64  # bookkeeping per (test, candidate) pair in the re-rank: keys, ids, values, their sorts


def default_candidates(k: int) -> tuple[int, int]:
    """Search candidates re-ranked exactly, per end: (proponents, opponents).

    Opponents get more: their influences are small and projection noise swamps them (DESIGN section 3).
    """
    return max(10 * k, 100), max(50 * k, 500)


# ---------------------------------------------------------------------------------------------- results


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
    """

    test: dict[str, str]
    test_ids: tuple[int, int, int]
    mode: str = "dot"
    proponents: list[Influence] = field(default_factory=list)
    opponents: list[Influence] = field(default_factory=list)
    top: list[Influence] = field(default_factory=list)
    exact: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"test": self.test, "mode": self.mode, **_lists_dict(self)}

    def records(self, test_index: int = 0) -> list[dict[str, Any]]:
        """One flat row per (kind, rank): the bulk output schema (see the README)."""
        h, r, t = self.test_ids
        test = {"test_index": test_index, "test_head": self.test["head"], "test_relation": self.test["relation"],
                "test_tail": self.test["tail"], "test_head_id": h, "test_relation_id": r, "test_tail_id": t,
                "mode": self.mode}
        return [{**test, **_train_record(kind, i)} for kind, items in _lists(self) for i in items]

    def to_frame(self) -> pd.DataFrame:
        return Results([self]).to_frame()


class Results(list[QueryResult]):
    """Results of several test triples, in input order; ``to_frame()`` gives the bulk output schema."""

    def to_frame(self) -> pd.DataFrame:
        import pandas as pd

        rows = [rec for m, res in enumerate(self) for rec in res.records(m)]
        return pd.DataFrame(rows, columns=list(TEST_COLUMNS + TRAIN_COLUMNS))


@dataclass(frozen=True)
class AggregateResult:
    """Training triples ranked by their influence summed over a whole test set."""

    mode: str
    num_test: int
    proponents: list[Influence] = field(default_factory=list)
    opponents: list[Influence] = field(default_factory=list)
    top: list[Influence] = field(default_factory=list)
    exact: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "num_test": self.num_test, **_lists_dict(self)}

    def records(self) -> list[dict[str, Any]]:
        return [{"mode": self.mode, **_train_record(kind, i)} for kind, items in _lists(self) for i in items]

    def to_frame(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame(self.records(), columns=["mode", *TRAIN_COLUMNS])


class Ranking(list[Influence]):
    """A ranked list of training triples (e.g. by self-influence); ``to_frame()`` gives a DataFrame."""

    def to_frame(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame([asdict(i) for i in self], columns=list(TRAIN_COLUMNS[1:]))


@dataclass(frozen=True)
class ScoreSettings:
    """What a ranking depends on, besides the index and the test triples.

    ``relations``: relation ids a listed training triple must have (None = any). ``neighbourhood``:
    listed training triples must share an entity with their test triple. Both restrict the search
    before the top-K cut. ``candidates`` / ``opponent_candidates``: rows retrieved per end and
    re-ranked exactly (None = :func:`default_candidates`).
    """

    k: int = 10
    mode: str = "dot"
    relations: tuple[int, ...] | None = None
    neighbourhood: bool = False
    candidates: int | None = None
    opponent_candidates: int | None = None
    rerank: bool = True

    def per_end(self) -> tuple[int, int]:
        dp, do = default_candidates(self.k)
        return max(self.k, self.candidates or dp), max(self.k, self.opponent_candidates or self.candidates or do)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- index


def _reciprocal(x: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x, dtype=np.float32)
    np.divide(1.0, x, out=out, where=x > 0)
    return out


def _distinct_inverse(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(a, return_inverse=True)`` for a 1-D int array, by one stable sort: numpy 2's ``unique``
    hashes first (12 against 0.6 ms for 60,000 int64; tens of seconds for a bulk batch's 10M keys)."""
    order = np.argsort(a, kind="stable")
    ranked = a[order]
    first = np.r_[True, ranked[1:] != ranked[:-1]] if len(ranked) else np.zeros(0, dtype=bool)
    inverse = np.empty(len(a), dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    return ranked[first], inverse


def _ranked(values: np.ndarray, ids: np.ndarray, sign: float, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of ``(M, n)`` places: the ``k`` with ``sign * value > 0``, largest ``sign * value`` first, ties by
    row id. Returns ``(values, ids, counts)``: each row's first ``counts[m]`` places are its list. One lexsort
    for all rows (per test, 600 small sorts took 4.5 ms of a 100-test query)."""
    keep = (ids >= 0) & (values * sign > 0)
    order = np.lexsort((ids, -sign * values, ~keep), axis=-1)[:, :k]
    return np.take_along_axis(values, order, 1), np.take_along_axis(ids, order, 1), np.minimum(keep.sum(1), k)


def _influence(rank: int, train_index: int, head: str, relation: str, tail: str, head_id: int, relation_id: int,
               tail_id: int, influence: float) -> Influence:
    """``Influence(...)`` without the frozen dataclass's ``object.__setattr__`` per field (3x faster; a
    100-test query makes 2,000 of them)."""
    item = object.__new__(Influence)
    item.__dict__.update(rank=rank, train_index=train_index, head=head, relation=relation, tail=tail, head_id=head_id,
                         relation_id=relation_id, tail_id=tail_id, influence=influence)
    return item


class TracinIndex:
    """A built index, opened with the model and checkpoints it was built from.

    Use :func:`open_index`. ``query`` ranks training triples for test triples, ``score`` does it for a
    whole test set in batches, ``aggregate`` ranks by influence summed over a test set,
    ``self_influence`` ranks training triples by their own influence, ``info`` gives the settings.
    """

    def __init__(self, store: Store, tracer: Tracer, labels: TriplesData, search_backend: str = "auto",
                 memory: int | None = None) -> None:
        self.store = store
        self.tracer = tracer
        self.labels = labels
        self._triple_ids = store.read("triples").astype(np.int64)
        self.triples = torch.from_numpy(self._triple_ids)
        self.train_index = store.read("train_index").astype(np.int64)
        # built from the rows, every chunk's checksum checked: the blocked scan (float32 on the CPU, float16 on a GPU)
        self.searcher = make_searcher(store, tracer.device, search_backend, memory)
        self._inv_norms = _reciprocal(store.read("norms").astype(np.float32))  # (N, C): the cosine mode's row scale
        self._acts = self._load_acts()
        self._per_test_bytes: int | None = None

    def _load_acts(self) -> tuple[str, torch.Tensor] | None:
        """The build's activation cache (module name, ``(N, C*R*out)`` float32) when it has one and it fits
        in a quarter of the available memory; else None, and the re-rank recomputes that layer."""
        cache = self.store.attrs.get("activation_cache")
        if not cache or "acts" not in self.store.group:
            return None
        if self.num_rows * int(cache["width"]) * 4 > available_memory() // 4:
            return None
        return str(cache["module"]), load_rows(self.store, "acts")

    @property
    def num_rows(self) -> int:
        """Rows in the index (the training triples, or the sample of them that was indexed)."""
        return int(self.triples.shape[0])

    @property
    def num_checkpoints(self) -> int:
        return len(self.tracer.checkpoints)

    def info(self) -> dict[str, Any]:
        """The store's attributes (settings, fingerprints, tracked parameters, sample)."""
        return self.store.attrs

    # ------------------------------------------------------------------ inputs

    def parse(self, triples: Any) -> torch.Tensor:
        """Test triples to raw ids ``(M, 3) int64``.

        Accepts ``"head relation tail"`` label strings (one or a list), raw id tuples, an ``(M, 3)``
        tensor or array, a label TSV path, a pykeen triples directory, or ``"pykeen:DATASET[:SPLIT]"``.
        """
        if isinstance(triples, os.PathLike) or (
            isinstance(triples, str) and (triples.startswith(PYKEEN_PREFIX) or (os.path.exists(triples) and "\t" not in triples))
        ):
            return load_test_triples(triples, self.labels)
        if isinstance(triples, np.ndarray):
            triples = torch.from_numpy(triples)
        if isinstance(triples, torch.Tensor):
            out = triples.reshape(-1, 3).to(torch.long)
        else:
            single = isinstance(triples, str) or (
                isinstance(triples, tuple | list) and len(triples) == 3 and all(isinstance(x, numbers.Integral) for x in triples))
            rows = []
            for item in [triples] if single else list(triples):
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

    def relation_ids(self, relations: Sequence[str | int] | None) -> tuple[int, ...] | None:
        """Relation labels (or ids) to sorted ids, refusing unknown ones with the closest labels."""
        if not relations:
            return None
        table, labels = self.labels.relation_to_id, self.labels.relation_labels
        out = set()
        for r in relations:
            if isinstance(r, int) or (isinstance(r, str) and r not in table and r.isdigit()):
                i = int(r)
                if not 0 <= i < len(labels):
                    raise InputError(f"--relation {r}: relation id out of range (0..{len(labels) - 1})")
                out.add(i)
            elif r in table:
                out.add(table[r])
            else:
                raise InputError(f"--relation {r!r} is not a relation of this index{suggest(r, labels)}")
        return tuple(sorted(out))

    def settings(self, k: int = 10, *, mode: str = "dot", relations: Sequence[str | int] | None = None,
                 neighbourhood: bool = False, candidates: int | None = None,
                 opponent_candidates: int | None = None, rerank: bool = True) -> ScoreSettings:
        """Checked :class:`ScoreSettings` (labels resolved, ranges checked)."""
        if mode not in MODES:
            raise InputError(f"--mode {mode!r} is unknown; choose one of {', '.join(MODES)}")
        if not 1 <= k <= self.num_rows:
            raise InputError(f"--top-k {k} is out of range; choose 1..{self.num_rows} (the indexed training triples)")
        for name, value in (("--candidates", candidates), ("--opponent-candidates", opponent_candidates)):
            if value is not None and value < 1:
                raise InputError(f"{name} {value} must be at least 1")
        return ScoreSettings(k=k, mode=mode, relations=self.relation_ids(relations), neighbourhood=neighbourhood,
                             candidates=candidates, opponent_candidates=opponent_candidates, rerank=rerank)

    # ------------------------------------------------------------------ exact values

    def test_rows(self, test: torch.Tensor) -> tuple[np.ndarray, list[list[Any]]]:
        """Projected query rows ``(M, C*k) float32`` and the exact gradient blocks per checkpoint."""
        r = self.tracer.rows(test, keep_blocks=True)
        return r.rows.cpu().numpy().astype(np.float32), r.blocks

    def exact_influence(self, test: Any, rows: torch.Tensor | np.ndarray | None = None, mode: str = "dot") -> torch.Tensor:
        """Exact influence ``(M, n) float32`` of test triples on index rows (all by default), brute force.

        ``mode="cosine"`` gives ``sum_c lr_c cos(g_c(train), g_c(test)) / sum_c lr_c`` (in [-1, 1]); dot and
        abs give raw TracIn.
        """
        t = self.parse(test)
        r = self.tracer.rows(t, keep_blocks=True)
        idx = torch.arange(self.num_rows) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        test_scale = train_scale = None
        if mode == "cosine":
            test_scale = torch.from_numpy(self._cosine_scale(r.sq_norms))
            train_scale = torch.from_numpy(self._row_scale()[idx.numpy()])
        if len(idx) == 0:
            return torch.zeros((t.shape[0], 0))
        return self.tracer.exact(r.blocks, self.triples[idx], test_scale=test_scale, train_scale=train_scale).cpu()

    def _cosine_scale(self, sq_norms: torch.Tensor) -> np.ndarray:
        """Per test and checkpoint ``1 / (||g'_c|| sum_c lr_c)``: cosines averaged with weights ``lr_c / sum lr``."""
        lr_sum = sum(c.lr for c in self.tracer.checkpoints)
        return _reciprocal(sq_norms.sqrt().cpu().numpy() * lr_sum)

    def _row_scale(self) -> np.ndarray:
        return self._inv_norms

    # ------------------------------------------------------------------ the engine

    def _mask(self, test: torch.Tensor | None, s: ScoreSettings) -> Callable[[int, int], torch.Tensor | None] | None:
        if s.relations is None and not s.neighbourhood:
            return None
        rel_ok = None if s.relations is None else torch.isin(self.triples[:, 1], torch.tensor(s.relations))
        heads, tails = self.triples[:, 0], self.triples[:, 2]

        def mask(start: int, stop: int) -> torch.Tensor | None:
            out = None if rel_ok is None else rel_ok[start:stop]
            if s.neighbourhood and test is not None:
                hb, tb = heads[start:stop, None], tails[start:stop, None]
                eh, et = test[None, :, 0], test[None, :, 2]
                near = (hb == eh) | (hb == et) | (tb == eh) | (tb == et)
                out = near if out is None else near & out[:, None]
            return out

        return mask

    def _retrieve(self, q: np.ndarray, s: ScoreSettings, mask: Any, row_scale: np.ndarray | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        n_pro, n_opp = s.per_end()
        return self.searcher.search(q, n_pro, n_opp, row_scale=row_scale, mask=mask)

    def _queries(self, test: torch.Tensor, s: ScoreSettings, keep_blocks: bool) -> tuple[np.ndarray, torch.Tensor | None, Any]:
        """Query rows ``(M, W)`` (normalised per checkpoint in cosine mode), the test scale, and the blocks."""
        r = self.tracer.rows(test, keep_blocks=keep_blocks)
        q = r.rows.cpu().numpy().astype(np.float32)
        if s.mode != "cosine":
            return q, None, r.blocks
        scale = self._cosine_scale(r.sq_norms)
        q = (q.reshape(len(q), self.num_checkpoints, -1) * scale[:, :, None]).reshape(len(q), -1)
        return q, torch.from_numpy(scale), r.blocks

    def score_batch(self, test: torch.Tensor, s: ScoreSettings, progress: Callable[[float], None] | None = None) -> Results:
        """Rank training triples for one batch of test triples ``(M, 3) int64`` (the engine).

        ``progress(fraction)`` is called as the batch goes (a bulk batch can be the whole test set):
        after the search (weighted 0.45, about its share of the time at FB15k-237 scale), then per
        batch of re-ranked training triples.
        """
        q, test_scale, blocks = self._queries(test, s, keep_blocks=s.rerank)
        row_scale = self._row_scale() if s.mode == "cosine" else None
        ps, pi, os_, oi = self._retrieve(q, s, self._mask(test, s), row_scale)
        if s.rerank:
            if progress is not None:
                progress(0.45)
            pv, ov = self._rerank(blocks, pi, oi, test_scale, row_scale,
                                  None if progress is None else (lambda f: progress(0.45 + 0.55 * f)))
        else:
            pv, ov = ps, os_
        return Results(self._results(test, s, pi, pv, oi, ov))

    def _rerank(self, blocks: list[Any], pi: np.ndarray, oi: np.ndarray, test_scale: torch.Tensor | None,
                row_scale: np.ndarray | None, progress: Callable[[float], None] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """Exact values of every (test, candidate) pair, train-major: each candidate's gradient once per batch.

        Only the asked pairs are computed (:meth:`Tracer.exact_pairs`), not the tests x union matrix, so a
        large batch of tests costs its pairs plus one gradient per distinct candidate: the bigger the
        batch, the more tests share each recomputed training gradient.
        """
        m = pi.shape[0]
        cand = np.concatenate([pi, oi], axis=1)
        valid = cand >= 0
        # (row, test) pairs, asked once or twice, sorted by row then test; each asked place's pair among them
        keys, pair_of = _distinct_inverse((cand.astype(np.int64) * m + np.arange(m)[:, None])[valid])
        at = np.zeros(cand.shape, dtype=np.int64)
        at[valid] = pair_of
        rows, tests = keys // m, keys % m
        union, pair_train = _distinct_inverse(rows)
        values = self.tracer.exact_pairs(
            blocks, self.triples[torch.from_numpy(union)], torch.from_numpy(tests), torch.from_numpy(pair_train),
            test_scale=test_scale, train_scale=None if row_scale is None else torch.from_numpy(row_scale[union]),
            progress=progress, train_acts=None if self._acts is None else (self._acts[0], self._acts[1][union]),
        ).numpy()

        # each (test, candidate)'s exact value; 0 for the -1 of a missing place
        got = np.where(valid, values[at] if len(values) else 0.0, 0.0).astype(np.float32)
        return got[:, : pi.shape[1]], got[:, pi.shape[1] :]

    def _results(self, test: torch.Tensor, s: ScoreSettings, pi: np.ndarray, pv: np.ndarray, oi: np.ndarray,
                 ov: np.ndarray) -> list[QueryResult]:
        """The rankings of tests ``(M, 3)`` from their candidates' ids and values per end ``(M, n)``."""
        ent, rel = self.labels.entity_labels, self.labels.relation_labels
        common: list[dict[str, Any]] = [
            {"test": {"head": ent[h], "relation": rel[r], "tail": ent[t]}, "test_ids": (h, r, t), "mode": s.mode,
             "exact": s.rerank} for h, r, t in test.tolist()]
        if s.mode == "abs":
            out = []
            for m, c in enumerate(common):
                merged = {int(i): float(v) for v, i in zip(np.r_[pv[m], ov[m]], np.r_[pi[m], oi[m]], strict=True) if i >= 0}
                top = sorted(((v, i) for i, v in merged.items()), key=lambda x: (-abs(x[0]), x[1]))[: s.k]
                values, ids = np.array([v for v, _ in top], dtype=np.float64), np.array([i for _, i in top], dtype=np.int64)
                out.append(QueryResult(top=self._entries(values[None], ids[None], np.array([len(top)]))[0], **c))
            return out
        pro = self._entries(*_ranked(pv, pi, 1.0, s.k))
        opp = self._entries(*_ranked(ov, oi, -1.0, s.k))
        return [QueryResult(proponents=p, opponents=o, **c) for p, o, c in zip(pro, opp, common, strict=True)]

    def _entries(self, values: np.ndarray, rows: np.ndarray, counts: np.ndarray) -> list[list[Influence]]:
        """Per row of ``(M, n)`` ranked places, its first ``counts[m]`` as entries (ids and positions gathered
        once for all)."""
        safe = np.maximum(rows, 0)
        triples, positions, scores = self._triple_ids[safe].tolist(), self.train_index[safe].tolist(), values.tolist()
        ent, rel = self.labels.entity_labels, self.labels.relation_labels
        return [[_influence(j + 1, pos[j], ent[h], rel[r], ent[t], h, r, t, sc[j]) for j, (h, r, t) in enumerate(trip[:c])]
                for trip, pos, sc, c in zip(triples, positions, scores, counts.tolist(), strict=True)]

    # ------------------------------------------------------------------ public rankings

    def query(self, triples: Any, k: int = 10, *, mode: str = "dot", relations: Sequence[str | int] | None = None,
              neighbourhood: bool = False, candidates: int | None = None, opponent_candidates: int | None = None,
              rerank: bool = True, batch_size: int | None = None) -> Results:
        """Top-``k`` proponents and opponents (or ``top`` by magnitude) of each test triple.

        ``triples``: what :meth:`parse` accepts. ``mode``: ``dot`` (raw TracIn), ``cosine``
        (``sum_c lr_c cos(g_c, g'_c) / sum_c lr_c``, in [-1, 1], from the stored norms), ``abs`` (largest ``|influence|``).
        ``relations`` / ``neighbourhood`` restrict the candidates before the top-``k`` cut.
        Candidates are retrieved per end (``candidates`` / ``opponent_candidates``) and, with
        ``rerank``, scored by exact TracIn, so the listed values are exact. Returns :class:`Results`
        (a list of :class:`QueryResult`, in input order).
        """
        s = self.settings(k, mode=mode, relations=relations, neighbourhood=neighbourhood, candidates=candidates,
                          opponent_candidates=opponent_candidates, rerank=rerank)
        return self.score(triples, s, batch_size=batch_size)

    def bulk_batch_size(self, n_tests: int, settings: ScoreSettings | None = None, memory: int = BULK_MEMORY,
                        *, requested: int | None = None) -> int:
        """Test triples per bulk batch: ``requested`` (checked), else as many as ``memory`` holds (their exact
        gradients and candidate pairs).

        The re-rank computes each distinct candidate's gradient once per batch, so a batch of the whole
        test set recomputes at most every training triple once; batches of 64 would recompute ~38k rows
        each at FB15k-237 scale. At least 64 (a batch is also the unit a killed ``write_scores`` resumes from).
        """
        if requested is not None:
            if requested < 1:
                raise InputError(f"--batch-size {requested} must be at least 1")
            return requested
        if self._per_test_bytes is None:
            with torch.no_grad():
                r = self.tracer.rows(self.triples[:1], keep_blocks=True)
            self._per_test_bytes = sum(t.nbytes for blocks in r.blocks for blk in blocks
                                       for t in vars(blk).values() if isinstance(t, torch.Tensor))
        pairs = sum((settings or ScoreSettings()).per_end())
        per_test = self._per_test_bytes + pairs * PAIR_BYTES + 4 * self.searcher.width
        return max(1, min(n_tests, max(64, memory // per_test)))

    def score(self, test: Any, settings: ScoreSettings | None = None, *, batch_size: int | None = None,
              progress: Progress | None = None, **kwargs: Any) -> Results:
        """Bulk scoring of a whole test set, in batches of ``batch_size`` test triples.

        ``batch_size`` None: :meth:`bulk_batch_size` (the whole test set, when its gradients fit 2 GiB).

        ``test``: what :meth:`parse` accepts (a file, ``pykeen:nations``, ids, labels). Settings come as
        a :class:`ScoreSettings` or as :meth:`query`'s keywords. ``progress(done, total)`` is called
        as batches go (in test triples, estimated within a batch). For a results file that survives a
        kill, use :func:`tracin_index.write_scores`.
        """
        s = settings or self.settings(**kwargs)
        t = self.parse(test)
        out = Results()
        for batch in self.iter_batches(t, s, batch_size=batch_size, progress=progress):
            out.extend(batch)
            if progress is not None:
                progress(len(out), len(t))
        return out

    def iter_batches(self, test: torch.Tensor, s: ScoreSettings, *, batch_size: int | None = None, start: int = 0,
                     progress: Progress | None = None) -> Iterator[Results]:
        """:meth:`score_batch` over consecutive batches of ``test`` from batch number ``start``.

        ``progress(done, len(test))`` is called within each batch (estimated; see :meth:`score_batch`).
        """
        size = self.bulk_batch_size(len(test), s, requested=batch_size)
        for b0 in range(start * size, len(test), size):
            part = test[b0 : b0 + size]

            def within(fraction: float, b0: int = b0, n: int = len(part)) -> None:
                assert progress is not None
                progress(b0 + int(n * fraction), len(test))

            with torch.no_grad():
                yield self.score_batch(part, s, within if progress is not None else None)

    def aggregate(self, test: Any, k: int = 10, *, mode: str = "dot", relations: Sequence[str | int] | None = None,
                  candidates: int | None = None, opponent_candidates: int | None = None, rerank: bool = True,
                  batch_size: int = 256, progress: Progress | None = None) -> AggregateResult:
        """Training triples ranked by influence summed over the whole test set (which matter most overall).

        TracIn is linear in the test gradient, so the sum over tests is one search with the summed
        query row; candidates are re-ranked by the exact sum (a second pass over the tests).
        """
        s = self.settings(k, mode=mode, relations=relations, candidates=candidates,
                          opponent_candidates=opponent_candidates, rerank=rerank)
        t = self.parse(test)
        total = np.zeros(self.searcher.width, dtype=np.float64)
        passes = 2 if rerank else 1
        for b0 in range(0, len(t), batch_size):
            with torch.no_grad():
                q, _, _ = self._queries(t[b0 : b0 + batch_size], s, keep_blocks=False)
            total += q.astype(np.float64).sum(0)
            if progress is not None:
                progress(min(len(t), b0 + batch_size), passes * len(t))
        row_scale = self._row_scale() if mode == "cosine" else None
        q_sum = total.astype(np.float32)[None, :]
        ps, pi, os_, oi = self._retrieve(q_sum, s, self._mask(None, s), row_scale)
        pi, ps, oi, os_ = pi[0], ps[0], oi[0], os_[0]
        if rerank:
            union = _distinct_inverse(np.concatenate([pi[pi >= 0], oi[oi >= 0]]))[0]
            exact = np.zeros(len(union), dtype=np.float64)
            for b0 in range(0, len(t), batch_size):
                if len(union) == 0:
                    break
                with torch.no_grad():
                    _, test_scale, blocks = self._queries(t[b0 : b0 + batch_size], s, keep_blocks=True)
                    part = self.tracer.exact(
                        blocks, self.triples[torch.from_numpy(union)], test_scale=test_scale,
                        train_scale=None if row_scale is None else torch.from_numpy(row_scale[union]),
                    )
                exact += part.cpu().numpy().astype(np.float64).sum(0)
                if progress is not None:
                    progress(len(t) + min(len(t), b0 + batch_size), passes * len(t))
            if len(union):
                ps = exact[np.searchsorted(union, np.maximum(pi, 0))]
                os_ = exact[np.searchsorted(union, np.maximum(oi, 0))]
        r = self._results(torch.zeros(1, 3, dtype=torch.long), s, pi[None], ps[None], oi[None], os_[None])[0]
        return AggregateResult(mode=mode, num_test=len(t), proponents=r.proponents, opponents=r.opponents, top=r.top,
                               exact=rerank)

    def self_influence(self, top: int | None = None) -> Ranking:
        """Indexed training triples ranked by exact self-influence ``sum_c lr_c ||g_c||^2`` (largest first).

        High self-influence marks triples the model found hard: mislabelled or noisy ones rank high.
        ``top``: how many (None = all). Ties are broken by training position.
        """
        return self_influence_ranking(self.store, top)


def self_influence_ranking(index: Store | Where, top: int | None = None) -> Ranking:
    """:meth:`TracinIndex.self_influence` from the store alone (no model needed: the values are stored)."""
    store = index if isinstance(index, Store) else Store.open(index)
    values = store.read("self_influence").astype(np.float64)
    if top is not None and not 1 <= top <= len(values):
        raise InputError(f"--top {top} is out of range; choose 1..{len(values)} (the indexed training triples)")
    train_index = store.read("train_index").astype(np.int64)
    order = np.lexsort((train_index, -values))[:top]
    triples = store.read("triples").astype(np.int64)[order]
    ent, rel = store.labels()
    return Ranking(
        Influence(rank=rank, train_index=int(train_index[i]), head=ent[h], relation=rel[r], tail=ent[t],
                  head_id=int(h), relation_id=int(r), tail_id=int(t), influence=float(values[i]))
        for rank, (i, (h, r, t)) in enumerate(zip(order, triples, strict=True), start=1)
    )


def open_index(
    path: Where,
    *,
    model: ModelBundle | str | os.PathLike[str] | None = None,
    checkpoints: list[tuple[str, float]] | None = None,
    layers: str | None = None,
    loss: str | None = None,
    projection: ProjectionSpec | None = None,
    device: str | None = "cpu",
    search: str = "auto",
    memory: int | None = None,
) -> TracinIndex:
    """Open a built index with the model it was built from (or ``model``), refusing any mismatch.

    ``layers``, ``loss`` and ``projection``, when given, must equal the store's; the model's and the
    checkpoints' fingerprints must equal the recorded ones. ``search``: the candidate-search backend,
    ``auto`` (the torch blocked scan where the model runs, or faiss-gpu's index on a GPU when it is
    installed; a stream from the store when the rows do not fit in memory), ``torch`` (the scan; on the CPU, ad-hoc
    queries go through an int8 copy of the rows first), ``full`` (the scan without that prefilter), ``faiss`` or
    ``stream`` (exact, one block
    of at most ``memory`` bytes in RAM at a time: stores larger than memory). ``memory``: the bytes the
    search may hold (default: the in-memory index if it fits in half the available RAM, else 256 MiB blocks).
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
        raise IndexMismatchError(f"index {location(path)} does not match this query: " + "; ".join(differences))
    tracer = Tracer(bundle, ckpts, names, attrs["loss"], spec, resolve_device(device))
    ent, rel = store.labels()
    labels = TriplesData(mapped=bundle.triples.mapped, entity_labels=ent, relation_labels=rel)
    return TracinIndex(store, tracer, labels, search, memory)
