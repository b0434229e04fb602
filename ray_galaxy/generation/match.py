"""Galaxies to order by catalogue (``--match``, docs/properties.md): one galaxy per requested row.

A *targets* table (CSV or Parquet, local or s3://) has one column per requested property, named
as in :data:`~ray_galaxy.generation.properties.PROPERTY_NAMES` (any subset, at least one), and
one row per galaxy wanted. Row i asks for the values in its cells; the galaxy made for it is
drawn from a kernel of one of the ``k`` training galaxies nearest to them:

* distance: Euclidean over the requested properties, each difference divided by that
  property's robust spread over the training galaxies
  (:func:`~ray_galaxy.generation.properties.robust_spread`, IQR / 1.349), so that one unit is
  "one standard deviation" of every property whatever its unit;
* candidates: the training galaxies with every requested property measured (and of ``label``,
  satisfying ``where``, when given); ties in distance go to the lower index;
* the draw: uniformly one of the k galaxies' kernels (each galaxy in all its D4 orientations),
  then the kernel's noise, exactly as any draw of the sampler
  (:meth:`~ray_galaxy.generation.sampler.MixtureSampler.around_kernels`).

Row i is drawn with seed block ``seed + i // SEED_BLOCK`` (row ``i % SEED_BLOCK`` of its
uniform numbers and noise), so galaxy i depends on (model, seed, i, row i's request, k, label,
where, temperature, tries), not on which other rows are drawn with it: a catalogue written shard
by shard is the same bytes as one drawn whole.

Best of ``tries``: a draw starts near the requested properties, but the decoder's blur and the
kernel's noise move what comes out. So each row is drawn ``tries`` times (try t > 0 with the
seed of :func:`try_seed`; try 0 is the single draw), every try is decoded and
measured, and the row keeps the try whose *measured* properties are nearest to its request, by
the same distance (:func:`best_tries`; the first on a tie, a try without a measurement never
wins over one with). It is selection among honest draws, not a filter: every row gets a galaxy.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch

from ray_galaxy.generation.latents import SEED_BLOCK
from ray_galaxy.generation.properties import PROPERTY_NAMES, robust_spread
from ray_galaxy.generation.sampler import MixtureSampler
from ray_galaxy.storage import read_bytes

MATCH_K = 8  # nearest training galaxies a row draws among (each in its D4 orientations)
MATCH_TRIES = 8  # draws per row, the one measured nearest to the request kept (docs/properties.md)
FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class MatchError(ValueError):
    """A targets table or a --match request that cannot be used; the message says what to change."""


@dataclass(frozen=True)
class Targets:
    """A targets table read and checked: the requested properties of each row, in file order."""

    source: str
    names: tuple[str, ...]  # the requested properties, in the file's column order
    values: np.ndarray = field(repr=False)  # (rows, len(names)) float64, all finite
    sha256: str = ""  # of the file's bytes: a resumed catalogue must be asked the same

    def __len__(self) -> int:
        return len(self.values)


def _where(source: str, row: int | None = None, column: str | None = None) -> str:
    at = f" row {row} (counting from 0 below the header)" if row is not None else ""
    return f"{source}{at}{f', column {column!r}' if column else ''}"


def _column_values(source: str, name: str, column: pa.ChunkedArray) -> np.ndarray:
    """The finite float64 values of one column; MatchError naming the first bad row."""
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        for i, v in enumerate(column.to_pylist()):
            if v is None:
                raise MatchError(f"{_where(source, i, name)}: is empty; every requested value must be a number")
            try:
                if isinstance(v, bool):
                    raise TypeError
                float(v)
            except (TypeError, ValueError):
                raise MatchError(f"{_where(source, i, name)}: {str(v)[:40]!r} is not a number") from None
        column = pc.cast(column, pa.float64())  # numbers a CSV reader kept as text (e.g. mixed)
    values = column.to_numpy(zero_copy_only=False).astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        what = "is empty" if column[int(bad[0])].as_py() is None else f"is {values[bad[0]]}, not a finite number"
        raise MatchError(f"{_where(source, int(bad[0]), name)}: {what}; every requested value must be a number")
    return values


def targets_from_table(table: pa.Table, source: str, sha256: str = "") -> Targets:
    """Check a targets table (module docstring): MatchError, one line naming the column or row,
    for an unknown column, no property column, a value that is not a finite number, no rows."""
    known = ", ".join(PROPERTY_NAMES)
    unknown = [c for c in table.column_names if c not in PROPERTY_NAMES]
    if unknown:
        raise MatchError(f"{source}: unknown column {unknown[0]!r}; the columns must be properties to match "
                         f"(any of: {known})")
    if not table.column_names:
        raise MatchError(f"{source}: no property column; give at least one of: {known}")
    if len(set(table.column_names)) < len(table.column_names):
        raise MatchError(f"{source}: a column appears twice: {', '.join(table.column_names)}")
    if table.num_rows == 0:
        raise MatchError(f"{source}: no rows; give one row per galaxy wanted")
    values = np.stack([_column_values(source, c, table.column(c)) for c in table.column_names], axis=1)
    return Targets(source, tuple(table.column_names), values, sha256)


def read_targets(uri: str) -> Targets:
    """Read and check a targets table (CSV with a header row, or Parquet; local or s3://)."""
    kind = next((k for suffix, k in FORMATS.items() if uri.lower().endswith(suffix)), None)
    if kind is None:
        raise MatchError(f"{uri}: a targets table must be a .csv or .parquet file")
    try:
        data = read_bytes(uri)
    except (OSError, ValueError) as e:
        raise MatchError(f"{uri}: cannot be read ({e})") from None
    if not data.strip():
        raise MatchError(f"{uri}: the file is empty; give a header row of properties and one row per galaxy")
    try:
        # Only an empty cell is missing: "nan" or "NA" is a value that is not a number, and says so.
        table = (pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(null_values=[""]))
                 if kind == "csv" else pq.read_table(io.BytesIO(data)))
    except (pa.ArrowInvalid, OSError) as e:
        raise MatchError(f"{uri}: not a readable {kind.upper()} table ({str(e).splitlines()[0]})") from None
    return targets_from_table(table, uri, hashlib.sha256(data).hexdigest())


