"""Stage 1, the data side: training and test triples, their label tables, and labels typed by a user.

Label TSV files (``head<TAB>relation<TAB>tail``) and id maps (``label<TAB>id`` in either column order)
are read here, pykeen triples directories and datasets are mapped through the index's own label tables,
and an unknown label is reported with the closest known ones. Triples are raw ids ``(N, 3) int64``.
"""

from __future__ import annotations

import csv
import difflib
import io
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InputError, arg

__all__ = ["QUESTION", "PYKEEN_PREFIX", "TriplesData", "load_label_triples", "load_test_triples", "parse_triple", "parse_triples",
           "relation_ids", "suggest"]

QUESTION = -1  # the id of the "?" end of a question about the model's predictions

PYKEEN_PREFIX = "pykeen:"


@dataclass(frozen=True)
class TriplesData:
    """Training triples as raw ids ``(N, 3) int64`` plus the label of every entity and relation id."""

    mapped: torch.Tensor
    entity_labels: list[str]
    relation_labels: list[str]

    @property
    def entity_to_id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.entity_labels)}

    @property
    def relation_to_id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.relation_labels)}


def _require_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise InputError(f"{what} not found: {path} (check the path)")
    if path.is_dir():
        raise InputError(f"{what} is a directory, expected a file: {path}")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} is not readable: {path} (check its permissions)")
    return path


def _read_tsv_rows(path: Path, what: str) -> list[list[str]]:
    _require_file(path, what)
    data = path.read_bytes()
    if path.suffix == ".gz":
        import gzip

        data = gzip.decompress(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {path} is not UTF-8 text: {exc}") from exc
    try:
        return [row for row in csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)]
    except csv.Error as exc:
        raise InputError(f"{what} {path} is not a tab-separated text file ({exc})") from None


def _read_id_map(path: Path, what: str) -> dict[str, int]:
    """Read a two-column label/id TSV in either column order (pykeen writes ``id<TAB>label`` with a header)."""
    rows = _read_tsv_rows(path, what)
    mapping: dict[str, int] = {}
    for lineno, row in enumerate(rows, start=1):
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != 2:
            raise InputError(f"{what} {path} line {lineno}: expected 2 tab-separated fields, found {len(row)}")
        a, b = row
        if a.strip().lstrip("-").isdigit():
            label, value = b, int(a)
        elif b.strip().lstrip("-").isdigit():
            label, value = a, int(b)
        elif lineno == 1:
            continue  # header
        else:
            raise InputError(f"{what} {path} line {lineno}: neither field is an integer id")
        mapping[label] = value
    if not mapping:
        raise InputError(f"{what} {path} holds no label/id pairs")
    ids = sorted(mapping.values())
    if ids != list(range(len(ids))):
        raise InputError(f"{what} {path}: ids must be 0..{len(ids) - 1} without gaps or repeats")
    return mapping


def _labels_from_map(mapping: Mapping[str, int]) -> list[str]:
    labels = [""] * len(mapping)
    for label, i in mapping.items():
        labels[i] = label
    return labels


def suggest(label: str, known: list[str]) -> str:
    """`` (closest known: a, b, c)`` for an unknown label: a match ignoring case first, then the most similar
    labels (a looser similarity when nothing is close and the table is small enough to search it)."""
    folded = [k for k in known if k.casefold() == label.casefold()]
    close = folded or difflib.get_close_matches(label, known, n=3)
    if not close and len(known) <= 100_000:
        close = difflib.get_close_matches(label, known, n=3, cutoff=0.3)
    return f" (closest known: {', '.join(close)})" if close else ""


def load_label_triples(path: Path, entity_to_id: dict[str, int], relation_to_id: dict[str, int], *,
                       questions: bool = False) -> torch.Tensor:
    """Read a ``head<TAB>relation<TAB>tail`` label file into ``(N, 3) int64`` raw ids; with ``questions``, a
    ``?`` as the head or the tail is a question about the model's predictions (id :data:`QUESTION`)."""
    rows = _read_tsv_rows(path, "triples file")
    out = []
    known_e, known_r = list(entity_to_id), list(relation_to_id)
    for lineno, row in enumerate(rows, start=1):
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != 3:
            raise InputError(
                f"triples file {path} line {lineno}: expected 3 tab-separated fields (head, relation, tail), "
                f"found {len(row)}"
            )
        h, r, t = row
        _check_question(h, t, questions, f"triples file {path} line {lineno}")
        for label, table, known, kind in ((h, entity_to_id, known_e, "entity"), (t, entity_to_id, known_e, "entity")):
            if label not in table and not (questions and label == "?"):
                raise InputError(f"triples file {path} line {lineno}: unknown {kind} {label!r}{suggest(label, known)}")
        if r not in relation_to_id:
            raise InputError(f"triples file {path} line {lineno}: unknown relation {r!r}{suggest(r, known_r)}")
        out.append((entity_to_id.get(h, QUESTION), relation_to_id[r], entity_to_id.get(t, QUESTION)))
    if not out:
        raise InputError(f"triples file {path} holds no triples")
    return torch.tensor(out, dtype=torch.long)


