"""Does what comes out match what was asked? The evaluation's check of galaxies to order.

By catalogue (``--match``, :mod:`ray_galaxy.generation.match`): every held-out galaxy with
:data:`REQUESTED` all measured is a request for its own values of them. For each request one
galaxy is generated (k nearest training galaxies, the request's seed, residual detail as the
evaluation's samples have it) and measured with :mod:`ray_galaxy.morphology`, like the training
galaxies. Per property: the median |measured - requested| in units of the held-out set's
robust spread (IQR / 1.349). Next to it the floor: the same for the *nearest other real
held-out galaxy* to each request (by the distance --match ranks training galaxies with), i.e.
how close a real galaxy from a set this size comes. The match draws from the far larger
training set but among k of them, and through the decoder: a ratio near 1 says the decoder
keeps what was asked.

By range (``--where``): per selection, the morphology distance (mean normalised Wasserstein
over the statistics, as the per-class table) between the real held-out galaxies that satisfy
it and the selection's samples, next to the unconditional samples' distance to the same
galaxies: selecting should bring it down. The selections: ``--where`` when given, else the
upper quartile of the training galaxies' size, ellipticity and colour, one at a time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from ray_galaxy import morphology
from ray_galaxy.console import log
from ray_galaxy.evaluation.classes import mean_distance, subset
from ray_galaxy.evaluation.config import EvaluateConfig
from ray_galaxy.evaluation.report import Figures, requested_measured_chart
from ray_galaxy.generation.generator import Generator
from ray_galaxy.generation.match import MatchError, nearest, targets_from_table
from ray_galaxy.generation.properties import MIN_MATCHES, PROPERTIES, robust_spread
from ray_galaxy.generation.where import WhereError, where_mask

REQUESTED = ("r50_px", "flux", "ellipticity", "colour")  # what a survey simulation asks for
MIN_REQUESTS = 20  # held-out galaxies with REQUESTED measured, below which the check is skipped
AUTO_WHERE = ("r50_px", "ellipticity", "colour")  # their upper quartile, one at a time
Stats = dict[str, np.ndarray]


def as_properties(stats: Stats) -> Stats:
    """{property name: values} of :func:`morphology.measure_all` output (statistic names)."""
    return {name: stats[stat] for name, (stat, _) in PROPERTIES.items()}


def skip_reason(cfg: EvaluateConfig, gen: Generator) -> str | None:
    """Why the check cannot run at all, None when it can."""
    if cfg.sampler != "gmm":
        return f"sampler {cfg.sampler!r} draws from no training galaxies (the check needs the fitted sampler)"
    problem = gen.sampler.property_problem()
    return f"{problem}; refit it: python jobs/fit_sampler.py --model {gen.uri}" if problem else None


def nearest_other(values: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """(n,) index of each row's nearest other row of ``values`` (n, P), by the spread-scaled
    Euclidean distance --match uses (:func:`~ray_galaxy.generation.match.nearest`)."""
    two = nearest(values, spread, np.ones(len(values), bool), values, 2)
    rows = np.arange(len(values))
    return np.where(two[:, 0] == rows, two[:, 1], two[:, 0])  # a row is its own nearest, unless tied


def by_catalogue(cfg: EvaluateConfig, gen: Generator, real: Stats) -> tuple[dict[str, Any], dict | None]:
    """(summary, points for the figure: per property requested, generated, nearest real):
    requested against measured for generated galaxies and for the nearest real ones (module
    docstring); the summary says why when too few held-out galaxies can be requests."""
    values = np.stack([real[p] for p in REQUESTED], axis=1)
    rows = np.flatnonzero(np.isfinite(values).all(axis=1))[:cfg.n]
    if len(rows) < MIN_REQUESTS:
        return {"skipped": f"{len(rows)} held-out galaxies have {', '.join(REQUESTED)} all measured, fewer than "
                           f"the {MIN_REQUESTS} requests the check needs"}, None
    requests = values[rows]
    targets = targets_from_table(pa.table({p: requests[:, j] for j, p in enumerate(REQUESTED)}), "held-out galaxies")
    _, _, made = gen.matched_images(targets, len(rows), cfg.seed, 0, cfg.match_k, cfg.temperature, cfg.sampler,
                                    detail=cfg.detail, tries=cfg.match_tries)
    train_spread = robust_spread(np.stack([gen.sampler.properties[p] for p in REQUESTED], axis=1))
    floor_values = requests[nearest_other(requests, train_spread)]
    spread = robust_spread(requests)  # the real set's: the unit every error is given in
    per = {}
    for j, p in enumerate(REQUESTED):
        got = made[p]
        err, floor = np.abs(got - requests[:, j]) / spread[j], np.abs(floor_values[:, j] - requests[:, j]) / spread[j]
        ok = np.isfinite(err)
        g, f = (float(np.median(err[ok])) if ok.any() else None), float(np.median(floor))
        per[p] = {"generated": g, "floor": f, "ratio": g / f if g is not None and f > 0 else None,
                  "real_spread": float(spread[j]), "failed": float(1 - ok.mean())}
    points = {p: (requests[:, j], made[p], floor_values[:, j]) for j, p in enumerate(REQUESTED)}
    return {"skipped": None, "requests": int(len(rows)), "k": cfg.match_k, "tries": cfg.match_tries,
            "per_property": per}, points


def selections(cfg: EvaluateConfig, gen: Generator) -> list[str]:
    """The --where selections checked: ``cfg.where``, else the training galaxies' upper quartile
    of each of :data:`AUTO_WHERE`."""
    if cfg.where:
        return [cfg.where]
    props = gen.sampler.properties
    return [f"{p} >= {float(np.nanpercentile(props[p], 75)):.4g}" for p in AUTO_WHERE]


def by_range(cfg: EvaluateConfig, gen: Generator, real_stats: Stats, real: Stats, uncond: Stats) -> list[dict]:
    """One row per selection (module docstring); a row says why when it cannot be measured."""
    out = []
    n = max(cfg.n // 2, 2)
    for where in selections(cfg, gen):
        row: dict[str, Any] = {"where": where, "samples": n}
        try:
            mask = where_mask(where, real)
            row["real"] = int(mask.sum())
            if mask.sum() < MIN_MATCHES:
                raise WhereError(f"{int(mask.sum())} held-out galaxies satisfy it, fewer than {MIN_MATCHES}")
            drawn = gen.images(n, cfg.seed, cfg.sampler, cfg.temperature, detail=cfg.detail, where=where)
        except WhereError as e:
            out.append({**row, "skipped": str(e)})
            continue
        real_sel = subset(real_stats, mask)
        d_sel, floor = mean_distance(real_sel, morphology.measure_all(drawn), cfg.seed)
        d_uncond, _ = mean_distance(real_sel, uncond, cfg.seed)
        out.append({**row, "skipped": None, "distance_selected": d_sel, "distance_unconditional": d_uncond,
                    "distance_floor": floor})
    return out


def score_properties(cfg: EvaluateConfig, gen: Generator, figs: Figures, m_real: Stats,
                     m_uncond: Stats) -> dict[str, Any] | None:
    """The whole check as metrics.json's "properties" section, and its figure: None when turned
    off, {"skipped": why} when it cannot run. ``m_real`` holds :data:`morphology.MEASURED` of
    the held-out images, ``m_uncond`` the statistics of the unconditional samples."""
    if not cfg.properties:
        return None
    reason = skip_reason(cfg, gen)
    if reason:
        log(f"properties: skipped: {reason}")
        return {"skipped": reason}
    real = as_properties(m_real)
    try:
        match, points = by_catalogue(cfg, gen, real)
    except MatchError as e:
        match, points = {"skipped": str(e)}, None
    if points is not None:
        figs.chart("requested_vs_measured.png", requested_measured_chart(points, match["per_property"]),
                   "Requested against measured",
                   f"Each of {match['requests']} held-out galaxies' {', '.join(REQUESTED)} requested (x) against those "
                   f"measured on the galaxy generated for it (k = {match['k']} nearest training galaxies, best of "
                   f"{match['tries']} draws) and on the "
                   "nearest other real held-out galaxy (the floor). On the diagonal: as asked.")
    stats = {s: m_real[s] for s in morphology.STATS}
    out = {"skipped": None, "requested": list(REQUESTED), "match": match,
           "where": by_range(cfg, gen, stats, real, m_uncond)}
    _log(out)
    return out


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _log(out: dict[str, Any]) -> None:
    match = out["match"]
    if match.get("skipped"):
        log(f"properties: by catalogue: skipped: {match['skipped']}")
    else:
        log(f"properties: {match['requests']} requests, median |error| / spread, generated (nearest real): " + ", ".join(
            f"{p} {_fmt(v['generated'])} ({_fmt(v['floor'])})" for p, v in match["per_property"].items()))
    for r in out["where"]:
        log(f"properties: where {r['where']!r}: " + (f"skipped: {r['skipped']}" if r["skipped"] else
            f"W/sd to the {r['real']} matching held-out galaxies {_fmt(r['distance_selected'])} selected, "
            f"{_fmt(r['distance_unconditional'])} unconditional (floor {_fmt(r['distance_floor'])})"))
