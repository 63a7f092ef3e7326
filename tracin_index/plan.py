"""How the engine runs a model: an immutable :class:`Plan`, found once by :func:`probe`.

The plan names the parameters computed by the per-triple fallback (hooks cannot attribute their
gradient to triples) and the speed-ups that hold for this model, each of them checked on a few
triples against the plain run before it is taken:

- ``folded``: eval-mode ``nn.Sequential`` encoders that finish before any tracked module starts run
  folded (:mod:`tracin_index.fold`), under ``no_grad``: no tracked gradient flows through them;
- ``cache_module``: the tracked ``nn.Linear`` that runs first, once per forward, a row per internal row:
  a build can store its outputs, which the exact re-rank then takes instead of the layer's matmul;
- ``feeds_cache``: the folded encoder whose output is exactly that module's input;
- ``batch_last``: that encoder writes its output batch-innermost for projected rows;
- ``share_rows``: rows with the same encoder input (ConvE: the same head and relation) run the encoder
  and the cache module once, and their blocks keep one ``v`` row for all of them.

:meth:`Plan.plain` is the same plan with every speed-up off: the twin each speed-up is tested against.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import InputError
from .linalg import peak

if TYPE_CHECKING:
    from .engine import Engine
    from .forms import GradBlock

__all__ = ["PLAIN", "Plan", "Probe", "RunState", "input_keys", "plan_forwards", "probe"]

TRIAL = 8  # triples the probe runs (each twice, so that every row has a twin to share with)
SPEEDUP_TRIAL = 2  # ... of which the speed-ups are tried on the first ones (a property of the model, not the data)
SHARE_AT_MOST = 0.75  # rows share the encoder only when at most this fraction of a batch's inputs are distinct
SATURATED = 30.0  # bce scores all above this: its gradient factor sigmoid(-s) is below 1e-13 (saturated)


@dataclass(frozen=True)
class Plan:
    per_triple: tuple[str, ...] = ()
    folded: tuple[str, ...] = ()
    cache_module: str | None = None
    feeds_cache: str | None = None
    batch_last: bool = False
    share_rows: bool = False

    def plain(self) -> Plan:
        """This plan without its speed-ups (the per-triple fallback stays: it is needed for correctness)."""
        return Plan(per_triple=self.per_triple)

    def to_dict(self) -> dict[str, Any]:
        """As the store records it (JSON: lists for tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Plan:
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**fields)

    def describe(self) -> str:
        """One line for ``tracin-index info``."""
        parts = [f"folded {', '.join(self.folded)}"] if self.folded else []
        if self.cache_module:
            parts.append(f"first Linear {self.cache_module} (its outputs can be stored)")
        if self.batch_last:
            parts.append(f"{self.feeds_cache} writes batch-innermost")
        if self.share_rows:
            parts.append(f"rows with the same {self.feeds_cache} input share it")
        if self.per_triple:
            parts.append(f"per-triple fallback for {', '.join(self.per_triple)}")
        return "; ".join(parts) or "plain (no speed-up applies)"


PLAIN = Plan()


@dataclass
class Probe:
    """What :func:`probe` found: the plan, warnings about the tracked parameters, and the memory a triple takes
    in a run (its gradient blocks and what autograd saves for them), with the parameter that takes most."""

    plan: Plan
    warnings: list[str] = field(default_factory=list)
    bytes_per_triple: int = 0
    largest: tuple[str, int] = ("", 0)


@dataclass
class RunState:
    """What the plan's forwards record during one run: each shared module's row index, the permutation of an
    encoder output left in another feature order, and that output's memory."""

    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    perm: torch.Tensor | None = None
    perm_ptr: int = 0


# ---------------------------------------------------------------------------------------------- forwards


def plan_forwards(plan: Plan, engine: Engine, n_rows: int, stored: dict[str, torch.Tensor] | None, any_layout: bool,
                  batch_last: bool, state: RunState) -> dict[str, Callable[..., Any]]:
    """The forwards a run under ``plan`` installs (module name -> callable), recording into ``state``."""
    out: dict[str, Callable[..., Any]] = {}
    layout_free = plan.feeds_cache if (any_layout and stored) else None

    def folded_forward(name: str, layout: str) -> Callable[..., Any]:
        folded = engine.folded(name)
        assert folded is not None

        def forward(x: torch.Tensor) -> torch.Tensor:
            y, perm = folded(x, layout)
            if perm is not None:
                state.perm, state.perm_ptr = perm, y.data_ptr()
            return y
        return forward

    for name in plan.folded:
        batch_innermost = batch_last and plan.batch_last and name == plan.feeds_cache
        out[name] = folded_forward(name, "any" if name == layout_free else "batch_last" if batch_innermost else "canonical")
    cache, encoder = plan.cache_module, plan.feeds_cache
    if plan.share_rows and encoder is not None and cache is not None:
        whole = out[encoder]
        distinct_forward = folded_forward(encoder, "any" if encoder == layout_free else "canonical")

        def encoder_forward(x: torch.Tensor) -> torch.Tensor:
            found = _distinct_rows(x, n_rows)
            if found is None:
                return whole(x)
            x_distinct, state.shared[cache] = found
            return distinct_forward(x_distinct)  # rows, not batch-innermost: the norms' cross products gather them

        out[encoder] = encoder_forward
        if not (stored and cache in stored):  # stored outputs already have a row each
            module = engine.modules[cache]
            own = type(module).forward

            def cache_forward(x: torch.Tensor) -> torch.Tensor:
                y = own(module, x)
                index = state.shared.get(cache)
                return y if index is None else y.index_select(0, index)

            out[cache] = cache_forward
    for name, given in (stored or {}).items():
        if name != cache:
            raise ValueError(f"stored outputs of {name} cannot stand in for it (cache module: {cache})")
        leaf = given.to(engine.device, torch.float32).detach().requires_grad_(True)
        out[name] = lambda *_a, _leaf=leaf, **_k: _leaf
    return out


