"""TracIn influence for PyKEEN models: index training-triple gradients once, query them fast.

Public API::

    bundle = load_model("results/nations_conve")              # pykeen save_to_directory() output
    build_index(bundle, "idx", config=BuildConfig(layers="last:2"))
    index = open_index("idx")
    [result] = index.query("brazil intergovorgs usa", k=10)    # QueryResult(proponents, opponents)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .build import BuildConfig, build_index
from .errors import IndexMismatchError, InputError, StoreError, TracinError
from .losses import LOSSES
from .model import ModelBundle, load_model
from .projection import PROJECTIONS, ProjectionSpec
from .query import Influence, QueryResult, TracinIndex, open_index

__all__ = [
    "LOSSES",
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
