"""Bulk galaxy catalogues with Ray Data (``jobs/generate.py``).

A catalogue is galaxies 0 .. n-1 of one (model, sampler, seed, label, where): galaxy i is exactly what
``Generator.load(model).images(...)`` gives for index i (and so what Serve and
``jobs/sample.py`` give), because every galaxy is drawn and decoded by the
:class:`~ray_galaxy.generation.generator.Generator`. The indices are cut into shards of
``shard_size`` galaxies aligned to the generator's seed blocks (:data:`SEED_BLOCK`); Ray Data
runs one row per missing shard through a pool of actors, each holding one Generator, that
draws, decodes, encodes and writes its shard.

To order (``--match targets.csv``): galaxy i is drawn for row i of a targets table near the
training galaxies whose properties are nearest to the row's (:mod:`ray_galaxy.generation.match`),
and its row also holds the requested properties and those measured on its image
(:mod:`ray_galaxy.morphology`, as the training galaxies were): :data:`MATCH_COLUMNS`.

Output layout (local folder or s3:// prefix)::

    <out>/settings.json                    what the galaxies are (model version, sampler, seed, ...)
    <out>/shards/shard-000012.parquet      parquet: galaxies [12*M, 13*M), columns COLUMNS
    <out>/00003084.png                     png: one file per galaxy, named by index
    <out>/manifest.json                    written last: the catalogue is complete iff it exists

Resumable: each file is written under its deterministic name atomically (a temporary name
renamed locally; on S3 an object is visible only once complete), so a rerun lists what is
there and generates only the missing shards. ``settings.json`` guards against mixing: a rerun
with other settings into the same ``out`` is an error, not a silent mix.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from ray_galaxy.config import ConfigError, _h
from ray_galaxy.console import fmt_seconds, log
from ray_galaxy.generation.generator import SAMPLERS, Generator
from ray_galaxy.generation.latents import SEED_BLOCK
from ray_galaxy.generation.match import MATCH_K, MATCH_TRIES, Targets, read_targets
from ray_galaxy.generation.properties import PROPERTY_NAMES
from ray_galaxy.images import png_bytes
from ray_galaxy.runtime import ensure_ray
from ray_galaxy.storage import absolute, join, resolve

FORMATS = ("parquet", "png")
CATALOGUE_FORMAT = 1
MANIFEST = "manifest.json"
SETTINGS = "settings.json"
SHARDS_DIR = "shards"
COLUMNS = ("image", "index", "seed", "latent", "sampler", "label", "model_version")
# With --match, after COLUMNS: requested_<p> for each requested property p, then measured_<p>
# for every property.
MEASURED_COLUMNS = tuple(f"measured_{p}" for p in PROPERTY_NAMES)
DEFAULT_N = 1000
# PNG names are zero-padded to this many digits so that they sort by index (more past 10^8).
PNG_DIGITS = 8
# A progress line at most this often (and always for the last shard).
PROGRESS_SECONDS = 5.0
# File systems where an object becomes visible only when its upload completes: written in place.
ATOMIC_ON_CLOSE = ("s3", "gcs")


class CatalogueError(ValueError):
    """The catalogue cannot be written as asked (settings, output folder, cluster)."""


@dataclass
class CatalogueConfig:
    """Settings of ``jobs/generate.py`` (each is also a ``--flag`` and a YAML key)."""

    model: str = _h("Model directory written by jobs/train.py (path or URI).", default="")
    n: int | None = _h(f"Number of galaxies: indices 0 .. n-1 (default {DEFAULT_N}); with --match, one per row "
                       "of the targets (leave it out).", default=None)
    out: str = _h("Output folder or URI (s3://bucket/prefix); rerunning resumes it.", default="")
    seed: int = _h("Random seed; galaxy i depends only on (model, sampler, seed, i).", default=0)
    sampler: str = _h("Latent sampler: 'prior' (N(0, I)), 'gmm' (the model's fitted sampler, with its "
                      "residual detail) or 'auto' (gmm when the model has one, else prior).", default="auto")
    temperature: float = _h("Scale of the sampler's noise (1 = as fitted).", default=1.0)
    detail: bool = _h("With the gmm sampler: add the residual detail; --no-detail writes the decoder's "
                      "means.", default=True)
    format: str = _h("'parquet' (shards with image PNG bytes, index, seed, latent, sampler, label, "
                     "model_version) or 'png' (one PNG per galaxy, named by index).", default="parquet")
    num_workers: int = _h("Actors generating shards in parallel (each holds one model).", default=1)
    use_gpu: bool = _h("Give each actor a GPU and decode on it.", default=False)
    shard_size: int = _h(f"Galaxies per shard: a multiple of {SEED_BLOCK} or a divisor of it (the "
                         "unit of work and of resuming).", default=1024)
    label: str | None = _h("Only galaxies of this class (a model whose sampler was fitted with --labels; "
                           "docs/generate.md, \"Conditional generation\"); default: any class.", default=None)
    where: str | None = _h("Only from training galaxies whose properties satisfy this, e.g. 'r50_px >= 6 and "
                           "ellipticity > 0.5' (docs/properties.md); default: any.", default=None)
    match: str | None = _h("Targets table (CSV or Parquet, local or s3://) with columns named like the properties: "
                           "one galaxy per row, drawn near the training galaxies nearest to the row's values, "
                           "with requested and measured properties in its row (docs/properties.md).", default=None)
    match_k: int = _h("With --match: each row draws among this many nearest training galaxies (1: always the "
                      "nearest, a near-copy of it).", default=MATCH_K)
    match_tries: int = _h("With --match: draws made and measured per row, the one nearest to the request "
                          "kept (1: the first draw; each try costs a decode and a measurement).", default=MATCH_TRIES)

    def __post_init__(self) -> None:
        for key in ("model", "out"):
            if not getattr(self, key):
                raise ConfigError(f"--{key} is required")
        if self.n is not None and self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")
        if self.match_k < 1 or self.match_tries < 1:
            raise ConfigError(f"match_k and match_tries must be >= 1, got {self.match_k} and {self.match_tries}")
        if self.match and self.format != "parquet":
            raise ConfigError("--match writes each galaxy's requested and measured properties next to it: use "
                              "--format parquet")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.format not in FORMATS:
            raise ConfigError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.num_workers < 1:
            raise ConfigError(f"num_workers must be >= 1, got {self.num_workers}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be a positive number, got {self.temperature}")
        m = self.shard_size
        if m < 1 or (m % SEED_BLOCK and SEED_BLOCK % m):
            raise ConfigError(f"shard_size must be a multiple of {SEED_BLOCK} or a divisor of it "
                              f"(e.g. 128, 256, 1024), got {m}")


@dataclass(frozen=True)
class Plan:
    """What every actor needs, fixed once in the driver (the sampler resolved, paths absolute)."""

    model: str
    version: str
    out: str
    n: int
    seed: int
    sampler: str
    temperature: float
    detail: bool
    format: str
    shard_size: int
    label: str | None = None
    where: str | None = None
    targets: Targets | None = None  # --match: row i is galaxy i's request
    match_k: int = MATCH_K
    match_tries: int = MATCH_TRIES

    @property
    def shards(self) -> int:
        return -(-self.n // self.shard_size)

    def shard_range(self, k: int) -> range:
        """The indices of shard ``k``."""
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.n))

    def settings(self) -> dict[str, Any]:
        """What the galaxies in ``out`` are: files written under other settings differ."""
        out = {"catalogue_format": CATALOGUE_FORMAT, "model_version": self.version, "sampler": self.sampler,
               "seed": self.seed, "temperature": self.temperature, "detail": self.detail,
               "label": self.label, "where": self.where, "format": self.format, "shard_size": self.shard_size}
        if self.targets is not None:  # the table by its bytes: a resume must be asked the same
            out["match"] = {"sha256": self.targets.sha256, "columns": list(self.targets.names), "k": self.match_k,
                            "tries": self.match_tries}
        return out

    @property
    def columns(self) -> list[str]:
        """The Parquet columns of its rows."""
        if self.targets is None:
            return list(COLUMNS)
        return [*COLUMNS, *(f"requested_{p}" for p in self.targets.names), *MEASURED_COLUMNS]


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.parquet"


def png_name(i: int) -> str:
    return f"{i:0{PNG_DIGITS}d}.png"


# --------------------------------------------------------------------------- one shard


def _matched(gen: Generator, plan: Plan, indices: range) -> tuple[np.ndarray, list[bytes], dict[str, pa.Array]]:
    """--match: the codes, PNGs and property columns of rows ``indices`` of the targets, each the
    best of ``plan.match_tries`` measured draws. The images are measured as the training galaxies
    were, one process per actor (it holds 1 CPU)."""
    z, images, measured = gen.matched_images(plan.targets, len(indices), plan.seed, indices.start, plan.match_k,
                                             plan.temperature, plan.sampler, plan.label, plan.where, plan.detail,
                                             plan.match_tries, workers=1)
    columns = {f"requested_{p}": pa.array(plan.targets.values[indices.start:indices.stop, j])
               for j, p in enumerate(plan.targets.names)}
    columns.update({f"measured_{p}": pa.array(measured[p]) for p in PROPERTY_NAMES})
    return z.numpy().astype(np.float32), [png_bytes(img) for img in images], columns


def _drawn(gen: Generator, plan: Plan, indices: range, detail_seed: int | None) -> tuple[np.ndarray, list[bytes]]:
    """The codes and PNGs of galaxies ``indices``, drawn and decoded a seed block at a time, as
    ``Generator.images`` does, so the bytes are the same."""
    latents, pngs = [], []
    start = indices.start
    while start < indices.stop:
        k = min(indices.stop - start, SEED_BLOCK - start % SEED_BLOCK)
        z = gen.latents(k, plan.seed, plan.sampler, plan.temperature, start=start, label=plan.label,
                        where=plan.where)
        pngs += [png_bytes(img) for img in gen.decode_uint8(z, detail_seed, offset=start)]
        latents.append(z.numpy().astype(np.float32))
        start += k
    return np.concatenate(latents), pngs


def catalogue_rows(gen: Generator, plan: Plan, indices: range) -> pa.Table:
    """The catalogue's rows for ``indices`` (columns ``plan.columns``)."""
    if plan.targets is None:
        (z, pngs), extra = _drawn(gen, plan, indices, gen.detail_seed(plan.sampler, plan.detail, plan.seed)), {}
    else:
        z, pngs, extra = _matched(gen, plan, indices)
    rows, dim = z.shape
    offsets = pa.array(np.arange(0, rows * dim + 1, dim, dtype=np.int32))
    return pa.table({
        "image": pa.array(pngs, pa.binary()),
        "index": pa.array(np.asarray(indices, dtype=np.int64)),
        "seed": pa.array(np.full(rows, plan.seed, dtype=np.int64)),
        "latent": pa.ListArray.from_arrays(offsets, pa.array(z.ravel())),
        "sampler": pa.array([plan.sampler] * rows, pa.string()),
        "label": pa.array([plan.label] * rows, pa.string()),
        "model_version": pa.array([plan.version] * rows, pa.string()),
        **extra,
    })


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that ``path`` never shows part of it: in place where objects appear
    only once complete (S3), else to a temporary name in the same folder, then renamed."""
    if fs.type_name in ATOMIC_ON_CLOSE:
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    folder, name = path.rsplit("/", 1)
    tmp = f"{folder}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def write_shard(gen: Generator, plan: Plan, k: int) -> int:
    """Generate and write shard ``k`` of the catalogue; returns its number of galaxies."""
    fs, root = resolve(plan.out)
    table = catalogue_rows(gen, plan, plan.shard_range(k))
    if plan.format == "png":
        for i, data in zip(table.column("index").to_pylist(), table.column("image").to_pylist()):
            write_atomic(fs, join(root, png_name(i)), data)
    else:
        sink = pa.BufferOutputStream()
        # PNG bytes do not compress: only the small columns are worth zstd's time.
        pq.write_table(table, sink, compression={c: "zstd" if c != "image" else "none" for c in table.column_names},
                       use_dictionary=["sampler", "label", "model_version"])
        write_atomic(fs, join(root, SHARDS_DIR, shard_name(k)), sink.getvalue().to_pybytes())
    return table.num_rows


class ShardWriter:
    """Ray Data actor: one Generator, loaded once, writing the shards of the rows it gets."""

    def __init__(self, plan: Plan, device: str) -> None:
        self.plan = plan
        self.gen = Generator.load(plan.model, device=device)
        if self.gen.version != plan.version:  # the model directory was replaced mid-run
            raise CatalogueError(f"{plan.model} changed during the run: version {self.gen.version}, "
                                 f"the catalogue started with {plan.version}")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        counts = [write_shard(self.gen, self.plan, int(k)) for k in batch["shard"]]
        return {"shard": batch["shard"], "galaxies": np.asarray(counts, dtype=np.int64)}


# --------------------------------------------------------------------------- the output folder


def _files(fs: pafs.FileSystem, folder: str) -> set[str]:
    """Names of the files directly in ``folder`` (none when it does not exist)."""
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return {i.base_name for i in infos if i.type == pafs.FileType.File}


def _shard_folder(plan: Plan) -> str:
    return join(resolve(plan.out)[1], SHARDS_DIR) if plan.format == "parquet" else resolve(plan.out)[1]


def complete_shards(plan: Plan) -> set[int]:
    """The shards of ``plan`` whose files are all in ``out`` (each file is written atomically,
    so a file that is there is whole)."""
    fs = resolve(plan.out)[0]
    names = _files(fs, _shard_folder(plan))
    if plan.format == "parquet":
        return {k for k in range(plan.shards) if shard_name(k) in names}
    return {k for k in range(plan.shards) if all(png_name(i) in names for i in plan.shard_range(k))}


def _stale_files(plan: Plan, old_n: int) -> list[str]:
    """Files that a run of another ``n`` left and this one must not keep: the shards whose
    length differs (the old and the new last shard) and those past the new end."""
    if old_n == plan.n:
        return []
    if plan.format == "png":  # a PNG does not depend on n: only those past the end go
        return [png_name(i) for i in range(plan.n, old_n)]
    m = plan.shard_size
    partial = {(old_n - 1) // m, (plan.n - 1) // m}
    return [shard_name(k) for k in sorted(partial | set(range(plan.shards, -(-old_n // m))))]


def start_output(plan: Plan) -> None:
    """Mark ``out`` unfinished (no manifest) and check or record its settings; files of an
    earlier run of another ``n`` that do not fit this one are removed."""
    fs, root = resolve(plan.out)
    folder = _shard_folder(plan)
    if fs.type_name not in ATOMIC_ON_CLOSE:  # object stores have no folders to make (only markers)
        fs.create_dir(folder, recursive=True)
    settings_path = join(root, SETTINGS)
    wanted = plan.settings()
    old_n = plan.n
    if fs.get_file_info(settings_path).type == pafs.FileType.File:
        with fs.open_input_stream(settings_path) as f:
            found = json.loads(f.read())
        old_n = int(found.pop("n", plan.n))
        diff = [f"{k} {found.get(k)!r} there, {v!r} now" for k, v in wanted.items() if found.get(k) != v]
        if diff:
            raise CatalogueError(f"{plan.out} holds galaxies of other settings ({'; '.join(diff)}): "
                                 "use another --out or delete it")
    if fs.get_file_info(join(root, MANIFEST)).type == pafs.FileType.File:
        fs.delete_file(join(root, MANIFEST))
    present = _files(fs, folder)
    for name in _stale_files(plan, old_n):
        if name in present:
            fs.delete_file(join(folder, name))
    if fs.type_name not in ATOMIC_ON_CLOSE:  # temporary files of a run that was killed
        for name in present:
            if name.startswith(".") and name.endswith(".tmp"):
                fs.delete_file(join(folder, name))
    write_atomic(fs, settings_path, json.dumps({**wanted, "n": plan.n}, indent=1).encode())


def manifest(plan: Plan, gen: Generator) -> dict[str, Any]:
    """The manifest of a finished catalogue (no timings: the same command writes the same bytes)."""
    cfg = gen.model_config
    out = {"n": plan.n, "model": plan.model, "image_size": cfg.image_size, "latent_dim": cfg.latent_dim,
           **plan.settings()}
    if plan.format == "parquet":
        out["columns"] = plan.columns
        if plan.targets is not None:
            out["match_source"] = plan.targets.source
        out["shards"] = [{"path": f"{SHARDS_DIR}/{shard_name(k)}", "start": r.start, "count": len(r)}
                         for k in range(plan.shards) for r in [plan.shard_range(k)]]
    else:
        out["png_name"] = f"{{index:0{PNG_DIGITS}d}}.png"
        out["shards"] = [{"start": r.start, "count": len(r)} for r in map(plan.shard_range, range(plan.shards))]
    return out


# --------------------------------------------------------------------------- the job


def check_gpus(use_gpu: bool) -> None:
    """With ``use_gpu``, fail when no GPU can come: a Ray this job started (no RAY_ADDRESS) has
    none. A cluster with none right now may autoscale GPU nodes from zero, so it is only said."""
    if not use_gpu or ray.cluster_resources().get("GPU", 0) >= 1:
        return
    if not os.environ.get("RAY_ADDRESS"):
        raise CatalogueError("--use-gpu was given but the local Ray has no GPU")
    log("no GPU in the cluster right now: the actors wait until an autoscaler adds one")


def run_shards(plan: Plan, todo: list[int], cfg: CatalogueConfig) -> None:
    """Generate the shards ``todo`` with a pool of ``num_workers`` actors; one progress line per
    finished shard, at most every :data:`PROGRESS_SECONDS`."""
    resources = {"num_gpus": 1} if cfg.use_gpu else {}
    ds = ray.data.from_items([{"shard": k} for k in todo], override_num_blocks=len(todo))
    # max_restarts=0: a restartable actor makes Ray 2.60 log an error line at start (its
    # constructor arguments live in the object store, ray#53727), and a failed run resumes
    # anyway. Ray 2.60 has no named parameter for it and warns about the remote-args form.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map_batches(ShardWriter, fn_constructor_args=(plan, "cuda" if cfg.use_gpu else "cpu"),
                            batch_size=1, batch_format="numpy", num_cpus=1, max_restarts=0,
                            compute=ray.data.ActorPoolStrategy(size=min(cfg.num_workers, len(todo))),
                            **resources)
    total = sum(len(plan.shard_range(k)) for k in todo)
    t0 = last = time.time()
    done = shards = 0
    for row in ds.iter_rows():
        done += int(row["galaxies"])
        shards += 1
        now = time.time()
        if now - last >= PROGRESS_SECONDS or shards == len(todo):
            rate = done / max(now - t0, 1e-9)
            log(f"shard {shards}/{len(todo)}: {done}/{total} galaxies, {rate:.0f} galaxies/s, "
                f"ETA {fmt_seconds((total - done) / rate)}")
            last = now


def _targets(cfg: CatalogueConfig, gen: Generator) -> Targets | None:
    """The --match table, read and checked against the model (MatchError says what is wrong)."""
    if not cfg.match:
        return None
    targets = read_targets(cfg.match)
    if cfg.n is not None and cfg.n != len(targets):
        raise CatalogueError(f"--n {cfg.n}, but {cfg.match} has {len(targets)} rows: with --match the catalogue has "
                             "one galaxy per row; leave --n out")
    gen.matched_latents(targets, 1, cfg.seed, 0, cfg.match_k, cfg.temperature, cfg.sampler, cfg.label, cfg.where)
    return targets


def plan_of(cfg: CatalogueConfig) -> tuple[Plan, Generator]:
    """Read the model directory's metadata (no weights) and fix the plan; a missing sampler or a
    bad model directory fails here, before any actor starts."""
    model = absolute(cfg.model)
    gen = Generator.load(model, weights=False)
    # Raises when the sampler is unusable, the label unknown (LabelError lists the valid ones),
    # the selection bad or too narrow (WhereError) or the targets unusable (MatchError).
    gen.latents(1, cfg.seed, cfg.sampler, cfg.temperature, label=cfg.label, where=cfg.where)
    targets = _targets(cfg, gen)
    sampler = gen.resolve(cfg.sampler)
    detail = gen.detail_seed(sampler, cfg.detail, cfg.seed) is not None
    n = len(targets) if targets is not None else cfg.n or DEFAULT_N
    plan = Plan(model=model, version=gen.version, out=absolute(cfg.out), n=n, seed=cfg.seed,
                sampler=sampler, temperature=float(cfg.temperature), detail=detail,
                format=cfg.format, shard_size=cfg.shard_size, label=cfg.label, where=cfg.where,
                targets=targets, match_k=cfg.match_k, match_tries=cfg.match_tries)
    return plan, gen


def _matching(plan: Plan) -> str:
    if plan.targets is None:
        return ""
    return (f", one per row of {plan.targets.source} matching {', '.join(plan.targets.names)}, "
            f"k {plan.match_k}, best of {plan.match_tries}")


def generate_catalogue(cfg: CatalogueConfig) -> dict[str, Any]:
    """Write (or finish) the catalogue of ``cfg``; returns its manifest."""
    t0 = time.time()
    plan, gen = plan_of(cfg)  # a bad model directory fails before Ray starts
    ensure_ray()
    check_gpus(cfg.use_gpu)
    start_output(plan)
    todo = sorted(set(range(plan.shards)) - complete_shards(plan))
    log(f"catalogue of {plan.n} galaxies from {cfg.model} (version {plan.version}, sampler {plan.sampler}, "
        f"seed {plan.seed}{f', label {plan.label}' if plan.label else ''}{f', where {plan.where}' if plan.where else ''}"
        f"{_matching(plan)}) "
        f"-> {cfg.out}: {plan.shards} shard(s) of {plan.shard_size}, "
        f"{plan.shards - len(todo)} already written, {len(todo)} to generate")
    if todo:
        run_shards(plan, todo, cfg)
    out = manifest(plan, gen)
    fs, root = resolve(plan.out)
    write_atomic(fs, join(root, MANIFEST), json.dumps(out, indent=1).encode())
    made = sum(len(plan.shard_range(k)) for k in todo)
    secs = time.time() - t0
    log(f"wrote {plan.n} galaxies ({made} generated in {len(todo)} shard(s)) to {cfg.out} as {plan.format} "
        f"in {fmt_seconds(secs)} ({made / max(secs, 1e-9):.0f} galaxies/s)")
    return out
