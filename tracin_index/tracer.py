"""TracInCP over checkpoints: the one definition build and query share.

``influence(z, z') = sum_c lr_c <g_c(z), g_c(z')>``. A stored row is the concatenation over checkpoints
of ``sqrt(lr_c) * P g_c(z)``, so one inner product of rows estimates it; :meth:`Tracer.exact` computes
it exactly from the factored gradients.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .engine import Engine, Pass, describe_parameters
from .errors import InputError, arg
from .forms import GradBlock, TrackedParam, concat, inner, inner_pairs, sq_norms
from .linalg import cat_parts
from .losses import get_loss
from .model import Checkpoint, ModelBundle
from .optimizer import Preconditioner
from .plan import Plan, Probe, input_keys, probe
from .projection import DEFAULT_MEMORY, ProjectionSpec, make_projector

__all__ = ["Rows", "Tracer", "probe_triples"]

ANY_LAYOUT_FLOATS = 1 << 24  # test v columns (64 MiB) up to which exact_pairs permutes them for the candidates' order
SHARED_GROWTH = 16  # batches grow up to this many times batch_size while their rows share encoder inputs
PROBE_TRIPLES = 32_768  # ... and up to this many triples (the probe's forward to the encoder holds their inputs)
GRADIENT_MEMORY = 4 << 30  # default bytes one batch's gradients and activations may take


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} bytes"


def probe_triples(triples: torch.Tensor, n: int = 8) -> torch.Tensor:
    """``n`` triples spread evenly over ``triples (N, 3)``: the ones a model's plan is probed on."""
    if triples.shape[0] <= n:
        return triples
    return triples[torch.linspace(0, triples.shape[0] - 1, n).long()]


@dataclass
class Rows:
    """Projected rows ``(B, C*k) float32``, exact squared norms ``(B, C)``, the blocks per checkpoint,
    (when asked) the cache module's outputs ``(B, C*R*out) float32``, triple-major, and the rows' peak."""

    rows: torch.Tensor
    sq_norms: torch.Tensor
    blocks: list[list[GradBlock]]
    acts: torch.Tensor | None = None
    peak: float = 0.0  # the largest |value| of ``rows``


