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

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Each public name and the module it lives in: a module is imported when one of its names is first used,
# so ``import tracin_index`` itself imports nothing heavy (no torch, pykeen or FAISS).
_EXPORTS = {
    "BuildConfig": "build", "build_index": "build", "sample_rows": "build",
    "IndexMismatchError": "errors", "InputError": "errors", "StoreError": "errors", "TracinError": "errors",
    "FORMATS": "registry", "LOSSES": "registry", "MODES": "registry", "OPTIMIZERS": "registry", "PROJECTIONS": "registry",
    "SEARCHES": "registry", "STRATEGIES": "registry",
    "ModelBundle": "model", "load_model": "model",
    "open_index": "opening",
    "ProjectionSpec": "projection",
    "TracinIndex": "query",
    "AggregateResult": "rankings", "Influence": "rankings", "QueryResult": "rankings", "Ranking": "rankings",
    "Results": "rankings", "ScoreSettings": "rankings", "self_influence_ranking": "rankings",
    "write_json": "results", "write_records": "results", "write_scores": "results",
    "collect_builds": "retention",
    "TracinCheckpoint": "callbacks", "find_checkpoints": "callbacks",
}

__all__ = [  # every name of _EXPORTS, and the version
    "AggregateResult", "BuildConfig", "FORMATS", "IndexMismatchError", "Influence", "InputError", "LOSSES",
    "MODES", "ModelBundle", "OPTIMIZERS", "PROJECTIONS", "ProjectionSpec", "QueryResult", "Ranking", "Results", "SEARCHES",
    "STRATEGIES", "ScoreSettings", "StoreError", "TracinCheckpoint", "TracinError", "TracinIndex",
    "__version__", "build_index", "collect_builds", "find_checkpoints", "load_model", "open_index",
    "sample_rows", "self_influence_ranking", "write_json", "write_records", "write_scores",
]

if TYPE_CHECKING:
    from .build import BuildConfig, build_index, sample_rows
    from .callbacks import TracinCheckpoint, find_checkpoints
    from .errors import IndexMismatchError, InputError, StoreError, TracinError
    from .model import ModelBundle, load_model
    from .opening import open_index
    from .projection import ProjectionSpec
    from .query import TracinIndex
    from .rankings import (
        AggregateResult,
        Influence,
        QueryResult,
        Ranking,
        Results,
        ScoreSettings,
        self_influence_ranking,
    )
    from .registry import FORMATS, LOSSES, MODES, OPTIMIZERS, PROJECTIONS, SEARCHES, STRATEGIES
    from .results import write_json, write_records, write_scores
    from .retention import collect_builds


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tracin_index' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
