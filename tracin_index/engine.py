"""Stage 2: exact per-triple gradients of the tracked parameters, batched, in factored form.

One forward pass with hooks on the tracked modules and one ``autograd.grad`` down to their outputs give
every row's ``delta = dL/d(output)``; in eval mode rows are independent, so this is exact. From each
call's inputs and ``delta`` a parameter's per-triple gradient is kept in its cheapest exact form
(:mod:`tracin_index.forms`): a Linear weight as outer products, an Embedding's looked-up rows, anything
else dense (closed form for BatchNorm, ``torch.func.vmap`` over rows otherwise). Modules may be called
with keyword arguments and several times per forward.

Parameters whose gradient hooks cannot attribute to triples (read outside their module's per-row
forward, e.g. a whole entity table in 1-N scoring or a graph encoder, or owned by a module whose output
is not one row per internal row) are named in the plan's ``per_triple``: their per-triple gradients come
from the per-triple losses by one batched backward pass (``is_grads_batched``), in chunks.

What a run may do faster (folded encoders, shared inputs, layouts, stored outputs) is the caller's
:class:`~tracin_index.plan.Plan`; every forward the run replaces is replaced inside :func:`patched`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .errors import InputError, arg
from .fold import FoldedSequential, fold
from .forms import DenseGrad, GradBlock, OuterGrad, RowsGrad, SharedOuterGrad, TrackedParam
from .layers import fresh_representations, internal_rows, representation_caches
from .linalg import cat_parts
from .losses import Loss
from .plan import PLAIN, Plan, RunState, plan_forwards

__all__ = ["Engine", "Pass", "Trace", "describe_parameters", "patched"]

PER_TRIPLE_BYTES = 256 << 20  # per-triple fallback gradients held per chunk of triples


@dataclass(frozen=True)
class Pass:
    """What one run gives: a block per tracked parameter (tracked order); the plan's cache module's output
    ``(R * B, out)`` when it ran; the feature order of that module's ``v`` when the run left it permuted
    (``{module: perm}``); and the share of the shared encoder's rows that were distinct (1.0: none shared)."""

    blocks: list[GradBlock]
    cache_output: torch.Tensor | None = None
    v_order: dict[str, torch.Tensor] = field(default_factory=dict)
    distinct: float = 1.0


@dataclass
class Trace:
    """What a checking run (``check=True``) observed, for the probe: each tracked parameter's gradient of the
    summed loss, the tracked modules in call order and their calls, candidate encoders' call events and output
    memory, the parameters whose module was not applied row by row, and the bytes saved for backward."""

    batch_grads: list[torch.Tensor | None] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    calls: dict[str, list[tuple[tuple[Any, ...], dict[str, Any], Any]]] = field(default_factory=dict)
    events: dict[str, list[int]] = field(default_factory=dict)
    produced: dict[str, tuple[int, int]] = field(default_factory=dict)
    not_rowwise: set[str] = field(default_factory=set)
    saved_bytes: int = 0


def describe_parameters(model: nn.Module, names: list[str]) -> list[TrackedParam]:
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    out = []
    for name in names:
        mod_name, _, leaf = name.rpartition(".")
        mod = modules[mod_name]
        if isinstance(mod, nn.Linear) and leaf == "weight":
            kind = "outer"
        elif isinstance(mod, nn.Embedding) and leaf == "weight":
            kind = "rows"
        else:
            kind = "dense"
        out.append(TrackedParam(name=name, module=mod_name, kind=kind, shape=tuple(params[name].shape)))
    return out


@contextlib.contextmanager
def patched(modules: dict[str, nn.Module], forwards: dict[str, Callable[..., Any]]) -> Iterator[None]:
    """Replace the ``forward`` of the named modules for the duration of the block; the class's own forward
    is restored on exit, whatever happens. The only place that patches a model."""
    done = []
    try:
        for name, fn in forwards.items():
            modules[name].forward = fn  # type: ignore[method-assign]
            done.append(name)
        yield
    finally:
        for name in done:
            del modules[name].forward


