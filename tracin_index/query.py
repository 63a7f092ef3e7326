"""Stage 7: the query phase. Test gradients, the same projection, candidate search, exact re-rank.

One engine serves the ad-hoc ``query``, the bulk ``score`` and the set-level ``aggregate``: test
triples are processed in batches (gradients computed once per batch, never per triple), candidates are
retrieved for both ends by one exact scan (masked or weighted for filters and the cosine mode), and
the batch's (test, candidate) pairs are re-ranked by exact TracIn train-major: each distinct
candidate's gradient once per batch, only the asked products.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .errors import InputError, arg
from .rankings import (
    TEST_COLUMNS,
    TRAIN_COLUMNS,
    AggregateResult,
    Influence,
    QueryResult,
    Ranking,
    Results,
    ScoreSettings,
    _influence,
    _ranked,
    default_candidates,
    self_influence_ranking,
)
from .registry import MODES
from .search import available_memory, load_rows, make_searcher
from .store import Store
from .tracer import Tracer
from .triples import TriplesData, parse_triples, relation_ids

# the result types live in .rankings and open_index in .opening (which builds on this module); both importable
# from here as well
__all__ = ["MODES", "TEST_COLUMNS", "TRAIN_COLUMNS", "AggregateResult", "Influence", "QueryResult", "Ranking", "Results",
           "ScoreSettings", "TracinIndex", "default_candidates", "self_influence_ranking"]

Progress = Callable[[int, int], None]


BULK_MEMORY = 2 * 2**30  # bytes of test gradients and candidate pairs per bulk batch
PAIR_BYTES = 64  # bookkeeping per (test, candidate) pair in the re-rank: keys, ids, values, their sorts


def _reciprocal(x: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x, dtype=np.float32)
    np.divide(1.0, x, out=out, where=x > 0)
    return out


def _distinct_inverse(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(a, return_inverse=True)`` for a 1-D int array, by one stable sort: numpy 2's ``unique``
    hashes first, which is much slower on int64 keys, above all on a bulk batch's millions of them."""
    order = np.argsort(a, kind="stable")
    ranked = a[order]
    first = np.r_[True, ranked[1:] != ranked[:-1]] if len(ranked) else np.zeros(0, dtype=bool)
    inverse = np.empty(len(a), dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    return ranked[first], inverse


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
        """Test triples to raw ids ``(M, 3) int64`` (:func:`~tracin_index.triples.parse_triples`)."""
        return parse_triples(triples, self.labels)

    def relation_ids(self, relations: Sequence[str | int] | None) -> tuple[int, ...] | None:
        """Relation labels (or ids) to sorted ids (:func:`~tracin_index.triples.relation_ids`)."""
        return relation_ids(relations, self.labels)

    def settings(self, k: int = 10, *, mode: str = "dot", relations: Sequence[str | int] | None = None,
                 neighbourhood: bool = False, candidates: int | None = None,
                 opponent_candidates: int | None = None, rerank: bool = True) -> ScoreSettings:
        """Checked :class:`ScoreSettings` (labels resolved, ranges checked)."""
        MODES.check(mode)
        if not 1 <= k <= self.num_rows:
            raise InputError(f"{arg('k', k)} is out of range; choose 1..{self.num_rows} (the indexed training triples)")
        for name, value in (("candidates", candidates), ("opponent_candidates", opponent_candidates)):
            if value is not None and value < 1:
                raise InputError(f"{arg(name, value)} must be at least 1")
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
        after the search (weighted 0.45, roughly its share of a batch's time), then per
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
        test set recomputes at most every training triple once, while small batches recompute many of the same
        rows again in each batch. At least 64 (a batch is also the unit a killed ``write_scores`` resumes from).
        """
        if requested is not None:
            if requested < 1:
                raise InputError(f"{arg('batch_size', requested)} must be at least 1")
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


def __getattr__(name: str) -> object:
    if name == "open_index":
        from .opening import open_index

        return open_index
    raise AttributeError(f"module 'tracin_index.query' has no attribute {name!r}")
