"""What a PyKEEN model is made of, as the engine sees it: model-internal rows of raw-id triples, the graph
encoders' representation caches, and the parameterised layers in forward order (``--layers``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import InputError, arg
from .triples import suggest

__all__ = ["forward_order", "fresh_representations", "internal_rows", "representation_caches", "select_parameters"]


# ---------------------------------------------------------------------------------------------- ids


def representation_caches(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that keep representations between calls (pykeen's RGCN and CompGCN encoders)."""
    return [m for m in model.modules() if hasattr(m, "enriched_embeddings") or hasattr(m, "enriched_representations")]


def fresh_representations(model: nn.Module, caches: list[nn.Module] | None = None) -> None:
    """Make pykeen's graph encoders compute their representations again at the next forward.

    RGCN's and CompGCN's encoders keep the entity representations of their last forward: a copy computed
    without gradients during evaluation (saved with the model, kept across checkpoint loads), through
    which no parameter of the encoder gets a gradient and every checkpoint scores with stale values.
    Their caches are dropped here (RGCN's also switched off); the engine calls this before each forward.
    ``caches``: :func:`representation_caches` of ``model``, when the caller keeps them.
    """
    for mod in representation_caches(model) if caches is None else caches:
        if hasattr(mod, "enriched_embeddings"):  # pykeen.nn.message_passing.RGCNRepresentation
            setattr(mod, "enriched_embeddings", None)  # noqa: B010 - a plain attribute, typed by nn.Module as a tensor
            setattr(mod, "cache", False)  # noqa: B010
        if hasattr(mod, "enriched_representations"):  # pykeen.nn.representation.CombinedCompGCNRepresentations
            setattr(mod, "enriched_representations", None)  # noqa: B010


def internal_rows(model: nn.Module, triples: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Model-internal rows for ``(B, 3)`` raw-id triples, and rows per triple.

    With inverse triples a training triple enters the objective as ``(h, 2r, t)`` and ``(t, 2r+1, h)``:
    the result is ``(2B, 3)``, forward rows first; row ``j`` belongs to triple ``j % B``.
    """
    if not getattr(model, "use_inverse_triples", False):
        return triples, 1
    h, r, t = triples.unbind(dim=1)
    forward = torch.stack([h, 2 * r, t], dim=1)
    inverse = torch.stack([t, 2 * r + 1, h], dim=1)
    return torch.cat([forward, inverse], dim=0), 2


# ---------------------------------------------------------------------------------------------- layers


def forward_order(model: Any, probe: torch.Tensor) -> list[str]:
    """Names of the modules that own parameters, in the order the forward pass first enters them.

    ``probe`` is a small ``(B, 3)`` raw-id batch; modules never entered (parameters read directly by a
    parent) come first, in registration order, so they never count as "last".
    """
    owners = [name for name, mod in model.named_modules() if any(True for _ in mod.parameters(recurse=False))]
    seen: list[str] = []
    handles = []
    modules = dict(model.named_modules())
    for name in owners:
        def hook(_mod: nn.Module, _args: Any, name: str = name) -> None:
            if name not in seen:
                seen.append(name)

        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        rows, _ = internal_rows(model, probe)
        fresh_representations(model)
        with torch.no_grad():
            model.score_hrt(rows.to(_device_of(model)))
    finally:
        for h in handles:
            h.remove()
    return [n for n in owners if n not in seen] + seen


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def select_parameters(model: nn.Module, spec: str, probe: torch.Tensor) -> list[str]:
    """Parameter names tracked for ``spec``: ``all``, ``last:N`` or comma-separated parameter/module names.

    Names come back in forward execution order of their modules.
    """
    order = forward_order(model, probe)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())

    def direct(mod_name: str) -> list[str]:
        prefix = f"{mod_name}." if mod_name else ""
        return [prefix + n for n, _ in modules[mod_name].named_parameters(recurse=False)]

    spec = spec.strip()
    if spec == "all":
        chosen = [n for m in order for n in direct(m)]
    elif spec.startswith("last:"):
        try:
            count = int(spec.split(":", 1)[1])
        except ValueError:
            raise InputError(f"{arg('layers', spec)}: expected last:N with an integer N") from None
        if not 1 <= count <= len(order):
            raise InputError(f"{arg('layers', spec)}: N must be between 1 and {len(order)} (the model's parameterised layers)")
        chosen = [n for m in order[-count:] for n in direct(m)]
    else:
        chosen = []
        for item in (s.strip() for s in spec.split(",") if s.strip()):
            if item in params:
                chosen.append(item)
            elif item in modules and direct(item):
                chosen.extend(direct(item))
            else:
                known = list(params) + [m for m in order]
                raise InputError(f"{arg('layers')}: no parameter or layer named {item!r}{suggest(item, known)}")
        rank = {n: i for i, n in enumerate(n for m in order for n in direct(m))}
        chosen = sorted(dict.fromkeys(chosen), key=lambda n: rank[n])
    if not chosen:
        raise InputError(f"{arg('layers', spec)} selects no parameters")
    return chosen
