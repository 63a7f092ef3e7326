"""TracIn influence for PyKEEN models: index training-triple gradients once, query them fast.

Public API::

    bundle = load_model("results/nations_conve")              # pykeen save_to_directory() output
    build_index(bundle, "idx", config=BuildConfig(layers="last:2"))
    index = open_index("idx")
    [result] = index.query("brazil intergovorgs usa", k=10)    # QueryResult(proponents, opponents)
    index.score("pykeen:nations", k=10).to_frame()             # bulk, one row per (test, kind, rank)
    index.self_influence(top=20)                               # suspicious training triples
"""

from __future__ import annotations

__version__ = "0.1.0"

from .build import BuildConfig, build_index, sample_rows
from .errors import IndexMismatchError, InputError, StoreError, TracinError
from .losses import LOSSES
from .model import ModelBundle, load_model
from .opening import open_index
from .projection import PROJECTIONS, ProjectionSpec
from .query import TracinIndex
from .rankings import (
    MODES,
    AggregateResult,
    Influence,
    QueryResult,
    Ranking,
    Results,
    ScoreSettings,
    self_influence_ranking,
)
from .results import write_scores

__all__ = [
    "LOSSES",
    "MODES",
    "AggregateResult",
    "Ranking",
    "Results",
    "ScoreSettings",
    "sample_rows",
    "self_influence_ranking",
    "write_scores",
    "PROJECTIONS",
    "BuildConfig",
    "Influence",
    "IndexMismatchError",
    "InputError",
    "ModelBundle",
    "ProjectionSpec",
    "QueryResult",
    "StoreError",
    "TracinError",
    "TracinIndex",
    "__version__",
    "build_index",
    "load_model",
    "open_index",
]


def __getattr__(name: str) -> object:
    # The training callback imports pykeen.training (about 2 s): load it only when asked for.
    if name in ("TracinCheckpoint", "find_checkpoints"):
        from . import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module 'tracin_index' has no attribute {name!r}")