def _check_question(h: str, t: str, questions: bool, where: str) -> None:
    if questions and h == "?" and t == "?":
        raise InputError(f"{where}: ask about the head or the tail, not both ('? relation tail' or 'head relation ?')")


def parse_triple(text: str, triples: TriplesData, *, questions: bool = False) -> tuple[int, int, int]:
    """Map ``"head relation tail"`` (tab- or whitespace-separated labels) to raw ids; with ``questions``, a ``?``
    head or tail becomes :data:`QUESTION`."""
    parts = text.split("\t") if "\t" in text else text.split()
    if len(parts) != 3:
        raise InputError(
            f"triple {text!r} has {len(parts)} parts; give 'head relation tail' "
            "(separate by tabs when labels contain spaces)"
        )
    h, r, t = (p.strip() for p in parts)
    _check_question(h, t, questions, f"triple {text!r}")
    e2i, r2i = triples.entity_to_id, triples.relation_to_id
    for label, table, kind in ((h, e2i, "entity"), (r, r2i, "relation"), (t, e2i, "entity")):
        if label not in table and not (questions and kind == "entity" and label == "?"):
            raise InputError(f"unknown {kind} {label!r} in triple {text!r}{suggest(label, list(table))}")
    return e2i.get(h, QUESTION), r2i[r], e2i.get(t, QUESTION)



# ---------------------------------------------------------------------------------------------- training triples


def _triples_from_pykeen_dir(path: Path) -> TriplesData:
    from pykeen.triples import TriplesFactory

    try:
        tf = TriplesFactory.from_path_binary(path)
    except Exception as exc:
        raise InputError(f"training triples directory {path} could not be read by pykeen: {exc}") from exc
    return TriplesData(
        mapped=tf.mapped_triples.to(torch.long).clone(),
        entity_labels=_labels_from_map(tf.entity_to_id),
        relation_labels=_labels_from_map(tf.relation_to_id),
    )


def _triples_from_tsv(triples: Path, entity_to_id: Path | None, relation_to_id: Path | None) -> TriplesData:
    if entity_to_id is None or relation_to_id is None:
        raise InputError(f"{arg('triples')} needs {arg('entity_to_id')} and {arg('relation_to_id')} (the id maps the model "
                         "was trained with)")
    e2i = _read_id_map(Path(entity_to_id), "entity-to-id file")
    r2i = _read_id_map(Path(relation_to_id), "relation-to-id file")
    mapped = load_label_triples(Path(triples), e2i, r2i)
    return TriplesData(mapped=mapped, entity_labels=_labels_from_map(e2i), relation_labels=_labels_from_map(r2i))


# ---------------------------------------------------------------------------------------------- test sets


def _map_labels(label_triples: np.ndarray, triples: TriplesData, what: str) -> torch.Tensor:
    e2i, r2i = triples.entity_to_id, triples.relation_to_id
    out = np.empty((len(label_triples), 3), dtype=np.int64)
    for i, (h, r, t) in enumerate(label_triples):
        for label, table, kind in ((h, e2i, "entity"), (r, r2i, "relation"), (t, e2i, "entity")):
            if label not in table:
                raise InputError(f"{what} triple {i}: unknown {kind} {label!r}{suggest(str(label), list(table))}")
        out[i] = (e2i[h], r2i[r], e2i[t])
    return torch.from_numpy(out)