class _Stop(Exception):
    """Raised inside :meth:`Engine.input_of` once the module has its input: the rest of the forward is not needed."""


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)


class Engine:
    """Per-triple gradients of ``loss`` for the tracked parameters of ``model`` (in eval mode)."""

    def __init__(self, model: nn.Module, tracked: list[TrackedParam], loss: Loss) -> None:
        self.model = model
        self.tracked = tracked
        self.loss = loss
        self.modules = dict(model.named_modules())
        self.params = dict(model.named_parameters())
        self.device = next(model.parameters()).device
        self._caches = representation_caches(model)
        self._folded: dict[str, FoldedSequential | None] = {}

    def folded(self, name: str) -> FoldedSequential | None:
        """The folded form of module ``name`` (made once), or None when it does not fold."""
        if name not in self._folded:
            self._folded[name] = fold(self.modules[name])
        return self._folded[name]

    def input_of(self, name: str, triples: torch.Tensor) -> torch.Tensor | None:
        """Module ``name``'s input for raw-id triples ``(B, 3)``, from the model's forward up to that module only."""
        rows, _ = internal_rows(self.model, triples.to(self.device))
        fresh_representations(self.model, self._caches)
        got: list[torch.Tensor] = []

        def stop(x: torch.Tensor, *_a: Any, **_k: Any) -> torch.Tensor:
            got.append(x)
            raise _Stop

        with contextlib.suppress(_Stop), patched(self.modules, {name: stop}), torch.no_grad():
            self.loss.fn(self.model, rows)
        return got[0] if got else None

    def run(self, triples: torch.Tensor, plan: Plan = PLAIN, *, stored: dict[str, torch.Tensor] | None = None,
            any_layout: bool = False, batch_last: bool = False, trace: Trace | None = None) -> Pass:
        """Blocks for raw-id triples ``(B, 3) int64`` under ``plan``.

        ``stored`` maps the plan's cache module to its stored output for these rows ``(R * B, out)``
        (internal row ``r * B + b``), which then stands in for the module. ``any_layout`` (with ``stored``):
        the caller only takes inner products of the blocks, with rows it permutes by the pass's ``v_order``.
        ``batch_last``: the caller projects the blocks, so the cache module's ``v`` may come batch-innermost.
        ``trace``: a checking run (the plan's speed-ups off), which fills ``trace`` for the probe.
        """
        model = self.model
        batch = triples.shape[0]
        rows, per = internal_rows(model, triples.to(self.device))
        n_rows = rows.shape[0]
        fallback = [p for p in self.tracked if p.name in plan.per_triple]
        names = list(dict.fromkeys(p.module for p in self.tracked if p.name not in plan.per_triple))
        calls: dict[str, list[tuple[tuple[Any, ...], dict[str, Any], Any]]] = {m: [] for m in names}
        handles = []
        for name in names:
            def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any, name: str = name) -> None:
                calls[name].append((args, kwargs, out))
                if trace is not None:
                    trace.order.append(name)

            handles.append(self.modules[name].register_forward_hook(hook, with_kwargs=True))
        state = RunState()
        forwards: dict[str, Callable[..., Any]] = {}
        if trace is None:
            forwards = plan_forwards(plan, self, n_rows, stored, any_layout, batch_last, state)
        else:
            handles += self._watch(trace, names)
        tracked_tensors = [self.params[p.name] for p in self.tracked]
        flags = [t.requires_grad for t in tracked_tensors]
        saved = _SavedBytes() if trace is not None else contextlib.nullcontext()
        try:
            for t in tracked_tensors:
                t.requires_grad_(True)
            fresh_representations(model, self._caches)
            with patched(self.modules, forwards), torch.enable_grad(), saved:
                per_row = self.loss.per_row(model, rows) if fallback else None
                loss = per_row.sum() if per_row is not None else self.loss.fn(model, rows)
            outputs = [out for name in names for _, _, out in calls[name]]
            live = [o for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad]
            wrt = live + (tracked_tensors if trace is not None else [])
            grads: dict[int, torch.Tensor | None] = {}
            if wrt and loss.requires_grad:  # else nothing tracked takes part in the loss: every gradient is 0
                got = torch.autograd.grad(loss, wrt, allow_unused=True, retain_graph=bool(fallback))
                grads = dict(zip(map(id, wrt), got, strict=True))
            per_triple = self._per_triple(per_row, per, batch, fallback) if per_row is not None else {}
        finally:
            for h in handles:
                h.remove()
            for t, f in zip(tracked_tensors, flags, strict=True):
                t.requires_grad_(f)
            fresh_representations(model, self._caches)  # no cached representation keeps this run's graph alive
        if trace is not None:
            trace.calls = calls
            trace.batch_grads = [grads.get(id(t)) for t in tracked_tensors]
            trace.saved_bytes = saved.total if isinstance(saved, _SavedBytes) else 0
        deltas = {name: [(a, k, out, grads.get(id(out))) for a, k, out in calls[name]] for name in names}
        blocks: list[GradBlock] = []
        for p in self.tracked:
            if p.name in per_triple:
                blocks.append(DenseGrad(per_triple[p.name]))
                continue
            try:
                blocks.append(self._block(p, deltas[p.module], batch, per, n_rows, state.shared.get(p.module)))
            except _NotRowwise:
                if trace is None:
                    raise InputError(f"layer {p.module} is not applied row by row here, though it was when the index "
                                     "was planned; rebuild the index") from None
                trace.not_rowwise.add(p.name)
                blocks.append(DenseGrad(torch.zeros(batch, p.size, device=self.device)))
        cache = plan.cache_module
        cache_output = None
        if cache is not None and calls.get(cache) and isinstance(calls[cache][0][2], torch.Tensor):
            cache_output = calls[cache][0][2].detach()
        index = state.shared.get(cache) if cache is not None else None
        distinct = 1.0 if index is None or n_rows == 0 else (int(index.max()) + 1) / n_rows
        v_order = {}
        if state.perm is not None and cache is not None:
            fed = _first_tensor(*calls[cache][0][:2])
            assert fed is not None and fed.data_ptr() == state.perm_ptr, "the cache module's input is the encoder's output"
            v_order = {cache: state.perm}
        return Pass(blocks, cache_output, v_order, distinct)

    def _watch(self, trace: Trace, names: list[str]) -> list[Any]:
        """Hooks of a checking run: when each candidate encoder (an ``nn.Sequential`` owning no tracked
        parameter) ends and where its output lives, and when each tracked module starts."""
        events = [0]
        tracked = {p.name for p in self.tracked}

        def tick(name: str, out: Any = None) -> None:
            trace.events.setdefault(name, []).append(events[0])
            events[0] += 1
            if isinstance(out, torch.Tensor):
                trace.produced[name] = (out.data_ptr(), out.numel())

        handles = []
        for name, mod in self.modules.items():
            if name in names:
                handles.append(mod.register_forward_pre_hook(lambda *_a, name=name: tick("<tracked>")))
            elif isinstance(mod, nn.Sequential) and not any(f"{name}.{p}" in tracked for p, _ in mod.named_parameters()):
                handles.append(mod.register_forward_hook(lambda _m, _a, out, name=name: tick(name, out)))
        return handles

    def _per_triple(self, per_row: torch.Tensor, per: int, batch: int, params: list[TrackedParam]) -> dict[str, torch.Tensor]:
        """Per-triple gradients ``(B, size)`` of ``params`` from the rows' losses ``(R * B,)``: one batched backward
        pass per chunk of triples (a plain loop where an operation has no batching rule)."""
        with torch.enable_grad():  # callers may run under no_grad
            losses = per_row.reshape(per, batch).sum(0)
            if not losses.requires_grad:
                return {p.name: torch.zeros(batch, p.size, device=losses.device) for p in params}
            tensors = [self.params[p.name] for p in params]
            chunk = max(1, min(batch, PER_TRIPLE_BYTES // (4 * max(1, sum(p.size for p in params)))))
            eye = torch.eye(batch, device=losses.device, dtype=losses.dtype)
            parts: dict[str, list[torch.Tensor]] = {p.name: [] for p in params}
            for s in range(0, batch, chunk):
                e = min(batch, s + chunk)
                stacked: list[torch.Tensor | None]
                try:
                    stacked = list(torch.autograd.grad(losses, tensors, grad_outputs=eye[s:e], is_grads_batched=True,
                                                       retain_graph=True, allow_unused=True))
                except RuntimeError:  # an operation without a batching rule: one backward pass per triple
                    each = [_one_triple(losses[i], tensors, params) for i in range(s, e)]
                    stacked = [torch.stack([_or_zeros(g[j], t) for g in each]) for j, t in enumerate(tensors)]
                for p, g in zip(params, stacked, strict=True):
                    parts[p.name].append(torch.zeros(e - s, p.size, device=losses.device) if g is None
                                         else g.reshape(e - s, -1).detach())
        return {name: cat_parts(ps) for name, ps in parts.items()}

    def _block(self, p: TrackedParam, calls: list[tuple[tuple[Any, ...], dict[str, Any], Any, torch.Tensor | None]],
               batch: int, per: int, n_rows: int, shared: torch.Tensor | None = None) -> GradBlock:
        if not calls:  # module not reached by this loss: zero gradient
            return DenseGrad(torch.zeros(batch, p.size, device=self.device))
        found = []
        for args, kwargs, out, g in calls:
            if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != n_rows:
                raise _NotRowwise
            x = _first_tensor(args, kwargs)
            if x is None:
                raise _NotRowwise
            found.append((args, kwargs, x, torch.zeros_like(out) if g is None else g))
        leaf = p.name.rpartition(".")[2]
        if p.kind == "outer" and shared is not None:  # the cache module, once per forward, on distinct rows
            (_, _, x, d), = found
            u = _to_rmajor(d.reshape(d.shape[0], 1, d.shape[-1]), batch, per)
            return SharedOuterGrad(u=u.detach(), v=x.detach(), index=shared.reshape(per, batch))
        if p.kind == "outer":
            us = [_to_rmajor(d.reshape(d.shape[0], -1, d.shape[-1]), batch, per) for _, _, _, d in found]
            vs = [_to_rmajor(x.reshape(x.shape[0], -1, x.shape[-1]), batch, per) for _, _, x, _ in found]
            return OuterGrad(u=cat_parts(us).detach(), v=cat_parts(vs).detach())
        if p.kind == "rows":
            idx, val = [], []
            for _, _, x, d in found:
                idx.append(_to_examples(x.reshape(x.shape[0], -1, 1), batch, per)[..., 0])
                val.append(_to_examples(d.reshape(d.shape[0], -1, d.shape[-1]), batch, per))
            return RowsGrad(index=torch.cat(idx, 1).detach(), values=torch.cat(val, 1).detach(), num_rows=p.shape[0])
        module = self.modules[p.module]
        if isinstance(module, nn.Linear) and leaf == "bias":
            parts = [_to_examples(d.reshape(d.shape[0], -1, d.shape[-1]), batch, per).sum(1) for _, _, _, d in found]
            return DenseGrad(values=torch.stack(parts).sum(0).detach())
        per_row = torch.stack([_dense_rows(module, leaf, a, k, x, d) for a, k, x, d in found]).sum(0)
        return DenseGrad(values=_to_examples(per_row.reshape(per_row.shape[0], 1, -1), batch, per).sum(1))


def _one_triple(loss: torch.Tensor, tensors: Sequence[torch.Tensor],
                params: list[TrackedParam]) -> tuple[torch.Tensor | None, ...]:
    """One triple's gradients of ``tensors``; a one-line refusal naming the parameters where even this fails."""
    try:
        return torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True)
    except RuntimeError as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"per-triple gradients of {', '.join(p.name for p in params)} cannot be computed ({reason}); "
                         f"track other layers ({arg('layers')})") from None


