"""Stage 1: load a PyKEEN model, its training triples and checkpoints; fingerprint them.

The triples themselves (label files, id maps, test sets, typed labels) are read by :mod:`tracin_index.triples`.
Everything here returns plain objects (a model in eval mode, an ``(N, 3) int64`` tensor of raw ids,
label lists); nothing prints. Raw ids are the ids pykeen saves (relation ``r``); the model-internal ids
(``2r`` and ``2r + 1`` for models trained with inverse triples) are made by
:func:`tracin_index.layers.internal_rows`, and the tracked layers are picked there.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import InputError, arg
from .layers import fresh_representations
from .optimizer import OptimizerState
from .triples import (
    PYKEEN_PREFIX,
    TriplesData,
    _require_file,
    _triples_from_pykeen_dir,
    _triples_from_tsv,
    load_label_triples,
    load_test_triples,
    parse_triple,
    suggest,
)

# TriplesData, load_label_triples, load_test_triples, parse_triple, suggest and PYKEEN_PREFIX live in .triples
__all__ = [
    "PYKEEN_PREFIX",
    "Checkpoint",
    "ModelBundle",
    "TriplesData",
    "load_checkpoints",
    "load_model",
    "load_label_triples",
    "load_test_triples",
    "parse_triple",
    "state_fingerprint",
    "suggest",
    "triples_fingerprint",
]

TRAINED_MODEL_FILE = "trained_model.pkl"
TRAINING_TRIPLES_DIR = "training_triples"


@dataclass(frozen=True)
class Checkpoint:
    """One model state and the learning rate in force when it was saved; ``optimizer``: the optimizer's state
    at the same moment, by parameter name, when the file holds it and it was asked for."""

    name: str
    state: dict[str, torch.Tensor]
    lr: float
    fingerprint: str
    optimizer: OptimizerState | None = None


@dataclass
class ModelBundle:
    """A model in eval mode, its training triples, and how it was loaded (recorded in the store)."""

    model: nn.Module
    triples: TriplesData
    source: dict[str, Any] = field(default_factory=dict)


def _torch_load(path: Path, what: str) -> Any:
    _require_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a bad file
        raise InputError(f"{what} {path} could not be loaded by torch.load: {exc}") from exc


# ---------------------------------------------------------------------------------------------- models


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in ("model_state_dict", "state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict):
                return inner
            if isinstance(inner, nn.Module):
                return inner.state_dict()
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise InputError(f"{path} holds neither a model nor a state dict (found {type(obj).__name__})")


def load_model(
    path: str | os.PathLike[str],
    *,
    model_class: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    triples: str | os.PathLike[str] | None = None,
    entity_to_id: str | os.PathLike[str] | None = None,
    relation_to_id: str | os.PathLike[str] | None = None,
    inverse_triples: bool | None = None,
) -> ModelBundle:
    """Load a model and its training triples.

    ``path`` is one of: the directory ``pipeline(...).save_to_directory()`` wrote; a whole model saved
    with ``torch.save``; or a state dict (then ``model_class`` names the pykeen model and the triples give
    its sizes). Training triples come from ``triples`` (label TSV + id maps) or the model directory's
    ``training_triples/``.
    """
    p = Path(path)
    source: dict[str, Any] = {"path": str(p.resolve())}
    triples_data: TriplesData | None = None
    if triples is not None:
        triples_data = _triples_from_tsv(Path(triples), _opt_path(entity_to_id), _opt_path(relation_to_id))
        source["triples"] = str(Path(triples).resolve())
        source["entity_to_id"] = str(Path(entity_to_id).resolve()) if entity_to_id else None
        source["relation_to_id"] = str(Path(relation_to_id).resolve()) if relation_to_id else None

    if not p.exists():
        raise InputError(f"model not found: {p} (give a pykeen results directory or a torch.save file)")
    if p.is_dir():
        model_file = p / TRAINED_MODEL_FILE
        if not model_file.exists():
            raise InputError(f"{p} has no {TRAINED_MODEL_FILE}; give the directory save_to_directory() wrote")
        obj = _torch_load(model_file, "model file")
        if triples_data is None:
            tdir = p / TRAINING_TRIPLES_DIR
            if not tdir.is_dir():
                raise InputError(f"{p} has no {TRAINING_TRIPLES_DIR}/; give "
                                 f"{arg('triples')} with {arg('entity_to_id')}/{arg('relation_to_id')}")
            triples_data = _triples_from_pykeen_dir(tdir)
    else:
        obj = _torch_load(p, "model file")
        if triples_data is None:
            tdir = p.parent / TRAINING_TRIPLES_DIR
            if not tdir.is_dir():
                raise InputError(f"no training triples for {p}: give "
                                 f"{arg('triples')} with {arg('entity_to_id')}/{arg('relation_to_id')}")
            triples_data = _triples_from_pykeen_dir(tdir)

    if isinstance(obj, nn.Module):
        model = obj
        source["kind"] = "module"
    else:
        state = _state_dict_of(obj, p)
        if model_class is None:
            raise InputError(f"{p} is a state dict; name its model with {arg('model_class')} (e.g. ConvE)")
        model = _build_model(model_class, model_kwargs or {}, triples_data, inverse_triples)
        _load_state(model, state, str(p))
        source.update(kind="state_dict", model_class=model_class, model_kwargs=model_kwargs or {})
        source["inverse_triples"] = bool(getattr(model, "use_inverse_triples", False))

    _check_sizes(model, triples_data)
    fresh_representations(model)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return ModelBundle(model=model, triples=triples_data, source=source)


def _opt_path(p: str | os.PathLike[str] | None) -> Path | None:
    return None if p is None else Path(p)


def _build_model(
    model_class: str, kwargs: dict[str, Any], triples: TriplesData, inverse_triples: bool | None
) -> nn.Module:
    from pykeen.models import model_resolver
    from pykeen.triples import CoreTriplesFactory

    try:
        cls = model_resolver.lookup(model_class)
    except Exception as exc:
        raise InputError(f"unknown model class {model_class!r}: {exc}") from exc
    tf = CoreTriplesFactory.create(
        mapped_triples=triples.mapped,
        num_entities=len(triples.entity_labels),
        num_relations=len(triples.relation_labels),
        create_inverse_triples=bool(inverse_triples),
    )
    try:
        return cls(triples_factory=tf, random_seed=0, **kwargs)
    except Exception as exc:
        raise InputError(f"could not construct {model_class} with {kwargs}: {exc}") from exc


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) or first[0]
        raise InputError(f"{what} is not a state of this model's architecture: {detail}") from exc


def _check_sizes(model: nn.Module, triples: TriplesData) -> None:
    num_e = getattr(model, "num_entities", None)
    num_r = getattr(model, "num_real_relations", None)
    if num_e is not None and num_e != len(triples.entity_labels):
        raise InputError(
            f"the entity id map has {len(triples.entity_labels)} entities but the model has {num_e}; "
            "give the id maps the model was trained with"
        )
    if num_r is not None and num_r != len(triples.relation_labels):
        raise InputError(
            f"the relation id map has {len(triples.relation_labels)} relations but the model has {num_r}; "
            "give the id maps the model was trained with"
        )
    if triples.mapped.shape[0] == 0:
        raise InputError("the training set is empty; nothing to index")


def _optimizer_of(obj: Any, model: nn.Module, keep: Sequence[str]) -> OptimizerState | None:
    """The optimizer state a checkpoint file holds, by parameter name, for the parameters ``keep``: a
    ``TracinCheckpoint`` file's (``optimizer``, by name), or a positional ``optimizer.state_dict()`` (PyKEEN's
    training-loop ``optimizer_state_dict``, or ``optimizer`` beside the model) named in the model's order."""
    if not isinstance(obj, dict):
        return None
    for key in ("optimizer", "optimizer_state_dict"):
        found = obj.get(key)
        if isinstance(found, dict) and "class" in found and "params" in found:
            return OptimizerState.from_payload(found).restricted(keep)
        if isinstance(found, dict) and "param_groups" in found and "state" in found:
            return OptimizerState.from_state_dict(found, model).restricted(keep)
    return None


