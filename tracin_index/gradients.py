"""Stage 2: exact per-triple gradients of the tracked parameters, batched, in factored form.

One forward pass with hooks on the tracked modules and one ``autograd.grad`` down to their outputs
give every row's ``delta = dL/d(output)``; in eval mode rows are independent, so this is exact. From
``(input, delta)`` each parameter's per-triple gradient is kept in the cheapest exact form:

- :class:`OuterGrad` for ``nn.Linear`` weights: ``g_i = sum_r u[i, r] v[i, r]^T`` (never materialised);
- :class:`RowsGrad` for ``nn.Embedding`` weights: only the looked-up rows;
- :class:`DenseGrad` for everything else (BatchNorm, Conv, biases), via ``torch.func.vmap`` over rows.

:func:`inner` gives exact inner products between two sets of such gradients; :func:`sq_norms` the
exact squared norms; :func:`densify` the flat vectors (for small models and tests).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .errors import InputError
from .fold import FoldedSequential, fold
from .losses import Loss
from .model import internal_rows

__all__ = [
    "DenseGrad",
    "GradBlock",
    "GradientComputer",
    "OuterGrad",
    "RowsGrad",
    "TrackedParam",
    "cat_parts",
    "concat",
    "densify",
    "inner",
    "inner_pairs",
    "sq_norms",
]


@dataclass(frozen=True)
class TrackedParam:
    """A tracked parameter: its name, owning module, gradient form and shape."""

    name: str
    module: str
    kind: str  # "outer" | "rows" | "dense"
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class DenseGrad:
    """``values (B, D) float32``: the flattened per-triple gradient."""

    values: torch.Tensor


@dataclass
class OuterGrad:
    """Per-triple ``sum_r u[r] v[r]^T``; ``u (R, B, out)``, ``v (R, B, in)`` float32.

    ``R`` (rows per triple: 2 with inverse triples) comes first, so the module's own input and output
    (internal rows ``r * B + b``) are views, never copied: ``v`` alone is 10368 floats per row for ConvE.

    With ``index (R, B) int64``, ``v (U, in)`` holds distinct rows only and row ``r * B + b``'s input is
    ``v[index[r, b]]``: rows with the same encoder input (ConvE: the same head and relation) share it
    (see ``GradientComputer.share_rows``). Every consumer here takes either form.
    """

    u: torch.Tensor
    v: torch.Tensor
    index: torch.Tensor | None = None

    def full_v(self) -> torch.Tensor:
        """``v`` as ``(R, B, in)``, gathered from the distinct rows when shared."""
        return self.v if self.index is None else self.v[self.index]

    def flat_v(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows (M, in), index (R, B))``: the rows ``v`` is made of and where each internal row's is."""
        if self.index is not None:
            return self.v, self.index
        r, b, f = self.v.shape
        return self.v.reshape(r * b, f), torch.arange(r * b, device=self.v.device).reshape(r, b)


@dataclass
class RowsGrad:
    """Per-triple sparse rows of an ``(E, d)`` table: ``index (B, R) int64``, ``values (B, R, d) float32``.

    Repeated indices add up.
    """

    index: torch.Tensor
    values: torch.Tensor
    num_rows: int


GradBlock = DenseGrad | OuterGrad | RowsGrad
BATCH_LAST_TRIAL = 8  # triples the first checked run tries the batch-innermost layout and row sharing on
SHARE_AT_MOST = 0.75  # rows share the encoder only when at most this fraction of a batch's inputs are distinct
DENSE_PAIRS = 16  # inner_pairs takes the dense product when the pairs fill at least 1/16 of the Na x Nb matrix


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


