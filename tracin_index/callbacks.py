"""Training-side integration: save TracIn checkpoints while pykeen trains, and find them again.

:class:`TracinCheckpoint` is a pykeen training callback that writes ``epoch_{epoch:05d}.pt`` files holding the
model state at the end of an epoch, the optimizer's state at that moment and the learning rate in force *during*
that epoch; :func:`find_checkpoints` turns a directory of such files (or pykeen's own checkpoint files) into the
``(path, lr)`` list that :func:`tracin_index.build.build_index` and :func:`tracin_index.model.load_checkpoints` take.

Facts about pykeen 1.11 this relies on (``pykeen/training/training_loop.py``):

* epochs are 1-based: the loop runs ``for epoch in range(1, 1 + num_epochs)`` (or from the resumed epoch + 1) and
  passes that number to ``post_epoch`` unchanged. (pykeen's own ``CheckpointTrainingCallback`` adds 1 again, so
  its ``checkpoint_0000002.pt`` holds the state after epoch 1.)
* user callbacks are registered first; ``LearningRateSchedulerTrainingCallback`` is appended after them, so a
  user callback's ``post_epoch`` sees the optimizer's lr *before* the scheduler steps: the lr of the epoch just run.
* the training-loop checkpoint (``checkpoint_name=...``) is written by ``_save_state`` *after* all
  ``post_epoch`` callbacks, i.e. after the scheduler stepped: with a scheduler, its optimizer lr is the *next*
  epoch's, not the lr of the epoch the saved state finished. Without a scheduler the lr never changes.
* the training loop builds its optimizer on ``model.get_grad_params()`` (the parameters of ``model.parameters()``
  that train), so the training-loop checkpoint's ``optimizer_state_dict`` numbers them in that order;
  :func:`tracin_index.model.load_checkpoints` names them by it.
"""

from __future__ import annotations

import math
import os
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pykeen.training.callbacks import TrainingCallback

from .atomic import replacing
from .errors import InputError, spelled
from .model import _state_dict_of
from .optimizer import OptimizerState

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_SUFFIXES", "TracinCheckpoint", "find_checkpoints"]

CHECKPOINT_FORMAT = "tracin-index-checkpoint"
CHECKPOINT_VERSION = 1
#: files of a directory that :func:`find_checkpoints` reads (names starting with "." are skipped)
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")
_NAME = "epoch_{epoch:05d}.pt"