def load_checkpoints(model: nn.Module, specs: list[tuple[str, float]], *,
                     optimizer_params: Sequence[str] | None = None) -> list[Checkpoint]:
    """Load ``(path, lr)`` pairs; without any, the model's own state with lr 1.

    ``optimizer_params``: the parameters whose optimizer state to keep in ``Checkpoint.optimizer`` (a query's
    tracked parameters); None keeps none.
    """
    if not specs:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return [Checkpoint(name="model", state=state, lr=1.0, fingerprint=state_fingerprint(state))]
    out = []
    reference = model.state_dict()
    for path, lr in specs:
        if not (lr > 0 and np.isfinite(lr)):
            raise InputError(f"learning rate {lr} for checkpoint {path} must be a positive number")
        p = Path(path)
        if p.is_dir():
            p = p / TRAINED_MODEL_FILE
        obj = _torch_load(p, "checkpoint")
        state = _state_dict_of(obj, p)
        state = {k: v.detach().cpu() for k, v in state.items()}  # torch.load's own tensors: no copy needed
        optimizer = None if optimizer_params is None else _optimizer_of(obj, model, optimizer_params)
        missing = sorted(set(reference) - set(state))
        extra = sorted(set(state) - set(reference))
        bad = [k for k in reference if k in state and tuple(state[k].shape) != tuple(reference[k].shape)]
        if missing or extra or bad:
            detail = (
                f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra else f"shape of {bad[:3]}"
            )
            raise InputError(f"checkpoint {path} is not a state of this model's architecture ({detail})")
        out.append(Checkpoint(name=str(Path(path).resolve()), state=state, lr=float(lr), fingerprint=state_fingerprint(state),
                              optimizer=optimizer))
    return out


# ---------------------------------------------------------------------------------------------- fingerprints


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of a state dict (independent of how it was pickled)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.view(torch.uint8).numpy().data)  # the buffer itself, no copy
    return digest.hexdigest()


def triples_fingerprint(mapped: torch.Tensor) -> str:
    """sha256 of the ``(N, 3) int64`` raw-id triples in little-endian order (hashed in blocks: no copy of
    an int64 table, which is 120 MB at 5M triples)."""
    flat = np.ascontiguousarray(mapped.cpu().numpy(), dtype="<i8").reshape(-1)
    digest = hashlib.sha256()
    for start in range(0, flat.size, 1 << 20):
        digest.update(flat[start : start + (1 << 20)].data)
    return digest.hexdigest()
