"""TracinCheckpoint saves each epoch's state with the lr in force during it; find_checkpoints reads them back."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from tracin_index import BuildConfig, ProjectionSpec, build_index, load_model
from tracin_index.callbacks import CHECKPOINT_FORMAT, TracinCheckpoint, find_checkpoints
from tracin_index.errors import InputError
from tracin_index.model import load_checkpoints

EPOCHS = 4
LR0, STEP, GAMMA = 0.01, 2, 0.5


def lr_of(epoch: int) -> float:
    """StepLR's lr during 1-based ``epoch``, computed independently of pykeen."""
    return LR0 * GAMMA ** ((epoch - 1) // STEP)


@dataclass
class Run:
    root: Path
    run_dir: Path
    every: Path  # TracinCheckpoint(frequency=1): epochs 1..4
    sparse: Path  # TracinCheckpoint(frequency=3, epochs=[1]): 1, 3 and 4 (last, via post_train)
    loop_file: Path  # pykeen's training-loop checkpoint (saved after the scheduler stepped)
    pykeen_dir: Path  # pykeen's CheckpointTrainingCallback files (no lr)
    states: dict[int, dict[str, torch.Tensor]]  # model state at the end of every epoch, recorded independently
    final: dict[str, torch.Tensor]


def _pipeline(callbacks: list[Any], epochs: int, scheduler: bool, **training: Any) -> Any:
    from pykeen.pipeline import pipeline

    extra: dict[str, Any] = {"lr_scheduler": "StepLR", "lr_scheduler_kwargs": {"step_size": STEP, "gamma": GAMMA}}
    return pipeline(
        dataset="Nations",
        model="DistMult",
        model_kwargs={"embedding_dim": 16},
        training_loop="LCWA",
        loss="BCEWithLogits",
        optimizer="Adam",
        optimizer_kwargs={"lr": LR0},
        **(extra if scheduler else {}),
        training_kwargs={"num_epochs": epochs, "batch_size": 512, "callbacks": callbacks, "use_tqdm": False, **training},
        evaluation_kwargs={"batch_size": 512, "use_tqdm": False},
        random_seed=0,
        device="cpu",
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    from pykeen.training.callbacks import CheckpointTrainingCallback, TrainingCallback

    root = tmp_path_factory.mktemp("callbacks")
    states: dict[int, dict[str, torch.Tensor]] = {}

    class Record(TrainingCallback):
        def post_epoch(self, epoch: int, epoch_loss: float, **kwargs: Any) -> None:
            states[epoch] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    callbacks = [
        Record(),
        TracinCheckpoint(root / "every", frequency=1),
        TracinCheckpoint(root / "sparse", frequency=3, epochs=[1]),
        CheckpointTrainingCallback(root=root / "pykeen", schedule="every", schedule_kwargs={"frequency": 1}),
    ]
    result = _pipeline(callbacks, EPOCHS, True, checkpoint_name="loop.pt", checkpoint_directory=str(root / "loop"),
                       checkpoint_frequency=0)
    result.save_to_directory(root / "run")
    final = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
    return Run(root, root / "run", root / "every", root / "sparse", root / "loop" / "loop.pt", root / "pykeen", states, final)


def _load(path: str | Path) -> dict[str, Any]:
    obj = torch.load(path, weights_only=False)
    assert isinstance(obj, dict)
    return obj


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def test_files_epochs_and_lrs(run: Run) -> None:
    assert sorted(p.name for p in run.every.iterdir()) == [f"epoch_{e:05d}.pt" for e in range(1, EPOCHS + 1)]
    assert sorted(p.name for p in run.sparse.iterdir()) == ["epoch_00001.pt", "epoch_00003.pt", "epoch_00004.pt"]
    for directory in (run.every, run.sparse):
        for path in directory.iterdir():
            obj = _load(path)
            epoch = int(path.stem.split("_")[1])
            assert obj["format"] == CHECKPOINT_FORMAT and obj["version"] == 1 and obj["epoch"] == epoch
            # pykeen's scheduler steps after user callbacks: epochs 2 and 4 still see the lr before the step
            assert obj["lr"] == pytest.approx(lr_of(epoch), rel=1e-12) and obj["lrs"] == [obj["lr"]]
            assert _same(obj["state_dict"], run.states[epoch])
            assert all(v.device.type == "cpu" for v in obj["state_dict"].values())
    assert _same(_load(run.every / "epoch_00004.pt")["state_dict"], run.final)
    assert _same(_load(run.sparse / "epoch_00004.pt")["state_dict"], run.final)  # saved by last=True


def test_find_checkpoints_sorted_and_loadable(run: Run) -> None:
    found = find_checkpoints(run.every)
    assert found == [(str(run.every / f"epoch_{e:05d}.pt"), pytest.approx(lr_of(e))) for e in range(1, EPOCHS + 1)]
    assert find_checkpoints(run.sparse / "epoch_00003.pt") == [(str(run.sparse / "epoch_00003.pt"), pytest.approx(lr_of(3)))]
    bundle = load_model(run.run_dir)
    ckpts = load_checkpoints(bundle.model, found)
    assert [c.lr for c in ckpts] == [lr for _, lr in found]
    for epoch, ckpt in enumerate(ckpts, start=1):
        assert _same(ckpt.state, run.states[epoch])


def test_pykeen_training_loop_checkpoint(run: Run, tmp_path: Path) -> None:
    obj = _load(run.loop_file)
    assert obj["epoch"] == EPOCHS and _same(obj["model_state_dict"], run.final)
    # saved after the scheduler stepped: the stored lr is epoch 5's, not epoch 4's
    assert obj["optimizer_state_dict"]["param_groups"][0]["lr"] == pytest.approx(lr_of(EPOCHS + 1))
    assert lr_of(EPOCHS + 1) != lr_of(EPOCHS)
    with pytest.raises(InputError, match=r"already stepped.*as checkpoints=\[\(.*, LR\)\] \(or default_lr=LR\)") as info:
        find_checkpoints(run.loop_file)
    assert "\n" not in str(info.value) and str(run.loop_file) in str(info.value)
    assert f"explicitly with --checkpoint {run.loop_file} --lr LR (the lr" in info.value.render(lambda name: "--" + name)
    assert find_checkpoints(run.loop_file, default_lr=lr_of(EPOCHS)) == [(str(run.loop_file), lr_of(EPOCHS))]

    # without a scheduler the optimizer's lr is the lr of every epoch, the one read from the file
    _pipeline([], 2, False, checkpoint_name="plain.pt", checkpoint_directory=str(tmp_path), checkpoint_frequency=0)
    assert find_checkpoints(tmp_path) == [(str(tmp_path / "plain.pt"), LR0)]
    bundle = load_model(run.run_dir)
    (ckpt,) = load_checkpoints(bundle.model, find_checkpoints(tmp_path))
    assert _same(ckpt.state, _load(tmp_path / "plain.pt")["model_state_dict"]) and ckpt.lr == LR0


def test_pykeen_callback_files_need_an_lr(run: Run) -> None:
    files = sorted(run.pykeen_dir.iterdir())
    assert len(files) == EPOCHS and set(_load(files[0])) == {"state_dict", "version"}
    # pykeen 1.11 adds 1 to the already 1-based epoch: checkpoint_0000002.pt holds the state after epoch 1
    assert [f.name for f in files] == [f"checkpoint_{e + 1:07d}.pt" for e in range(1, EPOCHS + 1)]
    assert _same(_load(files[0])["state_dict"], run.states[1])
    with pytest.raises(InputError, match=r"holds no learning rate; pass it explicitly as checkpoints=\[\(") as info:
        find_checkpoints(run.pykeen_dir)
    assert "\n" not in str(info.value)
    found = find_checkpoints(run.pykeen_dir, default_lr=0.5)
    assert found == [(str(f), 0.5) for f in files]  # ordered by the number in the name
    assert len(load_checkpoints(load_model(run.run_dir).model, found)) == EPOCHS


def test_build_from_directory_equals_by_hand(run: Run, tmp_path: Path) -> None:
    by_hand = [(str(run.sparse / f"epoch_{e:05d}.pt"), lr_of(e)) for e in (1, 3, 4)]
    config = BuildConfig(layers="all", projection=ProjectionSpec("none"))
    a = build_index(load_model(run.run_dir), tmp_path / "a", checkpoints=find_checkpoints(run.sparse), config=config)
    b = build_index(load_model(run.run_dir), tmp_path / "b", checkpoints=by_hand, config=config)
    ga, gb = np.asarray(a.array("grads")[:]), np.asarray(b.array("grads")[:])
    assert ga.shape == gb.shape and np.array_equal(ga, gb)
    assert [c["lr"] for c in a.attrs["checkpoints"]] == pytest.approx([lr for _, lr in by_hand])


def test_several_param_groups_and_atomic_write(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    optimizer = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1}, {"params": model[1].parameters(), "lr": 0.2}])
    callback = TracinCheckpoint(tmp_path / "new" / "dir", epochs=[2], last=False)
    callback.register_training_loop(SimpleNamespace(model=model, optimizer=optimizer))  # type: ignore[arg-type]
    for epoch in (1, 2, 3):
        callback.post_epoch(epoch=epoch, epoch_loss=0.0)
    callback.post_train(losses=[0.0] * 3)
    assert [p.name for p in (tmp_path / "new" / "dir").iterdir()] == ["epoch_00002.pt"]  # no temporary files left
    obj = _load(tmp_path / "new" / "dir" / "epoch_00002.pt")
    assert obj["lr"] == 0.1 and obj["lrs"] == [0.1, 0.2] and _same(obj["state_dict"], model.state_dict())