# ---------------------------------------------------------------------------------------------- the probe


def probe(engine: Engine, triples: torch.Tensor, *, rtol: float = 1e-3, batch_last: bool = True) -> Probe:
    """Run the model plainly on up to ``TRIAL`` triples (each twice) and find its :class:`Probe`.

    A parameter whose blocks do not sum to the batch gradient (read outside its module's per-row forward),
    or whose module is not applied row by row, goes to the per-triple fallback. Then the encoders to fold
    and the cache module are found, and the batch-innermost layout (when ``batch_last``) and row sharing
    are tried on the first ``SPEEDUP_TRIAL`` of them (each twice) against the plain blocks; each is kept only
    where the model takes it and gives the same blocks.
    """
    from .engine import Trace

    few = triples[:TRIAL]
    twice = torch.cat([few, few])
    trace = Trace()
    first = engine.run(twice, PLAIN, trace=trace)
    fallback = set(trace.not_rowwise)
    for param, block, full in zip(engine.tracked, first.blocks, trace.batch_grads, strict=True):
        if param.name in fallback:
            continue
        mine = block.batch_sum(param.shape)
        ref = full if full is not None else torch.zeros_like(mine)
        err, scale = peak(mine - ref), peak(ref)  # NaN or inf when either holds one
        if not (math.isfinite(err) and math.isfinite(scale)):
            break  # NaN/inf: reported as a diverged model by the caller
        if not err <= rtol * max(scale, 1e-12) + 1e-7:
            fallback.add(param.name)
    plan = Plan(per_triple=tuple(p.name for p in engine.tracked if p.name in fallback))
    plain = first
    if fallback:
        trace = Trace()
        plain = engine.run(twice, plan, trace=trace)
    folded = _find_folds(engine, trace)
    cache = _cache_module(engine, trace, twice)
    fed = None
    if cache is not None:
        args, kwargs, _ = trace.calls[cache][0]
        fed = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    feeds = next((name for name in folded if fed is not None and trace.produced.get(name) == (fed.data_ptr(), fed.numel())),
                 None)
    plan = replace(plan, folded=tuple(folded), cache_module=cache, feeds_cache=feeds)
    if feeds is not None:
        n = min(SPEEDUP_TRIAL, few.shape[0])
        trial = torch.cat([few[:n], few[:n]])
        rows = torch.cat([torch.arange(n), few.shape[0] + torch.arange(n)])  # their rows in the plain run
        reference = [blk.select(rows) for blk in plain.blocks]
        plan = replace(plan, batch_last=batch_last and _same_blocks(engine, trial, reference,
                                                                     replace(plan, batch_last=True), batch_last=True))
        plan = replace(plan, share_rows=_same_blocks(engine, trial, reference, replace(plan, share_rows=True),
                                                     batch_last=plan.batch_last, share=True))
    per_triple = max(1, twice.shape[0])
    sizes = [(p.name, blk.nbytes // per_triple) for p, blk in zip(engine.tracked, plain.blocks, strict=True)]
    largest = max(sizes, key=lambda s: s[1])
    total = sum(s for _, s in sizes) + trace.saved_bytes // per_triple
    return Probe(plan, _silent_zeros(engine, plain.blocks, trace.batch_grads, twice), total, largest)


def _find_folds(engine: Engine, trace: Any) -> list[str]:
    """Encoders called once per forward, ending before the first tracked module starts, that fold."""
    events = dict(trace.events)
    starts = events.pop("<tracked>", [])
    first = min(starts) if starts else -1
    return [name for name, ends in sorted(events.items())
            if len(ends) == 1 and ends[0] <= first and engine.folded(name) is not None]


def _cache_module(engine: Engine, trace: Any, triples: torch.Tensor) -> str | None:
    """The tracked Linear that runs first, once per forward, with a row per internal row."""
    first = trace.order[0] if trace.order else None
    if first is None or not isinstance(engine.modules[first], nn.Linear) or len(trace.calls[first]) != 1:
        return None
    out = trace.calls[first][0][2]
    n_rows = triples.shape[0] * (2 if getattr(engine.model, "use_inverse_triples", False) else 1)
    return first if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == n_rows else None


def _same_blocks(engine: Engine, triples: torch.Tensor, plain: list[GradBlock], plan: Plan, batch_last: bool,
                 share: bool = False) -> bool:
    """Whether the model takes ``plan`` and gives ``plain``'s blocks with it; ``share`` must also have shared rows."""
    try:
        trial = engine.run(triples, plan, batch_last=batch_last)
    except (RuntimeError, InputError):  # e.g. a view that only contiguous memory allows, or a row per row
        return False
    if share and trial.distinct >= 1.0:
        return False
    return all(_close(x, y) for a, b in zip(plain, trial.blocks, strict=True)
               for x, y in zip(a.tensors(), b.tensors(), strict=True))


def _close(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Same shape and values up to float rounding; NaN/inf counts as close (a diverged model, which the caller reports)."""
    if x.shape != y.shape:
        return False
    if x.numel() == 0 or not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
        return True
    return torch.allclose(x, y, rtol=1e-4, atol=1e-6 * float(x.abs().max()) + 1e-12)


def _silent_zeros(engine: Engine, blocks: list[GradBlock], batch_grads: list[torch.Tensor | None],
                  triples: torch.Tensor) -> list[str]:
    """One warning per tracked parameter whose gradient vanishes on every probe triple (squared norm 0 in float32,
    so every influence through it is 0), with the likely cause. Only a parameter whose batch gradient's squared
    norm is 0 can be one; its per-triple norms then decide."""
    zero = [p.name for p, blk, full in zip(engine.tracked, blocks, batch_grads, strict=True)
            if (full is None or float((full * full).sum()) == 0) and not bool((blk.sq_norms() > 0).any())]
    if not zero:
        return []
    from .layers import internal_rows

    with torch.no_grad():
        rows, _ = internal_rows(engine.model, triples.to(engine.device))
        scores = engine.model.score_hrt(rows).float()  # type: ignore[operator]
    lo, hi = float(scores.min()), float(scores.max())
    if engine.loss.name == "bce" and lo > SATURATED and len(zero) == len(engine.tracked):
        cause = f"scores {lo:.0f}..{hi:.0f} saturate bce; try --loss score"
    elif len(zero) == len(engine.tracked):
        cause = "the loss does not depend on any tracked parameter in eval mode (e.g. cached representations)"
    else:
        cause = ("it takes no part in the loss in eval mode (e.g. the model caches the representations it feeds); "
                 "track other layers")
    return [f"{name}: gradient vanishes on the {triples.shape[0] // 2} probe triples (its squared norm is 0 in float32, "
            f"so every influence through it is 0: {cause})" for name in zero]


# ---------------------------------------------------------------------------------------------- shared inputs


def input_keys(engine: Engine, plan: Plan, triples: torch.Tensor) -> torch.Tensor | None:
    """``(R, B)`` keys of the rows' inputs to the shared encoder (equal inputs, equal keys), from the model's
    forward up to that encoder only; None where rows do not share."""
    if not plan.share_rows or plan.feeds_cache is None:
        return None
    x = engine.input_of(plan.feeds_cache, triples)
    per = 2 if getattr(engine.model, "use_inverse_triples", False) else 1
    if x is None or not x.is_floating_point() or x.shape[0] != per * triples.shape[0]:
        return None
    return _row_keys(x.reshape(x.shape[0], -1)).reshape(per, triples.shape[0])


_KEY_WEIGHTS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _row_keys(flat: torch.Tensor) -> torch.Tensor:
    """An int64 key per row of ``flat (n, f)``: two fixed random float32 combinations of its values, their
    bits side by side (equal rows, equal keys; different rows almost surely not, and never trusted without
    a check)."""
    key = (flat.shape[1], flat.device)
    if key not in _KEY_WEIGHTS:
        gen = torch.Generator().manual_seed(0x5EED)
        _KEY_WEIGHTS[key] = torch.rand(flat.shape[1], 2, generator=gen).add_(0.5).to(flat.device)
    return (flat.to(torch.float32) @ _KEY_WEIGHTS[key]).view(torch.int64).reshape(-1)


def _distinct_rows(x: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(x's distinct rows, each row's index among them)`` when ``x`` has ``n_rows`` rows of which at most
    ``SHARE_AT_MOST`` are distinct; else None.

    Rows are keyed (:func:`_row_keys`), and the grouping is then checked value for value: two different rows
    with equal keys (or a NaN) make it decline, never merge. The distinct rows come in key order; each is its
    group's first row, so the result depends on the values only.
    """
    n = x.shape[0]
    if n != n_rows or n < 2 or not x.is_floating_point():
        return None
    flat = x.reshape(n, -1)
    keys = _row_keys(flat)
    distinct, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    m = int(distinct.shape[0])
    if m > SHARE_AT_MOST * n:
        return None
    first = torch.full((m,), n, dtype=torch.long, device=x.device)
    first.scatter_reduce_(0, inverse, torch.arange(n, device=x.device), "amin")
    rows = flat.index_select(0, first)
    if not torch.equal(rows.index_select(0, inverse), flat):
        return None
    return rows.reshape(m, *x.shape[1:]), inverse
