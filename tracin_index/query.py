"""Stage 7: the query phase. Test gradients, the same projection, candidate search, exact re-rank.

One engine serves the ad-hoc ``query``, the bulk ``score`` and the set-level ``aggregate``: test
triples are processed in batches (gradients computed once per batch, never per triple), candidates are
retrieved for both ends by one exact scan (masked or weighted for filters and the cosine mode), and
the batch's (test, candidate) pairs are re-ranked by exact TracIn train-major: each distinct
candidate's gradient once per batch, only the asked products (:mod:`.pairs`). A question ``h r ?`` becomes
the model's own top completions (:mod:`.questions`) before it is explained; a contrastive question is the
same engine on the score margin. Rankings are built by :class:`~tracin_index.rankings.RowTable`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from .errors import InputError, arg
from .optimizer import Preconditioner
from .pairs import Activations, StoredActs, distinct_inverse, rerank
from .questions import Predictions, with_predictions
from .rankings import (
    TEST_COLUMNS,
    TRAIN_COLUMNS,
    AggregateResult,
    Influence,
    QueryResult,
    Ranking,
    Results,
    RowTable,
    ScoreSettings,
    default_candidates,
    self_influence_ranking,
)
from .registry import MODES, OPTIMIZERS
from .search import available_memory, load_rows, make_searcher
from .store import Store
from .tracer import Rows, Tracer
from .triples import QUESTION, TriplesData, parse_triples, relation_ids

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


class TracinIndex:
    """A built index, opened with the model and checkpoints it was built from.

    Use :func:`open_index`. ``query`` ranks training triples for test triples, ``score`` does it for a
    whole test set in batches, ``aggregate`` ranks by influence summed over a test set,
    ``self_influence`` ranks training triples by their own influence, ``info`` gives the settings.
    """

    def __init__(self, store: Store, tracer: Tracer, labels: TriplesData, search_backend: str = "auto",
                 memory: int | None = None, *, optimizer: str = OPTIMIZERS.default, nprobe: int | None = None,
                 shards: int | None = None) -> None:
        self.store = store
        self.tracer = tracer
        self.labels = labels
        triple_ids = store.read("triples").astype(np.int64)
        self.triples = torch.from_numpy(triple_ids)
        self.train_index = store.read("train_index").astype(np.int64)
        self.table = RowTable(triple_ids, self.train_index, labels.entity_labels, labels.relation_labels)
        # built from the rows, every chunk's checksum checked: the blocked scan (float32 on the CPU, float16 on a GPU)
        self.searcher = make_searcher(store, tracer.device, search_backend, memory, nprobe, shards)
        self._inv_norms = _reciprocal(store.read("norms").astype(np.float32))  # (N, C): the cosine mode's row scale
        self._acts = self._load_acts()
        self._per_test_bytes: dict[str, int] = {}  # per optimizer: a test triple's gradient blocks
        self._preconditioners: dict[str, Preconditioner] = {}
        self.optimizer = self.preconditioner(optimizer).name  # the queries' default, its checkpoints' state checked now
        self.predictions = Predictions(tracer, labels)  # the trained model's own completions of questions
        self._self_influence: dict[str, np.ndarray] = {}  # per optimizer whose values are not stored

    def _load_acts(self) -> Activations | None:
        """The build's activation cache (module name, ``(N, C*R*out)`` float32), None without one (the re-rank
        recomputes that layer). Held in memory when it fits in a quarter of the available memory and the search
        holds rows too; else (the FAISS index's compact codes, or a large store) the candidates' rows are read
        from the store per query."""
        cache = self.store.attrs.get("activation_cache")
        if not cache or "acts" not in self.store.group:
            return None
        if self.searcher.backend == "ann" or self.num_rows * int(cache["width"]) * 4 > available_memory() // 4:
            return str(cache["module"]), StoredActs(self.store)
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

    def preconditioner(self, optimizer: str | None = None) -> Preconditioner:
        """The test gradients' preconditioner for the training ``optimizer`` (None: the index's default), made
        once from the checkpoints' optimizer states (:mod:`tracin_index.optimizer`); refused in one line when
        they lack what it needs."""
        name = OPTIMIZERS.check(optimizer or self.optimizer)
        if name not in self._preconditioners:
            t = self.tracer
            self._preconditioners[name] = Preconditioner.make(name, t.checkpoints, t.tracked, t.device)
        return self._preconditioners[name]

    def _rows(self, test: torch.Tensor, optimizer: str | None, keep_blocks: bool) -> Rows:
        """The test side of every influence: rows, norms and blocks of the test triples' gradients, each
        checkpoint's preconditioned by ``optimizer``'s step."""
        return self.tracer.rows(test, keep_blocks=keep_blocks, precondition=self.preconditioner(optimizer))

    # ------------------------------------------------------------------ inputs

    def parse(self, triples: Any, *, questions: bool = False) -> torch.Tensor:
        """Test triples to raw ids ``(M, 3) int64`` (:func:`~tracin_index.triples.parse_triples`); with
        ``questions``, ``"head relation ?"`` and ``"? relation tail"`` too (their ``?`` is ``QUESTION``)."""
        return parse_triples(triples, self.labels, questions=questions)

    def relation_ids(self, relations: Sequence[str | int] | None) -> tuple[int, ...] | None:
        """Relation labels (or ids) to sorted ids (:func:`~tracin_index.triples.relation_ids`)."""
        return relation_ids(relations, self.labels)

    def settings(self, k: int = 10, *, mode: str = "dot", relations: Sequence[str | int] | None = None,
                 neighbourhood: bool = False, candidates: int | None = None,
                 opponent_candidates: int | None = None, rerank: bool = True, predictions: int = 1,
                 filtered: bool = True, optimizer: str | None = None) -> ScoreSettings:
        """Checked :class:`ScoreSettings` (labels resolved, ranges checked; ``optimizer`` None: the index's)."""
        MODES.check(mode)
        optimizer = self.preconditioner(optimizer).name
        num_entities = len(self.labels.entity_labels)
        if not 1 <= predictions <= num_entities:
            raise InputError(f"{arg('predictions', predictions)} is out of range; choose 1..{num_entities} (the entities)")
        if not 1 <= k <= self.num_rows:
            raise InputError(f"{arg('k', k)} is out of range; choose 1..{self.num_rows} (the indexed training triples)")
        for name, value in (("candidates", candidates), ("opponent_candidates", opponent_candidates)):
            if value is not None and value < 1:
                raise InputError(f"{arg(name, value)} must be at least 1")
        factor = self.searcher.candidate_factor
        if factor > 1 and candidates is None and opponent_candidates is None:  # coarse codes: more candidates
            candidates, opponent_candidates = (factor * c for c in default_candidates(k))
        return ScoreSettings(k=k, mode=mode, relations=self.relation_ids(relations), neighbourhood=neighbourhood,
                             candidates=candidates, opponent_candidates=opponent_candidates, rerank=rerank,
                             predictions=predictions, filtered=filtered, optimizer=optimizer)

    # ------------------------------------------------------------------ exact values

    def test_rows(self, test: torch.Tensor, optimizer: str | None = None) -> tuple[np.ndarray, list[list[Any]]]:
        """Projected query rows ``(M, C*k) float32`` and the exact gradient blocks per checkpoint (preconditioned
        by ``optimizer``'s step; None: the index's optimizer)."""
        r = self._rows(test, optimizer, keep_blocks=True)
        return r.rows.cpu().numpy().astype(np.float32), r.blocks

    def exact_influence(self, test: Any, rows: torch.Tensor | np.ndarray | None = None, mode: str = "dot",
                        optimizer: str | None = None) -> torch.Tensor:
        """Exact influence ``(M, n) float32`` of test triples on index rows (all by default), brute force.

        ``mode="cosine"`` gives ``sum_c lr_c cos(g_c(train), g_c(test)) / sum_c lr_c`` (in [-1, 1]); dot and
        abs give raw TracIn. ``optimizer``: whose step the influences follow (None: the index's).
        """
        t = self.parse(test)
        r = self._rows(t, optimizer, keep_blocks=True)
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
        r = self._rows(test, s.optimizer, keep_blocks=keep_blocks)
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
            pv, ov = rerank(self.tracer, self.triples, blocks, pi, oi, test_scale, row_scale, self._acts,
                            None if progress is None else (lambda f: progress(0.45 + 0.55 * f)))
        else:
            pv, ov = ps, os_
        return Results(self.table.results(test.tolist(), s, pi, pv, oi, ov))

    # ------------------------------------------------------------------ public rankings

    def query(self, triples: Any, k: int = 10, *, mode: str = "dot", relations: Sequence[str | int] | None = None,
              neighbourhood: bool = False, candidates: int | None = None, opponent_candidates: int | None = None,
              rerank: bool = True, batch_size: int | None = None, versus: Any = None, predictions: int = 1,
              filtered: bool = True, optimizer: str | None = None) -> Results:
        """Top-``k`` proponents and opponents (or ``top`` by magnitude) of each test triple.

        ``triples``: what :meth:`parse` accepts. ``mode``: ``dot`` (raw TracIn), ``cosine``
        (``sum_c lr_c cos(g_c, g'_c) / sum_c lr_c``, in [-1, 1], from the stored norms), ``abs`` (largest ``|influence|``).
        ``relations`` / ``neighbourhood`` restrict the candidates before the top-``k`` cut.
        Candidates are retrieved per end (``candidates`` / ``opponent_candidates``) and, with
        ``rerank``, scored by exact TracIn, so the listed values are exact. Returns :class:`Results`
        (a list of :class:`QueryResult`, in input order).

        A test triple may be a question, ``"head relation ?"`` or ``"? relation tail"``: its top ``predictions``
        completions by the model are explained (:meth:`explain_prediction`). ``versus``: one triple per test
        triple (or one for all); the influences are then on the margin ``s(test) - s(versus)`` between the
        model's scores (:meth:`contrast`). ``optimizer``: the training optimizer whose step the influences follow
        (None: the index's; ``adam`` preconditions each checkpoint's test gradient by Adam's second moment).
        """
        s = self.settings(k, mode=mode, relations=relations, neighbourhood=neighbourhood, candidates=candidates,
                          opponent_candidates=opponent_candidates, rerank=rerank, predictions=predictions,
                          filtered=filtered, optimizer=optimizer)
        if versus is not None:
            return self.contrast(triples, versus, s)
        return self.score(triples, s, batch_size=batch_size)

    # ------------------------------------------------------------------ the model's predictions

    def predict(self, question: Any, n: int = 10, *, filtered: bool = True) -> list[dict[str, Any]]:
        """The model's top ``n`` completions of ``"head relation ?"`` (or ``"? relation tail"``), best first:
        dicts with ``target`` (``tail`` or ``head``), ``question``, ``label``, ``id``, ``score`` (the model's
        ``predict_t`` / ``predict_h``), ``rank`` and ``filtered``. ``filtered`` ranks the candidates without the
        other known training triples, as PyKEEN's filtered evaluation does."""
        q = self.parse(question, questions=True)
        asked = (q[:, 0] == QUESTION) | (q[:, 2] == QUESTION)
        if len(q) != 1 or not bool(asked[0]):
            raise InputError(f"{arg('question', question)} is not one question; give 'head relation ?' or "
                             "'? relation tail'")
        num_entities = len(self.labels.entity_labels)
        if not 1 <= n <= num_entities:
            raise InputError(f"{arg('n', n)} is out of range; choose 1..{num_entities} (the entities)")
        return self.predictions.top(q, n, filtered)[0]

    def resolve(self, test: Any, s: ScoreSettings) -> tuple[torch.Tensor, list[dict[str, Any] | None], np.ndarray]:
        """Test triples with each question replaced by its top ``s.predictions`` completions: the triples
        ``(M', 3)``, each one's prediction (None for a given triple) and the position of its line in ``test``."""
        return self.predictions.resolve(self.parse(test, questions=True), s.predictions, s.filtered)

    def explain_prediction(self, question: Any, *, predictions: int = 1, k: int = 10, filtered: bool = True,
                           mode: str = "dot", **options: Any) -> Results:
        """The model's top ``predictions`` completions of ``"head relation ?"`` (or ``"? relation tail"``, or a
        list of questions), each explained like a full triple: proponents and opponents, with ``prediction``
        (its label, score and rank) on each result. ``options``: :meth:`query`'s other keywords."""
        if not bool(((self.parse(question, questions=True)[:, [0, 2]]) == QUESTION).any(1).all()):
            raise InputError(f"{arg('question', question)} is not a question; put ? as its head or its tail")
        return self.query(question, k, mode=mode, predictions=predictions, filtered=filtered, **options)

    # ------------------------------------------------------------------ contrastive questions

    def contrast(self, triples: Any, versus: Any, s: ScoreSettings) -> Results:
        """Which training triples make the model prefer each test triple over its ``versus`` triple.

        The test side's loss is ``-(s(test) - s(versus))``, the negated margin between the model's scores
        (summed over both directions for a model trained with inverse triples), so a training triple's
        influence is how much training on it widened the margin: proponents widen it, opponents narrow
        it. The re-rank is exact: each candidate's influence on both scores, subtracted.
        """
        if s.mode == "cosine":
            raise InputError(f"{arg('mode', 'cosine')} has no contrastive form; use {arg('mode', 'dot')} with versus")
        t, alt = self.parse(triples), self.parse(versus)
        if len(alt) == 1 and len(t) > 1:
            alt = alt.expand(len(t), 3)
        if len(alt) != len(t):
            raise InputError(f"{arg('versus')} holds {len(alt)} triples for {len(t)} test triples; give one per test "
                             "triple or one for all")
        m = len(t)
        with torch.no_grad(), self.tracer.test_loss("score"):
            r = self._rows(torch.cat([t, alt]), s.optimizer, keep_blocks=s.rerank)
        rows = r.rows.cpu().numpy().astype(np.float32)
        ps, pi, os_, oi = self._retrieve(rows[:m] - rows[m:], s, self._mask(t, s), None)
        if s.rerank:
            with torch.no_grad():
                pv, ov = rerank(self.tracer, self.triples, r.blocks, np.concatenate([pi, pi]), np.concatenate([oi, oi]),
                                acts=self._acts)
            pv, ov = pv[:m] - pv[m:], ov[:m] - ov[m:]
        else:
            pv, ov = ps, os_
        ent, rel = self.labels.entity_labels, self.labels.relation_labels
        return Results(replace(res, versus={"head": ent[h], "relation": rel[r_], "tail": ent[t_]})
                       for res, (h, r_, t_) in zip(self.table.results(t.tolist(), s, pi, pv, oi, ov), alt.tolist(), strict=True))

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
        s = settings or ScoreSettings(optimizer=self.optimizer)
        pairs = sum(s.per_end())
        per_test = self._test_bytes(s.optimizer) + pairs * PAIR_BYTES + 4 * self.searcher.width
        return max(1, min(n_tests, max(64, memory // per_test)))

    def _test_bytes(self, optimizer: str) -> int:
        """Bytes of one test triple's gradient blocks under ``optimizer`` (a preconditioned Linear's are dense)."""
        if optimizer not in self._per_test_bytes:
            with torch.no_grad():
                r = self._rows(self.triples[:1], optimizer, keep_blocks=True)
            self._per_test_bytes[optimizer] = sum(t.nbytes for blocks in r.blocks for blk in blocks
                                                  for t in vars(blk).values() if isinstance(t, torch.Tensor))
        return self._per_test_bytes[optimizer]

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
        t, answers, origin = self.resolve(test, s)
        out = Results()
        for batch in self.iter_batches(t, s, batch_size=batch_size, progress=progress):
            out.extend(batch)
            if progress is not None:
                progress(len(out), len(t))
        return with_predictions(out, answers, origin)

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
                  batch_size: int = 256, progress: Progress | None = None, optimizer: str | None = None) -> AggregateResult:
        """Training triples ranked by influence summed over the whole test set (which matter most overall).

        TracIn is linear in the test gradient, so the sum over tests is one search with the summed
        query row; candidates are re-ranked by the exact sum (a second pass over the tests).
        """
        s = self.settings(k, mode=mode, relations=relations, candidates=candidates,
                          opponent_candidates=opponent_candidates, rerank=rerank, optimizer=optimizer)
        t = self.resolve(test, s)[0]
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
            union = distinct_inverse(np.concatenate([pi[pi >= 0], oi[oi >= 0]]))[0]
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
        r = self.table.results([[0, 0, 0]], s, pi[None], ps[None], oi[None], os_[None])[0]
        return AggregateResult(mode=mode, num_test=len(t), proponents=r.proponents, opponents=r.opponents, top=r.top,
                               exact=rerank, optimizer=s.optimizer)

    def self_influence(self, top: int | None = None, *, optimizer: str | None = None, batch_size: int = 1024) -> Ranking:
        """Indexed training triples ranked by exact self-influence ``sum_c lr_c <g_c, P_c g_c>`` (largest first).

        High self-influence marks triples the model found hard: mislabelled or noisy ones rank high.
        ``top``: how many (None = all). Ties are broken by training position. ``optimizer`` (None: the index's):
        whose step ``P_c`` is; plain SGD's (``P = 1``, ``sum_c lr_c ||g_c||^2``) is stored by the build, another
        one's is computed once for every indexed triple (a pass over their gradients, like a build's) and kept,
        ``batch_size`` triples at a time (fewer where their gradients would pass 2 GiB: a preconditioned Linear's
        are dense).
        """
        p = self.preconditioner(optimizer)
        if p.identity:
            return self_influence_ranking(self.store, top)
        if p.name not in self._self_influence:
            values = np.empty(self.num_rows, dtype=np.float64)
            batch_size = max(1, min(batch_size, BULK_MEMORY // self._test_bytes(p.name)))
            for b0 in range(0, self.num_rows, batch_size):
                batch = self.triples[b0 : b0 + batch_size]
                pairs = torch.arange(len(batch))
                with torch.no_grad():
                    blocks = self.tracer.rows(batch, keep_blocks=True, precondition=p).blocks
                    values[b0 : b0 + len(batch)] = self.tracer.exact_pairs(blocks, batch, pairs, pairs).numpy()
            self._self_influence[p.name] = values
        return self_influence_ranking(self.store, top, self._self_influence[p.name])


def __getattr__(name: str) -> object:
    if name == "open_index":
        from .opening import open_index

        return open_index
    raise AttributeError(f"module 'tracin_index.query' has no attribute {name!r}")
