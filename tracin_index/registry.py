"""The extension points, one table each: every name a user can pass, its help and its properties.

The command line's choices and help, the checks of :class:`~tracin_index.BuildConfig` and the query
arguments, and the lists in the docs all come from these tables. An entry names its implementation as
``"module:attribute"`` and imports it only when :meth:`Entry.load` is called, so reading a table costs
nothing (the command line builds its help from them before torch is imported).

Adding a loss, a projection, a scoring mode, an optimizer, a search backend, an output format or a sampling
strategy is one entry here plus its implementation.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from .errors import InputError, arg

__all__ = ["FORMATS", "LOSSES", "MODES", "OPTIMIZERS", "PROJECTIONS", "REGISTRIES", "SEARCHES", "STRATEGIES", "Entry",
           "Registry", "format_for"]


@dataclass(frozen=True)
class Entry:
    """One name of an extension point."""

    name: str
    help: str
    target: str = ""  # "module:attribute", relative to this package, of what implements it
    properties: dict[str, Any] = field(default_factory=dict)

    def load(self) -> Any:
        module, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module, __package__), attribute)

    def __getitem__(self, key: str) -> Any:
        return self.properties[key]


class Registry:
    """The entries of one extension point, in the order they are offered; the first is the default
    unless ``default`` says otherwise. ``argument`` is the Python argument that takes the name."""

    def __init__(self, title: str, argument: str, entries: list[Entry], default: str | None = None) -> None:
        self.title = title
        self.argument = argument
        self.entries = {e.name: e for e in entries}
        self.default = default if default is not None else entries[0].name
        assert self.default in self.entries and len(self.entries) == len(entries)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, name: str) -> Entry:
        """The entry called ``name``; an unknown name is refused in one line that lists the known ones."""
        try:
            return self.entries[name]
        except (KeyError, TypeError):
            raise InputError(f"{arg(self.argument, name)} is unknown; choose one of {', '.join(self.names)}") from None

    def check(self, name: str) -> str:
        return self[name].name

    def help(self) -> str:
        """``name: help; ...`` for a command-line option's help text."""
        return "; ".join(f"{e.name}: {e.help}" for e in self)


LOSSES = Registry("Losses", "loss", [
    Entry("bce", "binary cross-entropy with label 1 on score_hrt, softplus(-s)", ".losses:bce_loss"),
    Entry("ce", "1-N cross-entropy -log p(t | h, r) over all tails (models with score_t)", ".losses:ce_loss"),
    Entry("score", "the negated raw score -s(h, r, t), whatever the training loss", ".losses:score_loss"),
])

PROJECTIONS = Registry("Projections", "projection", [
    Entry("sparse", "seeded CountSketch / TensorSketch of each block; fast on the CPU", ".projection:SketchProjector",
          {"dim": True, "dtype": "float16"}),
    Entry("gaussian", "seeded dense Gaussian matrix, generated in chunks; the GPU's projection",
          ".projection:GaussianProjector", {"dim": True, "dtype": "float16"}),
    Entry("none", "no projection: the exact gradients are stored (small models only)", ".projection:NoProjection",
          {"dim": False, "dtype": "float32"}),
])

MODES = Registry("Scoring modes", "mode", [
    Entry("dot", "TracIn: the learning-rate-weighted sum of gradient dot products", "",
          {"lists": ("proponents", "opponents")}),
    Entry("cosine", "the learning-rate-weighted mean of gradient cosines (gradient norms do not dominate)", "",
          {"lists": ("proponents", "opponents")}),
    Entry("abs", "the largest |influence| in one list (the earlier tool's ranking)", "", {"lists": ("top",)}),
])

OPTIMIZERS = Registry("Optimizers", "optimizer", [
    Entry("sgd", "plain TracIn, the test gradient as it is (an SGD step moves the weights along the gradient)",
          ".optimizer:sgd_factors"),
    Entry("adam", "Adam's (and AdamW's) per-coordinate step, the test gradient divided by sqrt(v / (1 - beta2^t)) + eps "
          "with each checkpoint's own second moment v, step t, beta2 and eps (TracinCheckpoint saves them)",
          ".optimizer:adam_factors"),
])

SEARCHES = Registry("Search backends", "search", [
    Entry("auto", "the scan in memory, streamed from the store when the rows would not fit; the build's FAISS "
          "index from 1M rows or when the rows would not fit; FAISS on a GPU with faiss-gpu", "", {"scan": False}),
    Entry("torch", "a blocked exact scan of the rows in memory, with an int8 prefilter for a few queries on the CPU", "",
          {"scan": True}),
    Entry("full", "the blocked scan without the int8 prefilter: every query reads every row", "", {"scan": True}),
    Entry("faiss", "FAISS IndexFlatIP over the rows (faiss-gpu on a GPU when installed)", "", {"scan": False}),
    Entry("stream", "the blocked scan read from the store block by block (indexes larger than memory)", "",
          {"scan": False}),
    Entry("ann", "the build's FAISS index (build --faiss): its compact codes in memory, both ends searched, "
          "candidates re-ranked exactly", "", {"scan": False}),
    Entry("ray", "shards of the rows on Ray actors (RAY_ADDRESS's cluster, else a local one), each holding its "
          "shard's codes (the build's FAISS index, or its rows), merged and re-ranked here", "", {"scan": False}),
])

FORMATS = Registry("Output formats", "out", [
    Entry("parquet", "Apache Parquet, one row per (test, kind, rank)", ".results:PARQUET",
          {"suffix": ".parquet", "table": True}),
    Entry("jsonl", "JSON Lines, one object per (test, kind, rank)", ".results:JSONL",
          {"suffix": ".jsonl", "table": True}),
    Entry("json", "one JSON document, a list with one object of nested lists per test triple", ".results:write_json",
          {"suffix": ".json", "table": False}),
])

STRATEGIES = Registry("Sampling strategies", "stratify", [
    Entry("relation", "each relation sampled at the rate on its own (every relation keeps triples)", ""),
    Entry("none", "a uniform sample of all training triples", ""),
])

REGISTRIES = (LOSSES, PROJECTIONS, MODES, OPTIMIZERS, SEARCHES, FORMATS, STRATEGIES)


def format_for(path: Any, *, tables_only: bool = False) -> Entry:
    """The output format that ``path``'s extension picks; anything else is refused in one line."""
    suffix = PurePosixPath(str(path)).suffix.lower()
    offered = [e for e in FORMATS if e["table"] or not tables_only]
    for entry in offered:
        if entry["suffix"] == suffix:
            return entry
    raise InputError(f"{arg(FORMATS.argument, path)}: the extension picks the format; use "
                     f"{' or '.join(e['suffix'] for e in offered)}")