class GradientComputer:
    """Per-triple gradients of ``loss`` for the tracked parameters of ``model`` (in eval mode).

    ``__call__(triples)`` takes raw-id triples ``(B, 3) int64`` and returns one block per tracked
    parameter, in order. Triples of models trained with inverse triples contribute both directions.
    """

    def __init__(self, model: nn.Module, tracked: list[TrackedParam], loss: Loss) -> None:
        self.model = model
        self.tracked = tracked
        self.loss = loss
        self.modules = dict(model.named_modules())
        self.params = dict(model.named_parameters())
        self.module_names = list(dict.fromkeys(p.module for p in tracked))
        self.device = next(model.parameters()).device
        # The tracked nn.Linear that runs first, once per forward, with one output row per internal row
        # (found by the first checked run): its output can be stored at build time and given back to
        # :meth:`__call__` (``outputs``), which then skips the layer's matmul. Nothing tracked runs before
        # it, so no tracked gradient flows through it.
        self.cache_module: str | None = None
        self.last_output: torch.Tensor | None = None  # that module's output in the last call, ``(R * B, out)``
        # Eval-mode nn.Sequential encoders that finish before any tracked module starts (found by the first
        # checked run): they run folded (:mod:`.fold`), under no_grad, since no tracked gradient flows
        # through them. ConvE: ``interaction.hr2d``.
        self.folded: dict[str, FoldedSequential] = {}
        # The folded encoder whose output is exactly the cache module's input (a view of the same memory):
        # with stored outputs standing in for that module, its input only feeds inner products, so it may
        # come in another feature order (``any_layout``); ``v_order`` then says which, for the last call.
        self.feeds_cache: str | None = None
        self.v_order: dict[str, torch.Tensor] = {}
        # For callers that project the blocks (``batch_last=True``), that encoder writes its output
        # batch-innermost (``FoldedSequential.batch_last``): the cache module's ``v`` then has stride 1
        # between rows, which its matmul reads as fast and the CountSketch 4x faster. Turned off for good
        # by the first checked run if the model cannot take that layout or gives other blocks with it.
        self.batch_last = True
        # Rows whose input to that encoder is the same (ConvE: the same head and relation; 15% of UMLS's
        # internal rows are distinct, 29% per batch of 1,024 triples) run the encoder and the cache module
        # once, and their blocks keep one ``v`` row for all of them (``OuterGrad.index``). Turned off for good
        # by the first checked run if the model cannot take it or gives other blocks with it.
        self.share_rows = True
        self.last_distinct = 1.0  # distinct rows / rows the encoder ran in the last call (1.0: nothing shared)

    def __call__(self, triples: torch.Tensor, outputs: dict[str, torch.Tensor] | None = None,
                 any_layout: bool = False, batch_last: bool = False) -> list[GradBlock]:
        """Blocks for raw-id triples ``(B, 3) int64``.

        ``outputs`` maps the cache module's name to its stored output for these rows ``(R * B, out)``
        (internal row ``r * B + b``); the module's forward then returns it instead of computing it.
        ``any_layout`` (with ``outputs``): the caller only takes inner products of the blocks, with rows
        it permutes by ``v_order`` (the cache module -> canonical feature index of each ``v`` column,
        for this call), so the encoder feeding that module may skip its reorder to the canonical layout.
        ``batch_last``: the caller projects the blocks (the build, test rows), so the cache module's ``v``
        may come batch-innermost (see ``self.batch_last``); pair products want each row contiguous.
        """
        blocks, _ = self._run(triples, check=False, stored=outputs, any_layout=any_layout, batch_last=batch_last,
                              share=self.share_rows)
        return blocks

    def checked(self, triples: torch.Tensor, rtol: float = 1e-3, batch_last: bool = False) -> list[GradBlock]:
        """Like ``__call__``, and verify that the blocks sum to the batch gradient of every parameter.

        Catches parameters used outside their module's forward (e.g. an entity table read whole by
        1-N scoring), whose per-triple gradients hooks cannot see. Then finds the encoders to fold, tries
        the batch-innermost layout and row sharing on a few triples (``self.batch_last``,
        ``self.share_rows``), and returns the blocks of the path later calls take (``batch_last`` as in
        ``__call__``).
        """
        # each trial triple twice, so that every row has a twin to share with; these blocks (unfolded: the
        # encoders to fold are found by this run) are also the reference of the layout and sharing trials
        few = triples[:BATCH_LAST_TRIAL]
        twice = torch.cat([few, few])
        plain, batch_grads = self._run(twice, check=True)
        for param, block, full in zip(self.tracked, plain, batch_grads, strict=True):
            mine = _sum_over_batch(block, param)
            ref = full if full is not None else torch.zeros_like(mine)
            err = _peak(mine - ref)  # NaN or inf when either holds one (the extremes propagate NaN)
            scale = _peak(ref)
            if not (math.isfinite(err) and math.isfinite(scale)):
                break  # NaN/inf: reported as a diverged model by the caller, not as a coverage problem
            scale = max(scale, 1e-12)
            if not err <= rtol * scale + 1e-7:
                raise InputError(
                    f"per-triple gradients of {param.name} cannot be captured with loss {self.loss.name!r}: "
                    "the parameter is used outside its layer's per-row forward (e.g. the whole entity table in "
                    "1-N scoring); track other layers or use --loss bce"
                )
        if self.feeds_cache is not None:
            self.batch_last = self.batch_last and self._same_blocks(twice, plain, batch_last=True)
            self.share_rows = self._same_blocks(twice, plain, batch_last=self.batch_last, share=True)
        else:
            self.share_rows = False
        # the caller's rows from the path later calls take (folded, in the caller's layout)
        blocks, _ = self._run(triples, check=False, batch_last=batch_last and self.batch_last, share=self.share_rows)
        return blocks

    def _same_blocks(self, triples: torch.Tensor, plain: list[GradBlock], batch_last: bool,
                     share: bool = False) -> bool:
        """Whether the model takes ``batch_last`` / ``share`` and gives ``plain``'s blocks with them;
        ``share`` must also have shared rows."""
        try:
            trial, _ = self._run(triples, check=False, batch_last=batch_last, share=share)
        except (RuntimeError, InputError):  # e.g. a view that only contiguous memory allows, or a row per row
            return False
        if share and not any(isinstance(b, OuterGrad) and b.index is not None for b in trial):
            return False
        return all(_close(x, y) for a, b in zip(plain, trial, strict=True)
                   for x, y in zip(_tensors(a), _tensors(b), strict=True))

    def input_keys(self, triples: torch.Tensor) -> torch.Tensor | None:
        """``(R, B)`` keys of the rows' inputs to the shared encoder (equal inputs, equal keys), from the
        model's forward up to that encoder only (ConvE: two embedding lookups); None where rows do not share.
        Callers size batches by how many distinct inputs they hold (``Tracer._batch_end``)."""
        if not self.share_rows or self.feeds_cache is None:
            return None
        rows, per = internal_rows(self.model, triples.to(self.device))
        got: list[torch.Tensor] = []

        def encoder_forward(x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] == rows.shape[0] and x.is_floating_point():
                got.append(_row_keys(x.reshape(x.shape[0], -1)))
            raise _Probed

        module = self.modules[self.feeds_cache]
        module.forward = encoder_forward  # type: ignore[method-assign]
        try:
            with torch.no_grad():
                self.loss.fn(self.model, rows)
        except _Probed:
            pass
        finally:
            del module.forward
        return got[0].reshape(per, triples.shape[0]) if got else None

    def _run(self, triples: torch.Tensor, check: bool, stored: dict[str, torch.Tensor] | None = None,
             any_layout: bool = False, batch_last: bool = False,
             share: bool = False) -> tuple[list[GradBlock], list[torch.Tensor | None]]:
        model = self.model
        batch = triples.shape[0]
        rows, per = internal_rows(model, triples.to(self.device))
        calls: dict[str, list[tuple[Any, torch.Tensor]]] = {m: [] for m in self.module_names}
        order: list[str] = []
        handles = []
        for name in self.module_names:
            def hook(_m: nn.Module, args: tuple[Any, ...], out: torch.Tensor, name: str = name) -> None:
                calls[name].append((args[0], out))
                order.append(name)

            handles.append(self.modules[name].register_forward_hook(hook))
        upstream: dict[str, list[int]] = {}  # checked run: candidate encoders' (calls, end event), tracked starts
        produced: dict[str, tuple[int, int]] = {}  # checked run: each candidate encoder's output memory
        if check:
            events = [0]

            def tick(name: str, out: Any = None) -> None:
                upstream.setdefault(name, []).append(events[0])
                events[0] += 1
                if isinstance(out, torch.Tensor):
                    produced[name] = (out.data_ptr(), out.numel())

            tracked_params = {p.name for p in self.tracked}
            for name, mod in self.modules.items():
                if name in self.module_names:
                    handles.append(mod.register_forward_pre_hook(lambda *_a, name=name: tick("<tracked>")))
                elif isinstance(mod, nn.Sequential) and not any(
                        f"{name}.{p}" in tracked_params for p, _ in mod.named_parameters()):
                    handles.append(mod.register_forward_hook(lambda _m, _a, out, name=name: tick(name, out)))
        tracked_tensors = [self.params[p.name] for p in self.tracked]
        flags = [t.requires_grad for t in tracked_tensors]
        patched = []
        shared: dict[str, torch.Tensor] = {}  # the cache module's name -> each row's distinct input (this call)
        layout_free = self.feeds_cache if (any_layout and stored and not check) else None
        self.v_order = {}
        try:
            if not check:
                for name, folded in self.folded.items():
                    folded.any_layout = name == layout_free
                    folded.batch_last = batch_last and self.batch_last and name == self.feeds_cache
                    self.modules[name].forward = folded  # type: ignore[method-assign]
                    patched.append(name)
                if share and self.feeds_cache is not None and self.cache_module is not None:
                    if self._share(self.feeds_cache, self.cache_module, rows.shape[0], shared,
                                   expand=not (stored and self.cache_module in stored)):
                        patched.append(self.cache_module)
            for name, given in (stored or {}).items():
                if name != self.cache_module:
                    raise ValueError(f"stored outputs of {name} cannot stand in for it (cache module: {self.cache_module})")
                leaf = given.to(self.device, torch.float32).detach().requires_grad_(True)
                self.modules[name].forward = lambda *_a, _leaf=leaf, **_k: _leaf  # type: ignore[method-assign]
                patched.append(name)
            for t in tracked_tensors:
                t.requires_grad_(True)
            with torch.enable_grad():
                loss = self.loss.fn(model, rows)
                outputs = [out for name in self.module_names for _, out in calls[name]]
                wrt = outputs + (tracked_tensors if check else [])
                grads = torch.autograd.grad(loss, wrt, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
            for name in patched:
                del self.modules[name].forward  # the class's forward again
                if name in self.folded:
                    self.folded[name].any_layout = self.folded[name].batch_last = False
            for t, f in zip(tracked_tensors, flags, strict=True):
                t.requires_grad_(f)
        n_rows = rows.shape[0]
        if check:
            self._find_folds(upstream)
            first = order[0] if order else None
            self.cache_module = first if (
                first is not None and isinstance(self.modules[first], nn.Linear) and len(calls[first]) == 1
                and calls[first][0][1].dim() == 2 and calls[first][0][1].shape[0] == n_rows) else None
            fed = calls[self.cache_module][0][0] if self.cache_module is not None else None
            self.feeds_cache = next((name for name in self.folded if isinstance(fed, torch.Tensor)
                                     and produced.get(name) == (fed.data_ptr(), fed.numel())), None)
        perm = self.folded[layout_free].last_perm if layout_free is not None else None
        if layout_free is not None and perm is not None:
            assert self.cache_module is not None
            fed = calls[self.cache_module][0][0]
            assert fed.data_ptr() == self.folded[layout_free].last_ptr, "the cache module's input is the encoder's output"
            self.v_order = {self.cache_module: perm}
        if self.cache_module is not None and calls.get(self.cache_module):
            self.last_output = calls[self.cache_module][0][1].detach()
        deltas: dict[str, list[tuple[Any, torch.Tensor]]] = {}
        i = 0
        for name in self.module_names:
            deltas[name] = []
            for inp, out in calls[name]:
                g = grads[i]
                i += 1
                if out.shape[0] != n_rows:
                    raise InputError(
                        f"layer {name} is not applied row by row (output {tuple(out.shape)} for {n_rows} rows); "
                        "its per-triple gradient cannot be taken: track other layers"
                    )
                deltas[name].append((inp, torch.zeros_like(out) if g is None else g))
        index = shared.get(self.cache_module) if self.cache_module is not None else None
        self.last_distinct = 1.0 if index is None or n_rows == 0 else (int(index.max()) + 1) / n_rows
        blocks = [self._block(p, deltas[p.module], batch, per, shared.get(p.module)) for p in self.tracked]
        batch_grads: list[torch.Tensor | None] = list(grads[len(outputs) :]) if check else []
        return blocks, batch_grads

    def _share(self, encoder: str, cache: str, n_rows: int, shared: dict[str, torch.Tensor], expand: bool) -> bool:
        """Patch ``encoder`` (already patched to its folded form, which the caller restores) to run on its
        distinct input rows only, recording each row's distinct row in ``shared[cache]`` when the batch shares
        enough (``SHARE_AT_MOST``); with ``expand``, patch ``cache`` to hand each row its output (stored
        outputs already have a row each). Returns whether ``cache`` was patched."""
        folded = self.folded[encoder]

        def encoder_forward(x: torch.Tensor) -> torch.Tensor:
            found = _distinct_rows(x, n_rows)
            if found is None:
                return folded(x)
            x_distinct, shared[cache] = found
            # rows, not batch-innermost: the per-triple cross products of the norms gather v's rows (8 against
            # 30 ms per 1,024 triples), and the sketch and the Linear now see a fraction of the rows
            folded.batch_last = False
            return folded(x_distinct)

        self.modules[encoder].forward = encoder_forward  # type: ignore[method-assign]  # restored with the fold
        if expand:
            module = self.modules[cache]
            own = type(module).forward

            def cache_forward(x: torch.Tensor) -> torch.Tensor:
                out = own(module, x)
                index = shared.get(cache)
                return out if index is None else out.index_select(0, index)

            module.forward = cache_forward  # type: ignore[method-assign]
        return expand

    def _find_folds(self, events: dict[str, list[int]]) -> None:
        """Encoders called once per forward, ending before the first tracked module starts, that fold."""
        starts = events.pop("<tracked>", [])
        first = min(starts) if starts else -1
        self.folded = {}
        for name, ends in sorted(events.items()):
            if len(ends) != 1 or ends[0] > first:
                continue  # called several times per forward, or after a tracked module started
            folded = fold(self.modules[name])
            if folded is not None:
                self.folded[name] = folded

    def _block(self, p: TrackedParam, calls: list[tuple[Any, torch.Tensor]], batch: int, per: int,
               shared: torch.Tensor | None = None) -> GradBlock:
        if not calls:  # module not reached by this loss: zero gradient
            return DenseGrad(torch.zeros(batch, p.size, device=self.device))
        leaf = p.name.rpartition(".")[2]
        if p.kind == "outer" and shared is not None:  # the cache module, once per forward, on distinct rows
            (x, d), = calls
            u = _to_rmajor(d.reshape(d.shape[0], 1, d.shape[-1]), batch, per)
            return OuterGrad(u=u.detach(), v=x.detach(), index=shared.reshape(per, batch))
        if p.kind == "outer":
            us = [_to_rmajor(d.reshape(d.shape[0], -1, d.shape[-1]), batch, per) for _, d in calls]
            vs = [_to_rmajor(x.reshape(x.shape[0], -1, x.shape[-1]), batch, per) for x, _ in calls]
            return OuterGrad(u=cat_parts(us).detach(), v=cat_parts(vs).detach())
        if p.kind == "rows":
            idx, val = [], []
            for x, d in calls:
                idx.append(_to_examples(x.reshape(x.shape[0], -1, 1), batch, per)[..., 0])
                val.append(_to_examples(d.reshape(d.shape[0], -1, d.shape[-1]), batch, per))
            return RowsGrad(index=torch.cat(idx, 1).detach(), values=torch.cat(val, 1).detach(), num_rows=p.shape[0])
        module = self.modules[p.module]
        if isinstance(module, nn.Linear) and leaf == "bias":
            parts = [_to_examples(d.reshape(d.shape[0], -1, d.shape[-1]), batch, per).sum(1) for _, d in calls]
            total = torch.stack(parts).sum(0)
            return DenseGrad(values=total.detach())
        per_row = torch.stack([_dense_rows(module, leaf, x, d) for x, d in calls]).sum(0)
        return DenseGrad(values=_to_examples(per_row.reshape(per_row.shape[0], 1, -1), batch, per).sum(1))


def _tensors(block: GradBlock) -> list[torch.Tensor]:
    if isinstance(block, OuterGrad):
        return [block.u, block.full_v()]
    return [block.values] if isinstance(block, DenseGrad) else [block.index, block.values]


def _peak(x: torch.Tensor) -> float:
    """The largest ``|value|`` of ``x`` (NaN when it holds one), from one pass over it."""
    if x.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(x)
    return max(-float(lo), float(hi))


def _close(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Same shape and values up to float rounding; NaN/inf counts as close (a diverged model, which the caller reports)."""
    if x.shape != y.shape:
        return False
    if x.numel() == 0 or not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
        return True
    return torch.allclose(x, y, rtol=1e-4, atol=1e-6 * float(x.abs().max()) + 1e-12)


def _dense_rows(module: nn.Module, leaf: str, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Per-row gradient ``(rows, size)`` of one parameter of ``module``.

    BatchNorm in eval mode (running statistics) has a closed form: ``d * x_hat`` for the weight, ``d``
    for the bias, summed over any positions after the channel axis. Anything else goes through
    ``vmap(grad(...))`` over rows.
    """
    x, d = x.detach(), d.detach()
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.training and module.running_mean is not None:
        assert module.running_var is not None
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if leaf == "bias":
            g = d
        else:
            g = d * (x - module.running_mean.reshape(shape)) * torch.rsqrt(module.running_var.reshape(shape) + module.eps)
        return g.reshape(g.shape[0], g.shape[1], -1).sum(-1)
    params = {n: p.detach() for n, p in module.named_parameters(recurse=False)}
    buffers = {n: b for n, b in module.named_buffers(recurse=False)}
    others = {n: p for n, p in params.items() if n != leaf}

    def row_fn(w: torch.Tensor, xi: torch.Tensor, di: torch.Tensor) -> torch.Tensor:
        out = functional_call(module, {**others, leaf: w, **buffers}, (xi.unsqueeze(0),))
        return (out * di.unsqueeze(0)).sum()

    fn: Callable[..., torch.Tensor] = vmap(grad(row_fn), in_dims=(None, 0, 0))
    return fn(params[leaf], x, d).reshape(x.shape[0], -1)


_KEY_WEIGHTS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _row_keys(flat: torch.Tensor) -> torch.Tensor:
    """An int64 key per row of ``flat (n, f)``: two fixed random float32 combinations of its values, their
    bits side by side (equal rows, equal keys; different rows almost surely not, and never trusted without
    a check). Float32 products: converting UMLS's 10,432 x 400 encoder inputs to float64 for one
    float64 combination took 8 of 9 ms."""
    key = (flat.shape[1], flat.device)
    if key not in _KEY_WEIGHTS:
        gen = torch.Generator().manual_seed(0x5EED)
        _KEY_WEIGHTS[key] = torch.rand(flat.shape[1], 2, generator=gen).add_(0.5).to(flat.device)
    return (flat.to(torch.float32) @ _KEY_WEIGHTS[key]).view(torch.int64).reshape(-1)


class _Probed(Exception):
    """Raised by the encoder patched by ``GradientComputer.input_keys`` once it has its input: the rest of the
    forward is not needed."""


def _distinct_rows(x: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(x's distinct rows, each row's index among them)`` when ``x`` has ``n_rows`` rows of which at most
    ``SHARE_AT_MOST`` are distinct; else None.

    Rows are keyed by fixed random combinations of their values (a small GEMM and a sort of ``n_rows``
    numbers), and the grouping is then checked value for value: two different rows with equal
    keys (or a NaN) make it decline, never merge. The distinct rows come in key order; each is its group's
    first row, so the result depends on the values only.
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


def cat_parts(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """``torch.cat``, without its copy of a lone part (one call of a module, one batch, one checkpoint)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


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


def _sum_over_batch(block: GradBlock, p: TrackedParam) -> torch.Tensor:
    if isinstance(block, DenseGrad):
        return block.values.sum(0).reshape(p.shape)
    if isinstance(block, OuterGrad):
        return torch.einsum("rbo,rbi->oi", block.u, block.full_v()).reshape(p.shape)
    out = torch.zeros(block.num_rows, block.values.shape[-1], device=block.values.device)
    out.index_add_(0, block.index.reshape(-1), block.values.reshape(-1, block.values.shape[-1]))
    return out.reshape(p.shape)


# ---------------------------------------------------------------------------------------------- algebra


def inner(a: list[GradBlock], b: list[GradBlock]) -> torch.Tensor:
    """Exact inner products ``(Na, Nb) float32`` between two gradient sets over the same parameters."""
    total: torch.Tensor | None = None
    for x, y in zip(a, b, strict=True):
        part = _inner_block(x, y)
        total = part if total is None else total + part
    assert total is not None
    return total


def _inner_block(x: GradBlock, y: GradBlock) -> torch.Tensor:
    if isinstance(x, DenseGrad) and isinstance(y, DenseGrad):
        return x.values @ y.values.T
    if isinstance(x, OuterGrad) and isinstance(y, OuterGrad):
        # <sum_r u_r v_r^T, sum_s u'_s v'_s^T> = sum_{r,s} (u_r . u'_s)(v_r . v'_s): 2 GEMMs per (r, s)
        out = torch.zeros(x.u.shape[1], y.u.shape[1], device=x.u.device, dtype=x.u.dtype)
        if x.index is None and y.index is None:
            for r in range(x.u.shape[0]):
                for s in range(y.u.shape[0]):
                    out += (x.u[r] @ y.u[s].T) * (x.v[r] @ y.v[s].T)
            return out
        (xv, xi), (yv, yi) = x.flat_v(), y.flat_v()
        vv = xv @ yv.T  # shared rows: each distinct pair of inputs once
        for r in range(x.u.shape[0]):
            for s in range(y.u.shape[0]):
                out += (x.u[r] @ y.u[s].T) * vv[xi[r][:, None], yi[s][None, :]]
        return out
    if isinstance(x, RowsGrad) and isinstance(y, RowsGrad):
        same = x.index[:, :, None, None] == y.index[None, None, :, :]
        dots = torch.einsum("ard,bsd->arbs", x.values, y.values)
        return (dots * same).sum(dim=(1, 3))
    raise TypeError(f"cannot take the inner product of {type(x).__name__} and {type(y).__name__}")


def inner_pairs(a: list[GradBlock], b: list[GradBlock], ia: torch.Tensor, ib: torch.Tensor) -> torch.Tensor:
    """Exact ``<a[ia[p]], b[ib[p]]>`` for each pair ``p``: ``(P,) float32``, without the ``(Na, Nb)`` matrix.

    The bulk re-rank needs a few hundred pairs per test out of ``Na x Nb``: the dense products would be
    ~99.8% waste, and gathering both sides per pair is memory-bound (two copies of ``v`` per pair). A
    sampled dense-dense product (``torch.sparse.sampled_addmm`` over the pairs as a CSR pattern, rows =
    ``a``) computes only the asked dot products, each ``a`` row read once for all its pairs. Where the
    pairs fill at least ``1 / DENSE_PAIRS`` of the matrix (a few tests), the dense product is cheaper.
    """
    dev = _device_of(a[0])
    ia, ib = ia.to(dev, torch.long), ib.to(dev, torch.long)
    n_pairs = int(ia.shape[0])
    if n_pairs == 0:
        return torch.zeros(0, device=dev)
    na, nb = _rows_of(a[0]), _rows_of(b[0])
    order = torch.argsort(ia * nb + ib)  # CSR order: by a's row, then b's
    sa, sb = ia[order], ib[order]
    crow = torch.zeros(na + 1, dtype=torch.long, device=dev)
    crow[1:] = torch.cumsum(torch.bincount(sa, minlength=na), 0)

    dense = na * nb <= DENSE_PAIRS * n_pairs

    def dots(x: torch.Tensor, y: torch.Tensor, per: int = 1) -> torch.Tensor:
        """Dots ``x[r, sa] . y[j * nb + sb]`` for ``x (R, Na, f)``, ``y (per * Nb, f)``: ``(R, P, per)`` in CSR order.

        The ``per`` rows of ``y`` that belong to one triple (its two directions) share one pass over ``x``'s
        row, so a test row is read from memory once per batch of training triples, not once per direction.
        When the pairs fill much of the ``Na x Nb`` matrix (an ad-hoc query: all of it), one GEMM of all
        ``R * Na`` rows against ``y`` is faster than the sampled product (measured 1.5 against 12.7 ms for
        2 x 1,200 rows of 10,368), and reads ``y`` once for every ``r``.
        """
        r_, na_, f = x.shape
        if dense:
            full = (x.reshape(r_ * na_, f) @ y.T).reshape(r_, na_, per, nb)
            return full.permute(1, 3, 0, 2)[sa, sb].permute(1, 0, 2)
        cols = (sb[:, None] + nb * torch.arange(per, device=dev)[None, :]).reshape(-1)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            pattern = torch.sparse_csr_tensor(crow * per, cols, torch.zeros(n_pairs * per, dtype=x.dtype, device=dev),
                                              (na, per * nb), check_invariants=False)
            return torch.stack([torch.sparse.sampled_addmm(pattern, x[r].contiguous(), y.T, beta=0.0).values()
                                .reshape(n_pairs, per) for r in range(r_)])

    total = torch.zeros(n_pairs, device=dev)
    for x, y in zip(a, b, strict=True):
        if isinstance(x, DenseGrad) and isinstance(y, DenseGrad):
            if dense:  # one small GEMM instead of gathering both sides per pair (UMLS re-rank: 25 ms -> 1)
                total += (x.values @ y.values.T)[sa, sb]
            elif x.values.shape[1] <= 1024:
                total += (x.values[sa] * y.values[sb]).sum(1)
            else:
                total += dots(x.values[None], y.values)[0, :, 0]
        elif isinstance(x, OuterGrad) and isinstance(y, OuterGrad):
            per = y.u.shape[0]
            if y.index is None:  # (R, P, per); row s * nb + b of y: direction s of triple b
                vdots = dots(x.full_v(), y.v.reshape(per * nb, -1), per)
            else:
                vdots = _shared_dots(x.full_v(), y.v, sa, y.index[:, sb].T)
            if dense:  # all test x candidate products of the narrow side, then the asked ones
                full_u = (x.u.reshape(-1, x.u.shape[-1]) @ y.u.reshape(per * nb, -1).T).reshape(-1, na, per, nb)
                udots = full_u.permute(0, 1, 3, 2)[:, sa, sb]  # (R, P, per)
            else:
                udots = torch.einsum("rpf,spf->rps", x.u[:, sa], y.u[:, sb])
            total += (udots * vdots).sum((0, 2))
        elif isinstance(x, RowsGrad) and isinstance(y, RowsGrad):
            same = x.index[sa][:, :, None] == y.index[sb][:, None, :]
            total += (torch.einsum("prd,psd->prs", x.values[sa], y.values[sb]) * same).sum((1, 2))
        else:
            raise TypeError(f"cannot take the inner product of {type(x).__name__} and {type(y).__name__}")
    out = torch.empty_like(total)
    out[order] = total
    return out


def _shared_dots(x: torch.Tensor, y: torch.Tensor, sa: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Dots ``x[r, sa[p]] . y[cols[p, s]]`` for ``x (R, Na, f)`` and distinct rows ``y (U, f)``: ``(R, P, per)``.

    Candidates that share an input share its dot products: each distinct (test row, ``y`` row) pair is
    computed once, by one GEMM when those pairs fill at least ``1 / DENSE_PAIRS`` of the ``Na x U``
    matrix, else by a sampled product over them.
    """
    r_, na, f = x.shape
    u_ = y.shape[0]
    p_, per = cols.shape
    keys = (sa[:, None] * u_ + cols).reshape(-1)
    distinct, inverse = torch.unique(keys, sorted=True, return_inverse=True)  # CSR order: by x's row, then y's
    if na * u_ <= DENSE_PAIRS * distinct.shape[0]:
        full = (x.reshape(r_ * na, f) @ y.T).reshape(r_, na * u_)
        return full[:, keys].reshape(r_, p_, per)
    vals = torch.stack([_sampled_dots(x[r].contiguous(), y, distinct) for r in range(r_)])
    return vals[:, inverse].reshape(r_, p_, per)


def _rows_of(block: GradBlock) -> int:
    if isinstance(block, OuterGrad):
        return int(block.u.shape[1])
    return int(block.values.shape[0]) if isinstance(block, DenseGrad) else int(block.index.shape[0])


def _device_of(block: GradBlock) -> torch.device:
    if isinstance(block, OuterGrad):
        return block.u.device
    return block.values.device


def sq_norms(blocks: list[GradBlock]) -> torch.Tensor:
    """Exact squared norms ``(B,) float32`` of each triple's gradient."""
    total: torch.Tensor | None = None
    for blk in blocks:
        if isinstance(blk, DenseGrad):
            part = (blk.values * blk.values).sum(1)
        elif isinstance(blk, OuterGrad):
            vg = _row_grams(blk.v) if blk.index is None else _shared_grams(blk.v, blk.index)
            part = (_row_grams(blk.u) * vg).sum((1, 2))
        else:
            same = blk.index[:, :, None] == blk.index[:, None, :]
            part = (torch.einsum("brd,bsd->brs", blk.values, blk.values) * same).sum((1, 2))
        total = part if total is None else total + part
    assert total is not None
    return total


GRAM_CHUNK = 256  # feature rows per step of _row_grams in the batch-innermost layout (in cache: 1 MiB per 1,024 rows)


def _row_grams(x: torch.Tensor) -> torch.Tensor:
    """``(B, R, R)``: ``x[r, b] . x[s, b]`` for ``x (R, B, f)``.

    Features contiguous: one batched GEMM. Batch innermost (a ``batch_last`` encoder's output, where
    a batched GEMM would read with stride ``R * B``): products accumulated over blocks of
    ``GRAM_CHUNK`` feature rows in cache, each pair ``r <= s`` once (about 10 ms for ConvE's 2 x 1,024 x 10,368 on 2 cores).
    """
    r_, b_, f = x.shape
    if x.stride(-1) == 1 or b_ == 0 or f == 0:
        return torch.einsum("rbi,sbi->brs", x, x)
    xt = x.permute(2, 0, 1)  # (f, R, B)
    c = min(GRAM_CHUNK, f)
    pairs = [(r, s) for r in range(r_) for s in range(r, r_)]
    acc = x.new_zeros(len(pairs), c, b_)
    for i in range(0, f, c):
        blk = xt[i : i + c]
        for j, (r, s) in enumerate(pairs):
            acc[j, : len(blk)].addcmul_(blk[:, r], blk[:, s])
    sums = acc.sum(1)  # (pairs, B)
    out = x.new_empty(b_, r_, r_)
    for j, (r, s) in enumerate(pairs):
        out[:, r, s] = out[:, s, r] = sums[j]
    return out


def _shared_grams(v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``(B, R, R)``: ``v[index[r, b]] . v[index[s, b]]`` for distinct rows ``v (U, f)``, ``index (R, B)``.

    Squared norms once per distinct row; the cross terms are the entries of ``v v^T`` that some triple
    asks for, each distinct pair once, by one sampled product (``_sampled_dots``; UMLS's 5,216 pairs
    among 1,560 rows: 8 against 46 ms gathering both rows of 16 triples at a time).
    """
    r_, b_ = index.shape
    v = v if v.stride(-1) == 1 else v.contiguous()
    sq = torch.linalg.vector_norm(v, dim=1).square()  # (U,)
    out = v.new_empty(b_, r_, r_)
    for r in range(r_):
        out[:, r, r] = sq[index[r]]
    for r in range(r_):
        for s in range(r + 1, r_):
            out[:, r, s] = out[:, s, r] = _row_dots(v, index[r], index[s])
    return out


def _row_dots(v: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(P,)``: ``v[a[p]] . v[b[p]]`` for rows ``v (U, f)``, each distinct pair computed once."""
    pairs, inverse = torch.unique(a * v.shape[0] + b, sorted=True, return_inverse=True)
    return _sampled_dots(v, v, pairs)[inverse]


def _sampled_dots(x: torch.Tensor, y: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """``x[i] . y[j]`` for each of ``pairs``, sorted distinct keys ``i * len(y) + j`` (a CSR pattern over
    ``x``'s rows), by one ``torch.sparse.sampled_addmm``: a dot product per pair, so the same bytes for any
    thread count or set of pairs."""
    n_x, n_y = x.shape[0], y.shape[0]
    rows = torch.div(pairs, n_y, rounding_mode="floor")
    crow = torch.zeros(n_x + 1, dtype=torch.long, device=x.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n_x), 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(crow, pairs - rows * n_y, x.new_zeros(pairs.shape[0]), (n_x, n_y),
                                          check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, x, y.T, beta=0.0).values()


def densify(blocks: list[GradBlock]) -> torch.Tensor:
    """Flat per-triple gradients ``(B, D) float32`` (D = total tracked size), in tracked order."""
    parts = []
    for blk in blocks:
        if isinstance(blk, DenseGrad):
            parts.append(blk.values)
        elif isinstance(blk, OuterGrad):
            parts.append(torch.einsum("rbo,rbi->boi", blk.u, blk.full_v()).reshape(blk.u.shape[1], -1))
        else:
            b, r, d = blk.values.shape
            out = torch.zeros(b, blk.num_rows, d, device=blk.values.device)
            out.scatter_add_(1, blk.index.unsqueeze(-1).expand(b, r, d), blk.values)
            parts.append(out.reshape(b, -1))
    return torch.cat(parts, dim=1)


def concat(parts: list[list[GradBlock]]) -> list[GradBlock]:
    """Blocks of consecutive batches joined along the triple axis (same parameters, same R)."""
    if len(parts) == 1:
        return parts[0]
    out: list[GradBlock] = []
    for group in zip(*parts, strict=True):
        first = group[0]
        if isinstance(first, DenseGrad):
            out.append(DenseGrad(torch.cat([g.values for g in group])))  # type: ignore[union-attr]
        elif isinstance(first, OuterGrad):
            u = torch.cat([g.u for g in group], 1)  # type: ignore[union-attr]
            if all(g.index is None for g in group):  # type: ignore[union-attr]
                out.append(OuterGrad(u, torch.cat([g.v for g in group], 1)))  # type: ignore[union-attr]
                continue
            vs, idx, offset = [], [], 0
            for g in group:
                v, i = g.flat_v()  # type: ignore[union-attr]
                vs.append(v)
                idx.append(i + offset)
                offset += v.shape[0]
            out.append(OuterGrad(u, torch.cat(vs), torch.cat(idx, 1)))
        else:
            out.append(RowsGrad(torch.cat([g.index for g in group]), torch.cat([g.values for g in group]), first.num_rows))  # type: ignore[union-attr]
    return out


def select(blocks: list[GradBlock], index: torch.Tensor) -> list[GradBlock]:
    """The same blocks restricted to the triples at ``index``."""
    out: list[GradBlock] = []
    for blk in blocks:
        if isinstance(blk, DenseGrad):
            out.append(DenseGrad(blk.values[index]))
        elif isinstance(blk, OuterGrad):
            if blk.index is None:
                out.append(OuterGrad(blk.u[:, index], blk.v[:, index]))
            else:  # the distinct rows stay whole; only the index is selected
                out.append(OuterGrad(blk.u[:, index], blk.v, blk.index[:, index]))
        else:
            out.append(RowsGrad(blk.index[index], blk.values[index], blk.num_rows))
    return out