# --------------------------------------------------------------------------- nearest kernels


def candidates(sampler: MixtureSampler, names: Sequence[str], k: int, label: str | None = None,
               where: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(training values (N, P) of ``names``, their spread (P,), the candidate galaxies (N,) bool).

    MatchError when fewer than ``k`` galaxies are candidates or a property has no spread;
    the sampler's own errors (no properties, a bad label or selection) pass through."""
    props = sampler.properties
    train = np.stack([props[name] for name in names], axis=1)
    spread = robust_spread(train)
    flat = [n for n, s in zip(names, spread) if not (s > 0)]
    if flat:
        raise MatchError(f"property {flat[0]!r} does not vary over the training galaxies (no spread to scale by); "
                         "leave its column out")
    pool = np.isfinite(train).all(axis=1)
    selected = sampler.selected_images(label, where)
    if selected is not None:
        pool &= selected
    if pool.sum() < k:
        among = f" of class {label!r}" if label else ""
        among += f" satisfying {where!r}" if where else ""
        raise MatchError(f"only {int(pool.sum())} training galaxies{among} have {', '.join(names)} measured, fewer "
                         f"than k = {k} to draw among; lower --match-k")
    return train, spread, pool


def nearest(train: np.ndarray, spread: np.ndarray, pool: np.ndarray, requests: np.ndarray, k: int) -> np.ndarray:
    """(m, k) indices of the training galaxies in ``pool`` nearest to each of ``requests``
    (m, P), nearest first, by Euclidean distance over the spread-scaled properties; ties go to
    the lower index."""
    index = np.flatnonzero(pool)
    scaled = train[index] / spread
    d2 = (((requests / spread)[:, None, :] - scaled[None, :, :]) ** 2).sum(-1)  # (m, pool)
    order = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return index[order]


def try_seed(seed: int, block: int, attempt: int) -> int:
    """The generator seed of seed block ``block``, try ``attempt``: ``seed + block`` for try 0 (the
    single draw), else one hashed from all three. Not ``seed + block + attempt * stride``: torch's
    CPU generator keeps only the low 32 bits of a seed, so any stride lands on another seed's blocks."""
    if attempt == 0:
        return int(seed) + block
    return int(np.random.SeedSequence([int(seed) % 2 ** 64, block, attempt]).generate_state(1)[0])


def match_latents(sampler: MixtureSampler, targets: Targets, n: int, seed: int = 0, start: int = 0,
                  k: int = MATCH_K, temperature: float = 1.0, label: str | None = None,
                  where: str | None = None, attempt: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """(codes (n, D), training galaxy of each) for rows ``start`` .. ``start + n - 1`` of
    ``targets``, try ``attempt`` of each (module docstring)."""
    if n < 1 or start < 0 or start + n > len(targets):
        raise ValueError(f"rows {start}..{start + n - 1} are not rows of the {len(targets)} targets")
    train, spread, pool = candidates(sampler, targets.names, k, label, where)
    images = len(train)
    orientations = len(sampler.tensors["kernel_codes"]) // images
    codes, galaxies = [], []
    row = start
    while row < start + n:
        block, within = divmod(row, SEED_BLOCK)
        m = min(start + n - row, SEED_BLOCK - within)
        g = torch.Generator().manual_seed(try_seed(seed, block, attempt))
        u = torch.rand(SEED_BLOCK, generator=g, dtype=torch.float64)[within:within + m].numpy()
        eps = torch.randn(SEED_BLOCK, sampler.latent_dim, generator=g, dtype=torch.float64)[within:within + m]
        near = nearest(train, spread, pool, targets.values[row:row + m], k)
        pick = np.minimum((u * k * orientations).astype(np.int64), k * orientations - 1)
        galaxy = near[np.arange(m), pick // orientations]
        kernels = torch.from_numpy(galaxy + (pick % orientations) * images)
        codes.append(sampler.around_kernels(kernels, eps, temperature))
        galaxies.append(galaxy)
        row += m
    return torch.cat(codes), np.concatenate(galaxies)


def scaled_errors(requested: np.ndarray, measured: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """|measured - requested| / spread, per row and property (NaN where not measured)."""
    return np.abs(np.asarray(measured, np.float64) - requested) / spread



def best_tries(requested: np.ndarray, measured: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """(n,) the try of each row to keep: ``measured`` (tries, n, P) against ``requested`` (n, P),
    by the spread-scaled Euclidean distance of :func:`nearest`; a try with a property not
    measured is farthest, and ties (all unmeasured included) go to the first try."""
    d2 = (((np.asarray(measured, np.float64) - requested[None]) / spread) ** 2).sum(-1)  # (tries, n)
    return np.argmin(np.where(np.isfinite(d2), d2, np.inf), axis=0)