def _or_zeros(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g


class _NotRowwise(Exception):
    """A tracked module's call whose output is not one row per internal row."""


class _SavedBytes:
    """Counts the bytes autograd saves for the backward pass inside the block (each storage once)."""

    def __init__(self) -> None:
        self.total = 0
        self._seen: set[int] = set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.layout != torch.strided or isinstance(t, nn.Parameter):
            return t
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.total += storage.nbytes()
        return t

    def __enter__(self) -> _SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def _dense_rows(module: nn.Module, leaf: str, args: tuple[Any, ...], kwargs: dict[str, Any], x: torch.Tensor,
                d: torch.Tensor) -> torch.Tensor:
    """Per-row gradient ``(rows, size)`` of one parameter of ``module`` from one call's inputs and ``delta``.

    BatchNorm in eval mode (running statistics) has a closed form: ``d * x_hat`` for the weight, ``d``
    for the bias, summed over any positions after the channel axis. Anything else replays the call row by
    row under ``vmap(grad(...))``, with every input that has a row per output row batched.
    """
    d = d.detach()
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.training and module.running_mean is not None:
        assert module.running_var is not None
        x = x.detach()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if leaf == "bias":
            g = d
        else:
            g = d * (x - module.running_mean.reshape(shape)) * torch.rsqrt(module.running_var.reshape(shape) + module.eps)
        return g.reshape(g.shape[0], g.shape[1], -1).sum(-1)
    n = d.shape[0]
    params = {k: p.detach() for k, p in module.named_parameters(recurse=False)}
    buffers = dict(module.named_buffers(recurse=False))
    others = {k: p for k, p in params.items() if k != leaf}
    values = [a.detach() if isinstance(a, torch.Tensor) else a for a in (*args, *kwargs.values())]
    batched = [i for i, a in enumerate(values) if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == n]
    keys = list(kwargs)

    def row_fn(w: torch.Tensor, di: torch.Tensor, *rows: torch.Tensor) -> torch.Tensor:
        vals = list(values)
        for i, r in zip(batched, rows, strict=True):
            vals[i] = r.unsqueeze(0)
        out = functional_call(module, {**others, leaf: w, **buffers}, tuple(vals[: len(args)]),
                              dict(zip(keys, vals[len(args) :], strict=True)))
        return (out * di.unsqueeze(0)).sum()

    fn: Callable[..., torch.Tensor] = vmap(grad(row_fn), in_dims=(None, 0, *[0] * len(batched)))
    return fn(params[leaf], d, *[values[i] for i in batched]).reshape(n, -1)


def _to_rmajor(t: torch.Tensor, batch: int, per: int) -> torch.Tensor:
    """``(per * B, S, f)`` rows (row ``j`` of triple ``j % B``) -> ``(per * S, B, f)``; a view when ``S == 1``."""
    _, s_, f = t.shape
    if s_ == 1:
        return t.reshape(per, batch, f)
    return t.reshape(per, batch, s_, f).transpose(1, 2).reshape(per * s_, batch, f)


def _to_examples(t: torch.Tensor, batch: int, per: int) -> torch.Tensor:
    """``(per * B, S, f)`` rows (row ``j`` of triple ``j % B``) -> ``(B, per * S, f)``."""
    _, s, f = t.shape
    return t.reshape(per, batch, s, f).transpose(0, 1).reshape(batch, per * s, f)
