"""Class labels of training images from a CSV file (conditional generation).

A labels file is a CSV with a header row, read from a local path or URI:

* the **first column** is the key: an image's file name (``101654.jpg``) or its stem
  (``101654``); a key with folders (``train/101654.jpg``) is reduced to its file name;
* the **class column** is the one named ``label``, ``class`` or ``morphology`` (the first of
  those present, case-insensitive), else the last column.

Galaxy Zoo 2's ``labels.csv`` (``id,split,morphology``) reads as key ``id``, class
``morphology``. An image matches a row by its file name or its stem; images with no row (or an
empty class cell) are unlabelled: they are used for everything else but join no class.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from ray_galaxy.data import DataError
from ray_galaxy.storage import StorageError, read_bytes

LABEL_COLUMNS = ("label", "class", "morphology")


class LabelsError(DataError):
    """A labels CSV that cannot be read or used; the message names the file."""


@dataclass(frozen=True)
class LabelTable:
    """A read labels file: class by key (file name or stem)."""

    source: str
    key_column: str
    label_column: str
    by_key: dict[str, str]

    @property
    def classes(self) -> list[str]:
        """The class names, sorted."""
        return sorted(set(self.by_key.values()))


def _basename(path: str) -> str:
    return path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _label_column(header: list[str]) -> int:
    """Index of the class column: the first named in LABEL_COLUMNS, else the last."""
    lower = [h.strip().lower() for h in header]
    for name in LABEL_COLUMNS:
        if name in lower[1:]:
            return lower.index(name, 1)
    return len(header) - 1


def parse_labels(text: str, source: str) -> LabelTable:
    """A :class:`LabelTable` from the CSV ``text`` (``source`` names it in errors)."""
    # A BOM from spreadsheet exports is not part of the first key.
    rows = [r for r in csv.reader(io.StringIO(text.lstrip("\ufeff"))) if any(c.strip() for c in r)]
    if not rows:
        raise LabelsError(f"labels file {source} is empty; expected a header row such as 'id,label'")
    header = rows[0]
    if len(header) < 2:
        raise LabelsError(f"labels file {source}: the header {','.join(header)!r} has one column; expected "
                          f"the key (file name or stem) first and a class column ({', '.join(LABEL_COLUMNS)} "
                          "or the last column)")
    col = _label_column(header)
    by_key: dict[str, str] = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise LabelsError(f"labels file {source}, line {line}: {len(row)} columns, the header has "
                              f"{len(header)}")
        key, label = _basename(row[0].strip()), row[col].strip()
        if not key or not label:
            continue  # no key or no class: that image stays unlabelled
        if by_key.get(key, label) != label:
            raise LabelsError(f"labels file {source}, line {line}: {key!r} is labelled both "
                              f"{by_key[key]!r} and {label!r}")
        by_key[key] = label
    if not by_key:
        raise LabelsError(f"labels file {source} has no labelled rows (column {header[col]!r})")
    return LabelTable(source, header[0].strip(), header[col].strip(), by_key)


def read_labels(uri: str) -> LabelTable:
    """Read a labels CSV from a local path or URI (:func:`parse_labels`)."""
    try:
        data = read_bytes(uri)
    except (OSError, StorageError) as e:
        raise LabelsError(f"cannot read labels file {uri}: {e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise LabelsError(f"labels file {uri} is not UTF-8 text (a CSV is expected)") from None
    return parse_labels(text, uri)


def label_of(path: str, table: LabelTable) -> str | None:
    """The class of the image at ``path`` (matched by file name, then stem), None if it has none."""
    name = _basename(path)
    found = table.by_key.get(name)
    return found if found is not None else table.by_key.get(_stem(name))


def labels_for(paths: Sequence[str], table: LabelTable) -> list[str | None]:
    """The class of each image in ``paths`` (None when unlabelled). Raises :class:`LabelsError`
    when none matches (most likely the wrong file or keys of another form)."""
    labels = [label_of(p, table) for p in paths]
    if paths and all(label is None for label in labels):
        example = next(iter(table.by_key))
        raise LabelsError(f"labels file {table.source}: none of the {len(paths)} images matches a key (keys "
                          f"look like {example!r}, images like {_basename(paths[0])!r}); the first column "
                          "must hold file names or stems")
    return labels


def label_counts(labels: Sequence[str | None]) -> dict[str, int]:
    """Images per class (sorted by class), unlabelled ones left out."""
    counts = Counter(label for label in labels if label is not None)
    return {k: counts[k] for k in sorted(counts)}


def describe_labels(labels: Sequence[str | None], source: str) -> str:
    """One log line: how many images got which class, and how many none."""
    counts = label_counts(labels)
    unlabelled = sum(label is None for label in labels)
    classes = ", ".join(f"{k} {v}" for k, v in counts.items())
    return (f"labels from {source}: {len(labels) - unlabelled} of {len(labels)} images labelled ({classes})"
            + (f"; {unlabelled} without a label join no class" if unlabelled else ""))