def _write(path: Path, **changes: Any) -> Path:
    obj = {"format": CHECKPOINT_FORMAT, "version": 1, "epoch": 1, "lr": 0.1, "lrs": [0.1],
           "state_dict": {"w": torch.zeros(2)}}
    obj.update(changes)
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("lr", [0.0, -0.1, math.nan, math.inf])
def test_bad_lr_in_file(tmp_path: Path, lr: float) -> None:
    path = _write(tmp_path / "epoch_00001.pt", lr=lr)
    with pytest.raises(InputError, match=r"must be positive and finite"):
        find_checkpoints(tmp_path)
    with pytest.raises(InputError, match=r"must be positive and finite"):
        find_checkpoints(path, default_lr=0.1)  # a recorded bad lr is not replaced


def test_errors(tmp_path: Path) -> None:
    def one_line(pattern: str, path: Path, **kwargs: Any) -> None:
        with pytest.raises(InputError, match=pattern) as info:
            find_checkpoints(path, **kwargs)
        assert "\n" not in str(info.value)

    one_line(r"checkpoint path not found", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    one_line(r"no checkpoint files .* in .*empty; train with TracinCheckpoint", tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.pt").write_bytes(b"not a torch file\n\nat all")
    one_line(r"x\.pt could not be loaded by torch\.load", tmp_path / "bad")
    (tmp_path / "other").mkdir()
    torch.save({"hello": "world"}, tmp_path / "other" / "y.pt")
    one_line(r"y\.pt holds neither a model nor a state dict", tmp_path / "other")
    (tmp_path / "dup").mkdir()
    _write(tmp_path / "dup" / "a.pt")
    _write(tmp_path / "dup" / "b.pt")
    one_line(r"two checkpoints record epoch 1", tmp_path / "dup")
    one_line(r"default_lr 0 must be positive", tmp_path / "dup", default_lr=0)
    _write(tmp_path / "dup" / "b.pt", version=2)
    one_line(r"version 2", tmp_path / "dup")


def test_constructor_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="frequency"):
        TracinCheckpoint(tmp_path, frequency=0)
    with pytest.raises(InputError, match="1-based"):
        TracinCheckpoint(tmp_path, epochs=[0, 2])
    with pytest.raises(InputError, match="would save nothing"):
        TracinCheckpoint(tmp_path, last=False)