def load_test_triples(spec: str | os.PathLike[str], triples: TriplesData, *, questions: bool = False) -> torch.Tensor:
    """Test triples as raw ids ``(M, 3) int64`` of the indexed model, from any of:

    - a label TSV file (``head<TAB>relation<TAB>tail``, one triple per line);
    - a pykeen triples directory (``TriplesFactory.to_path_binary``, e.g. a run's ``training_triples``);
    - ``pykeen:DATASET[:SPLIT]``, a dataset pykeen ships or has cached (``pykeen:nations:testing``;
      the split defaults to ``testing``).

    Labels are mapped through the index's own label tables, so id orders need not agree.
    """
    text = str(spec)
    if text.startswith(PYKEEN_PREFIX):
        name, _, split = text[len(PYKEEN_PREFIX):].partition(":")
        split = split or "testing"
        if split not in ("training", "testing", "validation"):
            raise InputError(f"{arg('test', text)}: split {split!r} is unknown; use training, testing or validation")
        from pykeen.datasets import dataset_resolver, get_dataset

        try:
            dataset_resolver.lookup(name)
        except (KeyError, ValueError):
            known = sorted(dataset_resolver.lookup_dict)
            raise InputError(f"{arg('test', text)}: pykeen has no dataset {name!r}{suggest(name.lower(), known)}") from None
        factory = getattr(get_dataset(dataset=name), split)
        return _map_labels(factory.label_triples(factory.mapped_triples), triples, f"{name}:{split}")
    path = Path(text)
    if path.is_dir():
        from pykeen.triples import TriplesFactory

        try:
            factory = TriplesFactory.from_path_binary(path)
        except Exception as exc:
            raise InputError(f"test triples directory {path} could not be read by pykeen: {exc}") from exc
        return _map_labels(factory.label_triples(factory.mapped_triples), triples, str(path))
    return load_label_triples(path, triples.entity_to_id, triples.relation_to_id, questions=questions)


# ---------------------------------------------------------------------------------------------- query input


def parse_triples(triples: Any, labels: TriplesData, *, questions: bool = False) -> torch.Tensor:
    """Test triples to raw ids ``(M, 3) int64`` of the tables in ``labels``.

    Accepts ``"head relation tail"`` label strings (one or a list), raw id tuples, an ``(M, 3)``
    tensor or array, a label TSV path, a pykeen triples directory, or ``"pykeen:DATASET[:SPLIT]"``.
    With ``questions``, ``"head relation ?"`` and ``"? relation tail"`` (or :data:`QUESTION` as an id) ask
    about the model's predictions; their unknown end is :data:`QUESTION` in the result.
    """
    if isinstance(triples, os.PathLike) or (
        isinstance(triples, str) and (triples.startswith(PYKEEN_PREFIX) or (os.path.exists(triples) and "\t" not in triples))
    ):
        return load_test_triples(triples, labels, questions=questions)
    if isinstance(triples, np.ndarray):
        triples = torch.from_numpy(triples)
    if isinstance(triples, torch.Tensor):
        out = triples.reshape(-1, 3).to(torch.long)
    else:
        single = isinstance(triples, str) or (
            isinstance(triples, tuple | list) and len(triples) == 3 and all(isinstance(x, numbers.Integral) for x in triples))
        rows = []
        for item in [triples] if single else list(triples):
            if isinstance(item, str):
                rows.append(parse_triple(item, labels, questions=questions))
            else:
                h, r, t = (int(x) for x in item)
                rows.append((h, r, t))
        out = torch.tensor(rows, dtype=torch.long).reshape(-1, 3)
    num_e, num_r = len(labels.entity_labels), len(labels.relation_labels)
    asked = (out[:, 0] == QUESTION) ^ (out[:, 2] == QUESTION) if questions else torch.zeros(len(out), dtype=torch.bool)
    ends = out[:, [0, 2]]
    bad = (((ends < 0) & ~asked[:, None]) | (ends >= num_e)).any(1) | (out[:, 1] < 0) | (out[:, 1] >= num_r)
    if bool(bad.any()):
        raise InputError(f"triple ids {out[bad][0].tolist()} are out of range ({num_e} entities, {num_r} relations)")
    return out


def relation_ids(relations: Sequence[str | int] | None, labels: TriplesData) -> tuple[int, ...] | None:
    """Relation labels (or ids) to sorted ids, refusing unknown ones with the closest labels."""
    if not relations:
        return None
    table, names = labels.relation_to_id, labels.relation_labels
    out = set()
    for r in relations:
        if isinstance(r, int) or (isinstance(r, str) and r not in table and r.isdigit()):
            i = int(r)
            if not 0 <= i < len(names):
                raise InputError(f"{arg('relations', r)}: relation id out of range (0..{len(names) - 1})")
            out.add(i)
        elif r in table:
            out.add(table[r])
        else:
            raise InputError(f"{arg('relations', r)} is not a relation of this index{suggest(r, names)}")
    return tuple(sorted(out))
