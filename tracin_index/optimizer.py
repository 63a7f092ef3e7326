"""Optimizer-aware influence: the training optimizer's per-coordinate step as a preconditioner of the test gradient.

An SGD step on a training triple ``z`` moves the weights by ``-lr grad L(z)``; an Adam step moves each coordinate
by ``-lr m_hat / (sqrt(v_hat) + eps)``, so the coordinates whose gradients were large all along move less. With
Adam the first-order change of a test triple's loss from training on ``z`` at checkpoint ``c`` is
``lr_c <grad L(z'), P_c grad L(z)>`` with the diagonal

    P_c = 1 / (sqrt(v_c / (1 - beta2 ** t_c)) + eps)

(``v_c`` Adam's ``exp_avg_sq``, ``t_c`` its step count, ``beta2`` and ``eps`` its parameter group's). ``P`` is
diagonal, so ``<g_test, P g_train> = <P g_test, g_train>``: the stored rows (projections of ``g_train``) stay as
they are, and only the test gradient is multiplied by ``P``, at query time.

:class:`OptimizerState` is a checkpoint's optimizer state by parameter name (what :class:`TracinCheckpoint`
records, or PyKEEN's training-loop checkpoint mapped to names). :class:`Preconditioner` holds the factor of each
tracked parameter per checkpoint and applies it to gradient blocks; the registry's ``OPTIMIZERS`` names the
functions that make the factors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .errors import InputError, arg
from .registry import OPTIMIZERS

if TYPE_CHECKING:
    from .forms import GradBlock, TrackedParam
    from .model import Checkpoint

__all__ = ["ADAM_KINDS", "OptimizerState", "Preconditioner", "adam_factor", "adam_factors", "sgd_factors"]

#: optimizer classes whose step is Adam's (AdamW's decoupled weight decay leaves the preconditioner unchanged)
ADAM_KINDS = ("Adam", "AdamW")
#: what is kept of each parameter's state: the second moments (AMSGrad's running maximum too)
_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")


def _entry(state: dict[str, Any], group: dict[str, Any]) -> dict[str, Any]:
    """One parameter's record: its second moments on the CPU, the step count and its group's hyperparameters."""
    out: dict[str, Any] = {k: state[k].detach().cpu().clone() for k in _MOMENTS if isinstance(state.get(k), torch.Tensor)}
    if "step" in state:
        out["step"] = float(state["step"])
    betas = group.get("betas")
    if betas is not None:
        out["beta2"] = float(betas[1])
    for key in ("eps", "lr"):
        if key in group:
            out[key] = float(group[key])
    out["amsgrad"] = bool(group.get("amsgrad", False))
    return out


def _kind_of_groups(groups: list[dict[str, Any]], states: list[dict[str, Any]]) -> str:
    """The optimizer class a positional state dict comes from, as far as its keys tell: Adam and AdamW keep
    ``exp_avg_sq`` and have an ``amsgrad`` switch (RAdam, NAdam and Adamax do not); SGD has ``nesterov``."""
    if groups and all("amsgrad" in g and "betas" in g for g in groups) and all("exp_avg_sq" in s for s in states):
        return "Adam"
    if groups and all("nesterov" in g for g in groups):
        return "SGD"
    return "an optimizer other than Adam"


@dataclass(frozen=True)
class OptimizerState:
    """A checkpoint's optimizer state by parameter name.

    ``kind``: the optimizer's class (``Adam``, ``AdamW``, ``SGD``, ...). ``params``: per parameter name, its
    ``exp_avg_sq`` (and ``max_exp_avg_sq`` with AMSGrad) on the CPU, ``step``, and its group's ``beta2``, ``eps``,
    ``lr`` and ``amsgrad``. ``problem``: why the state could not be given names (then ``params`` is empty).
    """

    kind: str
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    problem: str | None = None

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> OptimizerState:
        """The live state of ``optimizer`` for ``model``'s parameters, named by identity."""
        names = {id(p): n for n, p in model.named_parameters()}
        kind = ("AdamW" if isinstance(optimizer, torch.optim.AdamW) else "Adam" if isinstance(optimizer, torch.optim.Adam)
                else type(optimizer).__name__)
        params = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = optimizer.state.get(p)
                if id(p) in names and state and any(k in state for k in _MOMENTS):
                    params[names[id(p)]] = _entry(state, group)
        return cls(kind, params)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Any], model: torch.nn.Module) -> OptimizerState:
        """Name a positional ``optimizer.state_dict()``: its parameters are numbered in the order of its groups'
        ``params``, which PyKEEN's training loop fills from ``model.get_grad_params()``, the parameters of
        ``model.parameters()`` that train. Every parameter of the model is taken to train; a state whose count or
        shapes differ is kept with its ``problem``."""
        groups = list(state_dict.get("param_groups") or [])
        states = state_dict.get("state") or {}
        kind = _kind_of_groups(groups, list(states.values()))
        named = list(model.named_parameters())
        ids = [i for g in groups for i in g.get("params", [])]
        if len(ids) != len(named):
            return cls(kind, problem=f"its optimizer holds {len(ids)} parameters and the model has {len(named)}, so they "
                                     "cannot be matched by position")
        params = {}
        for i, (name, p) in zip(ids, named, strict=True):
            state = states.get(i)
            if not state or not any(k in state for k in _MOMENTS):
                continue
            if tuple(state["exp_avg_sq"].shape) != tuple(p.shape):
                return cls(kind, problem=f"its optimizer state of parameter {i} has shape {tuple(state['exp_avg_sq'].shape)}, "
                                         f"not that of {name} {tuple(p.shape)}")
            params[name] = _entry(state, next(g for g in groups if i in g.get("params", [])))
        return cls(kind, params)

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> OptimizerState:
        """The form :meth:`to_payload` writes into a :class:`~tracin_index.callbacks.TracinCheckpoint` file."""
        return cls(str(payload.get("class")), dict(payload.get("params") or {}))

    def to_payload(self) -> dict[str, Any]:
        return {"class": self.kind, "params": self.params}

    def restricted(self, names: Sequence[str]) -> OptimizerState:
        """The same state for ``names`` only (the tracked parameters: a query needs no other)."""
        keep = set(names)
        return OptimizerState(self.kind, {n: e for n, e in self.params.items() if n in keep}, self.problem)