class Tracer:
    """Per-triple gradients, projections and exact influences of one model at its checkpoints."""

    def __init__(
        self,
        bundle: ModelBundle,
        checkpoints: list[Checkpoint],
        param_names: list[str],
        loss: str,
        projection: ProjectionSpec,
        device: torch.device,
        projection_memory: int = DEFAULT_MEMORY,
        memory: int = GRADIENT_MEMORY,
    ) -> None:
        self.bundle = bundle
        self.model = bundle.model.to(device)
        self.checkpoints = checkpoints
        self.device = device
        self.tracked: list[TrackedParam] = describe_parameters(self.model, param_names)
        self.loss = get_loss(loss)
        self.spec = projection
        self.projector = make_projector(projection, self.tracked, device, projection_memory)
        self.engine = Engine(self.model, self.tracked, self.loss)
        self.memory = memory
        self.probed: Probe | None = None  # set once by prepare()
        self._loaded: int | None = None
        self._seconds = {"gradients_s": 0.0, "projection_s": 0.0}  # accumulated by rows(), for build reports
        self._events: list[tuple[Any, Any, Any]] = []  # CUDA: (start, gradients done, projection done), unread

    def timings(self) -> dict[str, float]:
        """Seconds spent so far in rows(): gradients (forward + backward) and projection.

        On a GPU the split comes from CUDA events read here, so the hot loop never waits for the device.
        """
        for e0, e1, e2 in self._events:
            e2.synchronize()
            self._seconds["gradients_s"] += e0.elapsed_time(e1) / 1000
            self._seconds["projection_s"] += e1.elapsed_time(e2) / 1000
        self._events.clear()
        return dict(self._seconds)

    def _mark(self) -> Any:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @property
    def width(self) -> int:
        return self.projector.out_dim * len(self.checkpoints)

    @contextmanager
    def test_loss(self, name: str) -> Iterator[None]:
        """Inside the block, gradients are of the registered loss ``name`` (a question's test side, such as
        the score margin of a contrastive question); the index's own loss is back afterwards."""
        saved = self.engine.loss
        self.engine.loss = get_loss(name)
        try:
            yield
        finally:
            self.engine.loss = saved

    @contextmanager
    def with_state(self, state: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
        """The model in eval mode holding ``state`` (e.g. the trained model's own, to rank its predictions);
        the next gradient run loads its checkpoint again."""
        self.model.load_state_dict(state)
        self.model.eval()
        self._loaded = None
        try:
            yield self.model
        finally:
            self._loaded = None

    def use_checkpoint(self, c: int) -> None:
        if self._loaded != c:
            self.model.load_state_dict(self.checkpoints[c].state)
            self.model.eval()
            self._loaded = c

    @property
    def plan(self) -> Plan:
        """How the engine runs this model (found by :meth:`prepare` on first use)."""
        if self.probed is None:
            raise RuntimeError("Tracer.prepare() has not run")
        return self.probed.plan

    def prepare(self) -> Probe:
        """Probe the model at the first checkpoint on a few training triples (once): the plan, the warnings
        about tracked parameters, the memory per triple. Refuses a model whose single triple does not fit
        ``memory`` bytes."""
        if self.probed is None:
            self.use_checkpoint(0)
            found = probe(self.engine, probe_triples(self.bundle.triples.mapped))
            if found.bytes_per_triple > self.memory:
                name, size = found.largest
                raise InputError(
                    f"one triple's gradients and activations take {_size(found.bytes_per_triple)} ({name}: {_size(size)}), "
                    f"more than the {_size(self.memory)} budget; track fewer layers (e.g. {arg('layers', 'last:2')}) or raise "
                    f"the budget ({arg('gradient_memory')})")
            self.probed = found
        return self.probed

    def fit(self, batch_size: int) -> int:
        """``batch_size`` shrunk so that a batch's gradients and activations fit the memory budget."""
        return max(1, min(batch_size, self.memory // max(1, self.prepare().bytes_per_triple)))

    def gradients(self, triples: torch.Tensor, c: int, outputs: dict[str, torch.Tensor] | None = None,
                  any_layout: bool = False, batch_last: bool = False) -> Pass:
        """Blocks of checkpoint ``c`` for raw-id triples ``(B, 3) int64`` under the plan. ``outputs``,
        ``any_layout`` and ``batch_last``: as ``Engine.run`` takes them; ``outputs`` for any module but the
        plan's cache module is ignored."""
        self.prepare()
        self.use_checkpoint(c)
        if outputs is not None and set(outputs) != {self.plan.cache_module}:
            outputs = None
        return self.engine.run(triples, self.plan, stored=outputs, any_layout=any_layout, batch_last=batch_last)

    def activation_cache(self, probe: torch.Tensor) -> dict[str, Any] | None:
        """The layer whose outputs a build can store for the re-rank (the plan's cache module):
        ``{"module", "width"}`` (``width`` = C * R * out numbers per triple), or None. Runs ``probe`` once."""
        out = self.gradients(probe, 0).cache_output
        name = self.plan.cache_module
        if name is None or out is None:
            return None
        per = out.shape[0] // probe.shape[0]
        return {"module": name, "width": len(self.checkpoints) * per * int(out.shape[1])}

    def rows(self, triples: torch.Tensor, batch_size: int = 1024, keep_blocks: bool = False, keep_acts: bool = False,
             precondition: Preconditioner | None = None) -> Rows:
        """Stored rows for ``(B, 3) int64`` raw-id triples, checked for NaN/inf.

        Checkpoints are the outer loop, so a state is loaded once per call, not once per batch.
        ``keep_acts``: also the cache module's outputs (:meth:`activation_cache`), for the store.
        ``precondition``: test triples' rows at query time, of ``P_c g_c`` (the optimizer's step,
        :mod:`tracin_index.optimizer`): the rows, norms and kept blocks are all of the preconditioned gradients.
        """
        parts, norms, kept, acts = [], [], [], []
        self.prepare()
        batch_size = self.fit(batch_size)
        if precondition is not None and precondition.identity:
            precondition = None
        if precondition is not None:
            batch_size = max(1, min(batch_size, self.memory // (self.prepare().bytes_per_triple + precondition.bytes_per_triple)))
        for c, ckpt in enumerate(self.checkpoints):
            proj, sq, blocks_c, acts_c = [], [], [], []
            start, probe = 0, True
            while start < triples.shape[0]:
                end = self._batch_end(triples, start, batch_size, probe)
                batch = triples[start:end]
                start = end
                t0 = self._mark()
                # projected rows: v may come batch-innermost; kept blocks feed pair products, which want rows
                run = self.gradients(batch, c, batch_last=not keep_blocks)
                blocks = run.blocks if precondition is None else precondition.apply(run.blocks, c)
                probe = run.distinct < 1.0  # rows that never share are not probed again
                t1 = self._mark()
                proj.append(self.projector(blocks) * math.sqrt(ckpt.lr))
                t2 = self._mark()
                if isinstance(t0, float):
                    self._seconds["gradients_s"] += t1 - t0
                    self._seconds["projection_s"] += t2 - t1
                else:
                    self._events.append((t0, t1, t2))
                    if len(self._events) > 1024:  # a query server never reads them: fold, do not grow
                        self.timings()
                sq.append(sq_norms(blocks))
                if keep_blocks:
                    blocks_c.append(blocks)
                if keep_acts:
                    out = run.cache_output
                    assert out is not None, "keep_acts needs a cache module (activation_cache)"
                    b = batch.shape[0]
                    acts_c.append(out.reshape(-1, b, out.shape[1]).transpose(0, 1).reshape(b, -1))  # (b, R*out)
            parts.append(cat_parts(proj))
            norms.append(cat_parts(sq))
            if keep_blocks:
                kept.append(concat(blocks_c))
            if keep_acts:
                acts.append(cat_parts(acts_c))
        rows = cat_parts(parts, dim=1)
        sq_all = torch.stack(norms, dim=1)
        # one pass for both extremes (NaN propagates into them) instead of an isfinite copy of every row; the
        # row-wise check only finds the row to name
        lo, hi = (float(x) for x in torch.aminmax(rows)) if rows.numel() else (0.0, 0.0)
        if not (math.isfinite(lo) and math.isfinite(hi) and bool(torch.isfinite(sq_all).all())):
            bad = ~(torch.isfinite(rows).all(dim=1) & torch.isfinite(sq_all).all(dim=1))
            i = int(torch.nonzero(bad)[0])
            raise InputError(
                f"the gradient of triple {triples[i].tolist()} is NaN or infinite; the model (or a checkpoint) "
                "has diverged: index a healthy checkpoint"
            )
        return Rows(rows=rows, sq_norms=sq_all, blocks=kept, acts=cat_parts(acts, dim=1) if keep_acts else None,
                    peak=max(-lo, hi))

    def _batch_end(self, triples: torch.Tensor, start: int, batch_size: int, probe: bool = True) -> int:
        """Where the batch from ``start`` ends: ``batch_size`` triples, or up to ``SHARED_GROWTH`` times as
        many while their rows hold at most 1.5x ``batch_size``'s rows' worth of distinct encoder inputs.

        Rows that share their encoder input (the plan's ``share_rows``) cost only their distinct rows in
        the encoder, the Linear, the sketch of ``v`` and the re-rank's ``v`` products, and a bigger batch
        shares more, so the distinct inputs of the largest candidate batch are counted first, from the
        model's forward up to the encoder (:func:`~tracin_index.plan.input_keys`), and the largest batch
        within the budget is taken. Memory stays that of ``batch_size`` unshared triples, give or take the narrow per-row side.
        """
        n = triples.shape[0]
        plain = min(n, start + batch_size)
        g = SHARED_GROWTH
        while g > 1 and g * batch_size > PROBE_TRIPLES:
            g //= 2
        if not probe or plain == n or g == 1:
            return plain
        keys = input_keys(self.engine, self.plan, triples[start : start + batch_size * g])
        if keys is None:
            return plain
        budget = 1.5 * batch_size * keys.shape[0]
        while g > 1:
            m = min(keys.shape[1], g * batch_size)
            if torch.unique(keys[:, :m]).numel() <= budget:
                return start + m
            g //= 2
        return plain

    def self_influence(self, sq: torch.Tensor) -> torch.Tensor:
        """``sum_c lr_c ||g_c||^2`` from squared norms ``(B, C)``."""
        lrs = torch.tensor([c.lr for c in self.checkpoints], dtype=sq.dtype, device=sq.device)
        return sq @ lrs

    def exact(
        self,
        test_blocks: list[list[GradBlock]],
        train: torch.Tensor,
        batch_size: int = 512,
        test_scale: torch.Tensor | None = None,
        train_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Exact TracIn ``(M, len(train)) float32`` between tests (blocks per checkpoint) and train triples.

        ``test_scale (M, C)`` and ``train_scale (len(train), C)`` multiply checkpoint ``c``'s term per
        row: with reciprocal gradient norms this is the cosine mode, ``sum_c lr_c cos(g_c, g'_c)``.
        """
        total: torch.Tensor | None = None
        self.prepare()
        batch_size = self.fit(batch_size)
        for c, ckpt in enumerate(self.checkpoints):
            chunks = []
            for s in range(0, len(train), batch_size):
                part = inner(test_blocks[c], self.gradients(train[s : s + batch_size], c).blocks)
                if train_scale is not None:
                    part = part * train_scale[s : s + batch_size, c].to(part)[None, :]
                chunks.append(part)
            part = torch.cat(chunks, dim=1) * ckpt.lr
            if test_scale is not None:
                part = part * test_scale[:, c].to(part)[:, None]
            total = part if total is None else total + part
        assert total is not None
        return total

    def _train_gradients(self, train: torch.Tensor, c: int, start: int,
                         acts: tuple[str, torch.Tensor] | None, any_layout: bool) -> Pass:
        if acts is None:
            return self.gradients(train, c)
        name, table = acts
        b, out_f = train.shape[0], int(self.engine.modules[name].out_features)
        mine = table[start : start + b].reshape(b, len(self.checkpoints), -1, out_f)[:, c]  # (b, R, out)
        return self.gradients(train, c, {name: mine.transpose(0, 1).reshape(-1, out_f)},  # row r * b + j
                              any_layout=any_layout)

    def _in_order(self, blocks: list[GradBlock], order: dict[str, torch.Tensor]) -> list[GradBlock]:
        """``blocks`` with the input features of each module in ``order`` permuted to that order."""
        return [blk.reordered(order[p.module]) if p.module in order else blk
                for p, blk in zip(self.tracked, blocks, strict=True)]

    def exact_pairs(
        self,
        test_blocks: list[list[GradBlock]],
        train: torch.Tensor,
        pair_test: torch.Tensor,
        pair_train: torch.Tensor,
        batch_size: int = 512,
        test_scale: torch.Tensor | None = None,
        train_scale: torch.Tensor | None = None,
        progress: Callable[[float], None] | None = None,
        train_acts: tuple[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Exact TracIn ``(P,) float32`` for the pairs ``(test pair_test[p], train[pair_train[p]])`` only.

        The train-major re-rank: ``train`` holds each needed training triple once, so its gradient is
        computed once per checkpoint however many tests asked for it; ``pair_train`` must be sorted (then
        each batch of training triples owns one contiguous run of pairs). Scales as in :meth:`exact`.
        ``progress(fraction)`` is called after each batch of training triples. ``train_acts``: the cache
        module's name and its stored outputs for ``train`` ``(len(train), C*R*out)`` (the build's
        ``acts``), which the gradients then take instead of recomputing that layer.
        """
        n_pairs = int(pair_test.shape[0])
        total = torch.zeros(n_pairs)
        if n_pairs == 0:
            return total
        # a few tests: their blocks are cheap to permute, so the candidates' encoder may skip its reorder
        test_floats = sum(blk.nbytes // 4 for blocks in test_blocks for blk in blocks)
        any_layout = train_acts is not None and test_floats <= ANY_LAYOUT_FLOATS
        self.prepare()
        batch_size = self.fit(batch_size)
        for c, ckpt in enumerate(self.checkpoints):
            permuted: dict[int, list[GradBlock]] = {}  # test blocks in a candidate batch's feature order
            start, probe = 0, True
            while start < len(train):
                s = start
                e = start = self._batch_end(train, s, batch_size, probe)
                lo, hi = torch.searchsorted(pair_train, torch.tensor([s, e])).tolist()
                if lo == hi:
                    continue
                pt, pr = pair_test[lo:hi], pair_train[lo:hi] - s
                run = self._train_gradients(train[s:e], c, s, train_acts, any_layout)
                probe = run.distinct < 1.0
                mine = test_blocks[c]
                if run.v_order:
                    key = id(next(iter(run.v_order.values())))
                    if key not in permuted:
                        permuted[key] = self._in_order(test_blocks[c], run.v_order)
                    mine = permuted[key]
                part = inner_pairs(mine, run.blocks, pt, pr).cpu()
                if train_scale is not None:
                    part = part * train_scale[s + pr, c].to(part)
                if test_scale is not None:
                    part = part * test_scale[pt, c].to(part)
                total[lo:hi] += part * ckpt.lr
                if progress is not None:
                    progress((c * n_pairs + hi) / (len(self.checkpoints) * n_pairs))
        return total
