"""Real PyKEEN models trained once per test session on Nations (ships with pykeen; no downloads)."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tracin_index.layers import internal_rows
from tracin_index.runtime import configure_threads

logging.getLogger("pykeen").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")
configure_threads(2, tune_allocator=True)  # as the CLI does


@dataclass
class Trained:
    """A saved pykeen run: ``save_to_directory`` output plus two checkpoints with their learning rates."""

    name: str
    directory: Path
    checkpoints: list[tuple[str, float]]
    model: Any
    testing: torch.Tensor  # (M, 3) raw ids of Nations' test triples


def _train(root: Path, name: str, model: str, inverse: bool, model_kwargs: dict[str, Any], epochs: int) -> Trained:
    from pykeen.pipeline import pipeline
    from pykeen.training.callbacks import TrainingCallback

    out = root / name
    ckpts: list[tuple[str, float]] = []
    keep = {max(1, epochs // 2), epochs}

    class Save(TrainingCallback):
        def post_epoch(self, epoch: int, epoch_loss: float, **kwargs: Any) -> None:
            if epoch in keep:
                path = out / f"ckpt_{epoch}.pt"
                out.mkdir(parents=True, exist_ok=True)
                torch.save(self.model.state_dict(), path)
                ckpts.append((str(path), float(self.optimizer.param_groups[0]["lr"])))

    result = pipeline(
        dataset="Nations",
        dataset_kwargs={"create_inverse_triples": inverse},
        model=model,
        model_kwargs=model_kwargs,
        training_loop="LCWA",
        loss="BCEAfterSigmoid" if model == "ConvE" else "BCEWithLogits",
        optimizer="Adam",
        optimizer_kwargs={"lr": 0.01},
        lr_scheduler="StepLR",
        lr_scheduler_kwargs={"step_size": 1, "gamma": 0.8},
        training_kwargs={"num_epochs": epochs, "batch_size": 256, "callbacks": [Save()], "use_tqdm": False},
        evaluation_kwargs={"batch_size": 512, "use_tqdm": False},
        random_seed=0,
        device="cpu",
    )
    result.save_to_directory(out / "run")
    lrs = {lr for _, lr in ckpts}
    assert len(ckpts) == 2 and len(lrs) == 2, "checkpoints must carry different learning rates"
    from pykeen.datasets import Nations

    testing = Nations(create_inverse_triples=inverse).testing.mapped_triples.clone()
    return Trained(name, out / "run", ckpts, result.model.cpu().eval(), testing)


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def conve_inverse(models_root: Path) -> Trained:
    return _train(models_root, "conve_inv", "ConvE", True, {"embedding_dim": 32, "output_channels": 4}, 4)


@pytest.fixture(scope="session")
def conve_plain(models_root: Path) -> Trained:
    return _train(models_root, "conve_plain", "ConvE", False, {"embedding_dim": 32, "output_channels": 4}, 4)


@pytest.fixture(scope="session")
def distmult_inverse(models_root: Path) -> Trained:
    return _train(models_root, "distmult_inv", "DistMult", True, {"embedding_dim": 16}, 4)


@pytest.fixture(scope="session")
def distmult_plain(models_root: Path) -> Trained:
    return _train(models_root, "distmult_plain", "DistMult", False, {"embedding_dim": 16}, 4)


@pytest.fixture(scope="session")
def conve_demo(models_root: Path) -> Trained:
    """ConvE at pykeen's default size (d=200, 32 filters: a 9728x200 Linear), as in the demo."""
    return _train(models_root, "conve_demo", "ConvE", True, {"embedding_dim": 200, "output_channels": 32}, 12)


def reference_gradients(model: Any, states: list[dict[str, torch.Tensor]], names: list[str],
                        triples: torch.Tensor, loss: str = "bce") -> list[torch.Tensor]:
    """The earlier tool's method: one triple at a time, plain ``torch.autograd.grad``, flattened.

    Returns one ``(N, D)`` tensor per state. Independent of the package's gradient code: only the
    id mapping for inverse triples and the loss's formula are shared with the definition.
    """
    import copy

    import torch.nn.functional as F

    m = copy.deepcopy(model).eval()
    out = []
    for state in states:
        m.load_state_dict(state)
        params = dict(m.named_parameters())
        tracked = [params[n] for n in names]
        for p in m.parameters():
            p.requires_grad_(False)
        for p in tracked:
            p.requires_grad_(True)
        rows = []
        for i in range(triples.shape[0]):
            batch, _ = internal_rows(m, triples[i : i + 1])
            if loss == "bce":
                value = F.softplus(-m.score_hrt(batch)).sum()
            elif loss == "ce":
                value = F.cross_entropy(m.score_t(batch[:, :2]), batch[:, 2], reduction="sum")
            else:
                value = -m.score_hrt(batch).sum()
            grads = torch.autograd.grad(value, tracked, allow_unused=True)
            flat = [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, tracked, strict=True)]
            rows.append(torch.cat(flat))
        out.append(torch.stack(rows).detach())
    return out


def exact_ends(influence: torch.Tensor, k: int) -> tuple[list[int], list[int]]:
    """Brute force for one test row ``(N,)``: the top-``k`` positive and bottom-``k`` negative train indices."""
    top = [int(i) for i in torch.argsort(influence, descending=True)[:k] if influence[i] > 0]
    bottom = [int(i) for i in torch.argsort(influence)[:k] if influence[i] < 0]
    return top, bottom