def adam_factor(entry: dict[str, Any]) -> torch.Tensor:
    """``1 / (sqrt(v) / sqrt(1 - beta2 ** step) + eps)``, as ``torch.optim.Adam`` divides its step (AMSGrad: the
    running maximum of ``v``)."""
    v = entry["max_exp_avg_sq"] if entry.get("amsgrad") and "max_exp_avg_sq" in entry else entry["exp_avg_sq"]
    correction = math.sqrt(1.0 - entry["beta2"] ** entry["step"])
    return 1.0 / (v.float().sqrt() / correction + entry["eps"])


def _without(ckpt: Checkpoint, what: str) -> InputError:
    where = "the model itself (no checkpoints)" if ckpt.name == "model" else f"checkpoint {ckpt.name}"
    return InputError(f"{where} {what}; train with TracinCheckpoint (it saves the optimizer state with each checkpoint) "
                      f"or use {arg('optimizer', OPTIMIZERS.default)}")


def adam_factors(checkpoints: list[Checkpoint], names: list[str]) -> list[list[torch.Tensor] | None]:
    """Adam's preconditioner of each tracked parameter per checkpoint, from the checkpoints' optimizer states;
    a checkpoint without Adam's state for a tracked parameter, or trained by another optimizer, is refused."""
    out: list[list[torch.Tensor] | None] = []
    for ckpt in checkpoints:
        state = ckpt.optimizer
        if state is None:
            raise _without(ckpt, "holds no optimizer state")
        if state.problem is not None:
            raise _without(ckpt, f"holds an optimizer state that cannot be named ({state.problem})")
        if state.kind not in ADAM_KINDS:
            raise InputError(f"checkpoint {ckpt.name} was trained with {state.kind}, not Adam, whose steps have no "
                             f"per-coordinate preconditioner; use {arg('optimizer', OPTIMIZERS.default)}")
        missing = [n for n in names if not {"exp_avg_sq", "step", "beta2", "eps"} <= set(state.params.get(n, {}))
                   or state.params[n]["step"] < 1]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise _without(ckpt, f"holds no Adam state for the tracked parameter {missing[0]}{more}")
        out.append([adam_factor(state.params[n]) for n in names])
    return out


def sgd_factors(checkpoints: list[Checkpoint], names: list[str]) -> list[list[torch.Tensor] | None]:
    """Plain TracIn: no preconditioner at any checkpoint."""
    return [None] * len(checkpoints)


class Preconditioner:
    """The factor the test gradient of each tracked parameter is multiplied by, per checkpoint (shaped as the
    parameter, on the device), or None at a checkpoint where it is the identity.

    :meth:`apply` returns the blocks of ``P_c g``: embedding rows stay rows (``P`` is diagonal, so only the
    looked-up rows change), dense blocks stay dense, and a Linear weight's outer products become one dense
    matrix per triple (:class:`~tracin_index.outer.DenseOuterGrad`), sketched and multiplied as the weight's
    other blocks are.
    """

    def __init__(self, name: str, factors: list[list[torch.Tensor] | None], tracked: list[TrackedParam]) -> None:
        self.name = name
        self.factors = factors
        self.tracked = tracked

    @classmethod
    def make(cls, name: str, checkpoints: list[Checkpoint], tracked: list[TrackedParam],
             device: torch.device) -> Preconditioner:
        """The preconditioner of the registered optimizer ``name`` (refused in one line when the checkpoints
        lack what it needs)."""
        entry = OPTIMIZERS[name]
        factors = entry.load()(checkpoints, [p.name for p in tracked])
        on_device = [None if f is None else [t.to(device).reshape(p.shape) for t, p in zip(f, tracked, strict=True)]
                     for f in factors]
        return cls(entry.name, on_device, tracked)

    @property
    def identity(self) -> bool:
        return all(f is None for f in self.factors)

    @property
    def bytes_per_triple(self) -> int:
        """Extra bytes one test triple's preconditioned blocks take: a Linear weight's gradient held dense, its
        product and the sketch's intermediates."""
        if self.identity:
            return 0
        return sum(3 * 4 * p.size for p in self.tracked if p.kind == "outer")

    def apply(self, blocks: list[GradBlock], c: int) -> list[GradBlock]:
        """Checkpoint ``c``'s blocks of ``P_c g`` for blocks of ``g``."""
        factors = self.factors[c]
        if factors is None:
            return blocks
        return [blk.scaled(f) for blk, f in zip(blocks, factors, strict=True)]