class TracinCheckpoint(TrainingCallback):
    """Save ``directory/epoch_{epoch:05d}.pt`` at chosen (1-based) epochs of a pykeen training run.

    Use as ``pipeline(..., training_kwargs={"callbacks": [TracinCheckpoint(directory, frequency=10)]})``.
    An epoch ``e`` is saved when ``frequency`` divides it, when it is in ``epochs``, or (``last=True``) when it
    is the final epoch of the run. Each file is written atomically (temporary file in ``directory``, then
    ``os.replace``; an existing file of the same name is replaced) and holds::

        {"format": "tracin-index-checkpoint", "version": 1, "epoch": e,
         "lr": lr of param group 0, "lrs": [lr of every param group],
         "state_dict": {name: tensor on cpu}}

    and, with ``optimizer_state=True``, ``"optimizer": {"class": "Adam", "params": {name: {"exp_avg_sq": tensor,
    "step": t, "beta2": b2, "eps": eps, "lr": lr, "amsgrad": False}}}``: the optimizer's state of each parameter
    by name (its second moments only: ``max_exp_avg_sq`` too with AMSGrad; an SGD run records its class and no
    parameters), for optimizer-aware queries (:mod:`tracin_index.optimizer`).

    ``state_dict`` is the model at the end of epoch ``e`` and ``optimizer`` the optimizer's state at the same
    moment; ``lr``/``lrs`` are the learning rates in force *during* epoch ``e`` (read before pykeen's scheduler
    callback steps). TracIn weights a checkpoint by one scalar: with several param groups of different lrs, all
    are recorded but ``lr`` (group 0) is the one used.

    ``last`` is honoured in ``post_train``, which pykeen does not call when an early stopper ends training;
    there, rely on ``frequency``/``epochs``.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        frequency: int | None = None,
        epochs: Iterable[int] | None = None,
        last: bool = True,
        optimizer_state: bool = True,
    ) -> None:
        super().__init__()
        if frequency is not None and (isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1):
            raise InputError(f"TracinCheckpoint frequency must be a positive number of epochs, got {frequency!r}")
        chosen = set() if epochs is None else set(epochs)
        bad = [e for e in chosen if isinstance(e, bool) or not isinstance(e, int) or e < 1]
        if bad:
            raise InputError(f"TracinCheckpoint epochs are 1-based positive integers, got {sorted(map(repr, bad))}")
        if frequency is None and not chosen and not last:
            raise InputError("TracinCheckpoint would save nothing: give frequency=, epochs= or last=True")
        self.directory = Path(directory)
        self.frequency = frequency
        self.epochs = frozenset(chosen)
        self.last = last
        self.optimizer_state = optimizer_state
        self.saved: list[Path] = []  # files written by this callback, in order
        self._final: tuple[int, list[float]] | None = None  # (epoch, lrs) of the latest epoch seen
        self._final_saved = False
        self.run_id = uuid.uuid4().hex  # every file of this training run records it; find_checkpoints refuses mixes
        self.directory.mkdir(parents=True, exist_ok=True)

    def wants(self, epoch: int) -> bool:
        """Whether ``epoch`` (1-based) is saved by ``frequency`` or ``epochs`` (``last`` aside)."""
        return (self.frequency is not None and epoch % self.frequency == 0) or epoch in self.epochs

    def post_epoch(self, epoch: int, epoch_loss: float, **kwargs: Any) -> None:
        """Record the lr of the epoch just run (pykeen passes it 1-based) and save it if scheduled."""
        lrs = [float(group["lr"]) for group in self.optimizer.param_groups]
        self._final = (epoch, lrs)
        self._final_saved = self.wants(epoch)
        if self._final_saved:
            self._save(epoch, lrs)

    def post_train(self, losses: list[float], **kwargs: Any) -> None:
        """Save the final epoch if ``last`` and it was not saved already (the model is unchanged since)."""
        if self.last and self._final is not None and not self._final_saved:
            self._save(*self._final)
            self._final_saved = True

    def _save(self, epoch: int, lrs: list[float]) -> None:
        state = {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v for k, v in self.model.state_dict().items()}
        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "epoch": int(epoch),
            "lr": lrs[0],
            "lrs": lrs,
            "run_id": self.run_id,
            "state_dict": state,
        }
        if self.optimizer_state:
            payload["optimizer"] = OptimizerState.of(self.optimizer, self.model).to_payload()
        path = self.directory / _NAME.format(epoch=epoch)
        with replacing(path) as tmp:
            torch.save(payload, tmp)
        self.saved.append(path)


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Found:
    path: Path
    epoch: int | None  # from the file's contents; None when it holds none
    lr: float
    name_epoch: int  # the last number in the file name (-1 when none): only to order files without an epoch
    run_id: str | None = None  # TracinCheckpoint's training run


def find_checkpoints(path: str | os.PathLike[str], *, default_lr: float | None = None) -> list[tuple[str, float]]:
    """``(path, lr)`` for every checkpoint in a directory (or one file), sorted by epoch.

    A directory contributes its ``*.pt``, ``*.pth`` and ``*.ckpt`` files (not recursively; names starting with
    ``.`` are skipped), each of which must be one of:

    * a :class:`TracinCheckpoint` file: its recorded ``lr``;
    * pykeen's training-loop checkpoint (``training_kwargs={"checkpoint_name": ...}``): the lr of
      ``optimizer_state_dict["param_groups"][0]``, which is the lr of the saved epoch only when the run had no
      LR scheduler. With a scheduler, pykeen saves after the scheduler stepped, so the stored lr is the next
      epoch's: such a file is refused unless ``default_lr`` is given;
    * a file with a model state but no learning rate (pykeen's ``CheckpointTrainingCallback``/``save_model``
      ``{"state_dict": ..., "version": 1}``, a bare state dict, a whole model): refused unless ``default_lr``
      is given.

    ``default_lr`` is used for every file that holds no lr of its own epoch (a recorded lr that is not positive
    and finite is an error, not replaced). Files are ordered by the epoch they record (files without one by
    the last number in their name, after those with one); two files recording the same epoch are an error.
    Every problem raises :class:`InputError` with a one-line message.
    """
    if default_lr is not None:
        default_lr = _check_lr(default_lr, "default_lr")
    root = Path(path)
    if not root.exists():
        raise InputError(f"checkpoint path not found: {root} (give a directory of checkpoints or a checkpoint file)")
    if root.is_dir():
        files = sorted(
            p for p in root.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES and not p.name.startswith(".")
        )
        if not files:
            raise InputError(
                f"no checkpoint files ({', '.join('*' + s for s in CHECKPOINT_SUFFIXES)}) in {root}; "
                "train with TracinCheckpoint(directory) or give the files "
                + spelled("as checkpoints=[(FILE, LR), ...]", "with --checkpoint FILE --lr LR")
            )
    else:
        files = [root]
    found = [_inspect(f, default_lr) for f in files]
    runs = {f.run_id for f in found if f.run_id is not None}
    if len(runs) > 1:
        raise InputError(f"{root} mixes checkpoints of {len(runs)} training runs (an earlier run's files were left "
                         "there); give each run its own directory, or remove the old files")
    by_epoch: dict[int, Path] = {}
    for item in found:
        if item.epoch is None:
            continue
        if item.epoch in by_epoch:
            raise InputError(
                f"two checkpoints record epoch {item.epoch}: {by_epoch[item.epoch]} and {item.path}; "
                "keep one of them (each would be counted)"
            )
        by_epoch[item.epoch] = item.path
    found.sort(key=lambda f: (f.epoch is None, f.epoch if f.epoch is not None else f.name_epoch, f.path.name))
    return [(str(f.path), f.lr) for f in found]


def _inspect(path: Path, default_lr: float | None) -> _Found:
    """Read one file: the epoch it records (if any) and the lr to weight it by."""
    if not os.access(path, os.R_OK):
        raise InputError(f"checkpoint {path} is not readable (check its permissions)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)  # trusted local pykeen/tracin files
    except Exception as exc:  # torch raises many types for a bad file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(
            f"checkpoint {path} could not be loaded by torch.load ({reason}); give a file saved with torch.save"
        ) from exc
    numbers = re.findall(r"\d+", path.stem)
    name_epoch = int(numbers[-1]) if numbers else -1
    fix = "pass it explicitly " + spelled(f"as checkpoints=[({str(path)!r}, LR)] (or default_lr=LR)",
                                          f"with --checkpoint {path} --lr LR")

    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        if obj.get("version") != CHECKPOINT_VERSION:
            raise InputError(
                f"checkpoint {path} has {CHECKPOINT_FORMAT} version {obj.get('version')!r}, this tracin-index reads "
                f"version {CHECKPOINT_VERSION}; upgrade tracin-index"
            )
        epoch, lr = obj.get("epoch"), obj.get("lr")
        if not isinstance(epoch, int) or not isinstance(obj.get("state_dict"), dict):
            raise InputError(
                f"checkpoint {path} is an incomplete {CHECKPOINT_FORMAT} file (no epoch or state_dict); save it again"
            )
        return _Found(path, epoch, _file_lr(lr, path, default_lr, fix), name_epoch, obj.get("run_id"))

    if isinstance(obj, dict) and "model_state_dict" in obj and "optimizer_state_dict" in obj:
        epoch = obj.get("epoch") if isinstance(obj.get("epoch"), int) else None
        if obj.get("lr_scheduler_state_dict") is not None:
            if default_lr is None:
                raise InputError(
                    f"checkpoint {path} is a pykeen training-loop checkpoint of a run with an LR scheduler: its lr was "
                    f"already stepped for the next epoch; {fix} (the lr of epoch {epoch}), or train with TracinCheckpoint"
                )
            return _Found(path, epoch, default_lr, name_epoch)
        try:
            lr = obj["optimizer_state_dict"]["param_groups"][0]["lr"]
        except (KeyError, IndexError, TypeError):
            lr = None
        return _Found(path, epoch, _file_lr(lr, path, default_lr, fix), name_epoch)

    try:
        _state_dict_of(obj, path)
    except InputError:
        raise InputError(
            f"checkpoint {path} holds neither a model nor a state dict (found {type(obj).__name__}); "
            "remove it from the directory or give the checkpoints one by one"
        ) from None
    if default_lr is None:
        raise InputError(f"checkpoint {path} holds no learning rate; {fix}")
    return _Found(path, None, default_lr, name_epoch)


def _file_lr(lr: Any, path: Path, default_lr: float | None, fix: str) -> float:
    if lr is None:
        if default_lr is None:
            raise InputError(f"checkpoint {path} holds no learning rate; {fix}")
        return default_lr
    return _check_lr(lr, f"checkpoint {path}: learning rate", fix)


def _check_lr(lr: Any, what: str, fix: str = "give a positive finite number") -> float:
    try:
        value = float(lr)
    except (TypeError, ValueError):
        raise InputError(f"{what} {lr!r} is not a number; {fix}") from None
    if isinstance(lr, bool) or not (value > 0 and math.isfinite(value)):
        raise InputError(f"{what} {lr!r} must be positive and finite; {fix}")
    return value
