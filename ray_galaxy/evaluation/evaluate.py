"""One evaluation of a trained model directory, step by step (``jobs/evaluate.py``).

Writes ``<out>/report.md``, ``<out>/metrics.json`` and the PNG figures the report links.
Everything runs in this process on the CPU (no Ray): images are read and decoded directly.
Generated galaxies come from the model's :class:`Generator`, so they are the same bytes that
``jobs/sample.py`` and Serve give for the same (sampler, seed).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ray_galaxy import morphology
from ray_galaxy.checkpoint import ModelDirError
from ray_galaxy.config import ConfigError
from ray_galaxy.console import fmt_seconds, log
from ray_galaxy.data import DataError
from ray_galaxy.evaluation import classes, distances, properties, realism, sharpness
from ray_galaxy.evaluation.config import EvaluateConfig
from ray_galaxy.evaluation.metrics import (clean, likelihood_bounds, memorisation, morphology_scores,
                                           nearest_training_images, power_spectrum, reconstruct,
                                           reconstruction_scores, sharpness_scores)
from ray_galaxy.evaluation.report import (Figures, fmt, morphology_chart, power_spectrum_chart, report_markdown,
                                          side_by_side_chart, training_curves_chart)
from ray_galaxy.evaluation.tracked import record_evaluation
from ray_galaxy.figures import traversal_figure
from ray_galaxy.generation.fit import fit_sampler
from ray_galaxy.generation.generator import Generator
from ray_galaxy.generation.latents import slerp
from ray_galaxy.generation.sampler import SAMPLER_FILE, SAMPLER_META, SamplerError
from ray_galaxy.images import grid, luminance, pairs, power_deficit_dex, radial_power_spectrum
from ray_galaxy.imageset import read_image_set, recorded_train_data, same_source
from ray_galaxy.labels import LabelTable
from ray_galaxy.storage import exists, join


@dataclass
class Inputs:
    """The real images of an evaluation: held-out, and training when they can be found."""

    real: np.ndarray
    real_info: dict[str, Any]
    crop: float
    train: np.ndarray | None = None
    train_info: dict[str, Any] | None = None
    train_uri: str | None = None
    skip_reason: str | None = None
    labels_source: str | None = None  # the labels CSV read, if any
    real_labels: list[str | None] | None = None  # per held-out image, None when nothing is labelled
    train_labels: list[str | None] | None = None


# --------------------------------------------------------------------------- steps


def choose_sampler(cfg: EvaluateConfig, gen: Generator) -> EvaluateConfig:
    """Resolve 'auto' and fail fast, before any data is read, on a missing or stale sampler
    that is not going to be fitted here."""
    if cfg.sampler == "auto":
        cfg = dataclasses.replace(cfg, sampler="gmm" if cfg.fit_sampler else gen.resolve("auto"))
        log(f"sampler: {cfg.sampler} (auto)")
    if cfg.sampler == "gmm" and gen.sampler is None and not cfg.fit_sampler:
        if not exists(join(gen.uri, SAMPLER_META)):
            raise SamplerError(f"{gen.uri} has no {SAMPLER_FILE}; pass --fit-sampler to fit one now, or run "
                               f"`python jobs/fit_sampler.py --model {gen.uri}`")
        raise SamplerError(gen.sampler_problem or f"{gen.uri}: unusable {SAMPLER_FILE}")
    return cfg


def load_inputs(cfg: EvaluateConfig, gen: Generator, table: LabelTable | None = None) -> Inputs:
    """Held-out images (the validation split when they are the model's own training source) and
    the training images (its training split) unless they are unavailable or turned off; with
    their classes from ``table`` (or prepared shards) for the classes check."""
    tcfg = gen.model_dir.train_config
    size, crop = gen.model_config.image_size, cfg.crop or float(tcfg.get("crop", 1.0))
    val_fraction = float(tcfg.get("val_fraction", 0.1))

    def split_of(uri: str, own: str) -> str | None:
        return own if tcfg.get("data") and same_source(uri, tcfg["data"]) else None

    found = read_image_set(cfg.data, size, crop, cfg.max_images, split_of(cfg.data, "val"), val_fraction, cfg.seed)
    log(f"held-out: {len(found.images)} images from {cfg.data} ({found.info['split']}), {size}px, crop {crop}")
    inputs = Inputs(found.images, found.info, crop, real_labels=classes.image_labels(found, table),
                    labels_source=table.source if table else found.info.get("labels_source"))
    inputs.train_uri = None if cfg.train_data == "none" else (cfg.train_data or recorded_train_data(tcfg))
    if inputs.train_uri:
        found = read_image_set(inputs.train_uri, size, crop, cfg.max_train, split_of(inputs.train_uri, "train"),
                               val_fraction, cfg.seed)
        inputs.train, inputs.train_info = found.images, found.info
        inputs.train_labels = classes.image_labels(found, table)
        log(f"training set: {len(inputs.train)} images from {inputs.train_uri} ({inputs.train_info['split']})")
    else:
        inputs.skip_reason = ("skipped (--train-data none)" if cfg.train_data == "none" else
                              "skipped: the model's training data is not readable here; pass --train-data")
        log(f"memorisation check {inputs.skip_reason}")
    return inputs


def ensure_sampler(cfg: EvaluateConfig, gen: Generator, inputs: Inputs) -> Generator:
    """With ``--sampler gmm`` and no usable sampler: fit one to the training images already
    read (``--fit-sampler``; per label when they have classes), store it in the model directory
    and reload the generator."""
    if cfg.sampler != "gmm" or gen.sampler is not None:
        return gen
    if inputs.train is None:
        raise SamplerError("--fit-sampler needs the training images; pass --train-data")
    labelled = inputs.train_labels is not None  # then per label, as jobs/fit_sampler.py would
    meta = fit_sampler(cfg.model, inputs.train_uri, cfg.gmm_components, cfg.gmm_covariance, cfg.seed,
                       inputs.crop, images=inputs.train, batch_size=cfg.batch_size, bandwidth=cfg.gmm_bandwidth,
                       labels=inputs.labels_source if labelled else None, image_labels=inputs.train_labels)
    log(f"fitted a {meta['components']}-component {meta['covariance']} GMM sampler "
        f"({meta['iterations']} EM iterations) and stored it in {gen.uri}")
    return Generator.load(cfg.model)


def score_real(cfg: EvaluateConfig, gen: Generator, real: np.ndarray) -> tuple[dict, dict, np.ndarray]:
    """Likelihood bounds and reconstruction scores on the held-out images; also the reconstructions."""
    model = gen.model.eval()
    lik = likelihood_bounds(model, real, cfg.iwae_k, cfg.seed, cfg.batch_size)
    log(f"likelihood: -ELBO {lik['elbo_bpd']:.4f} bits/dim, IWAE-{cfg.iwae_k} {lik['iwae_bpd']:.4f} bits/dim")
    recon = reconstruct(model, real, cfg.batch_size)
    rec = reconstruction_scores(real, recon)
    log(f"reconstruction: PSNR {rec['psnr']:.2f} dB, SSIM {rec['ssim']:.3f}")
    return lik, rec, recon


def generate(cfg: EvaluateConfig, gen: Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """(generated images, the same codes' decoder means or None): draws from p(x | z) when the
    sampler has a residual detail model and ``--detail``, else the means themselves."""
    images = gen.images(cfg.n, cfg.seed, cfg.sampler, cfg.temperature, detail=cfg.detail)
    if gen.detail_seed(cfg.sampler, cfg.detail, cfg.seed) is None:
        return images, None
    return images, gen.images(cfg.n, cfg.seed, cfg.sampler, cfg.temperature, detail=False)


def score_means(cfg: EvaluateConfig, means: np.ndarray, inputs: Inputs, m_real: dict[str, np.ndarray],
                m_means: dict[str, np.ndarray]) -> dict[str, Any]:
    """The decoder means' own morphology, sharpness and memorisation: what the detail adds.
    (Per-statistic morphology distances and high-pass sharpness of the means sit next to the
    samples' in the morphology and sharpness sections.)"""
    real = inputs.real
    table = distances.wasserstein_table(m_real, m_means, cfg.seed)
    k, p_real = radial_power_spectrum(luminance(real))
    out = {"morphology_mean_distance": distances.mean_distance(v["distance"] for v in table.values()),
           "power_deficit_dex": power_deficit_dex(k, power_spectrum(means), p_real, real.shape[1]),
           "memorisation_ratio": (memorisation(means, real, inputs.train)["ratio"]
                                  if inputs.train is not None else None)}
    log(f"decoder means alone: morphology {out['morphology_mean_distance']:.3f}, structure-band "
        f"power {out['power_deficit_dex']:+.3f} dex")
    return out


def score_generated(cfg: EvaluateConfig, generated: np.ndarray, means: np.ndarray | None, recon: np.ndarray,
                    inputs: Inputs, m: dict[str, dict[str, np.ndarray] | None]) -> tuple[dict, dict, dict]:
    """Morphology, sharpness and memorisation of the generated images (and of their decoder
    means, when given: ``m`` holds the real, generated and means morphology)."""
    morph = morphology_scores(m["real"], m["generated"], cfg.seed, m["means"])
    log(f"morphology: mean normalised distance {morph['mean_distance']:.3f} (floor {morph['mean_floor']:.3f})")
    sharp = sharpness_scores(inputs.real, generated, recon, cfg.seed)
    hp = sharpness.scores({"real": sharpness.measure_all(inputs.real), "generated": sharpness.measure_all(generated),
                           "means": sharpness.measure_all(means) if means is not None else None}, cfg.seed)
    sharp["highpass"] = hp
    log(f"sharpness: structure-band power {sharp['power_deficit_dex']:+.3f} dex vs real; high-pass median "
        f"real {fmt(hp['median']['real'], 4)}, generated {fmt(hp['median']['generated'], 4)} "
        f"(W/sd {fmt(hp['distance']['generated'])})")
    if inputs.train is not None:
        mem = memorisation(generated, inputs.real, inputs.train, recon)
        log(f"memorisation: NN distance ratio {mem['ratio']:.3f}")
    else:
        mem = {"ratio": None, "skipped": inputs.skip_reason}
    return morph, sharp, mem


def score_realism(cfg: EvaluateConfig, figs: Figures, real: np.ndarray, generated: np.ndarray,
                  means: np.ndarray | None) -> dict[str, Any] | None:
    """The realism test (:mod:`ray_galaxy.evaluation.realism`) and its figure: the generated images
    the classifier is surest are fake beside the real ones it is surest are real."""
    if not cfg.realism:
        return None
    reason = realism.too_few_images(len(real), len(generated), cfg.realism_folds)
    if reason:
        log(f"realism: skipped: {reason}")
        return {"skipped": reason}
    scores, test = realism.realism_scores(real, generated, means, cfg.seed, cfg.realism_folds, cfg.realism_steps)
    fake, p_fake, true, p_true = realism.surest(real, generated, test)
    figs.chart("realism_surest.png", side_by_side_chart(
        [(f"generated, surest fake (p generated {p_fake.min():.2f}-{p_fake.max():.2f})", fake),
         (f"real, surest real (p generated {p_true.min():.2f}-{p_true.max():.2f})", true)]),
        "Realism: what gives samples away",
        f"The {len(fake)} generated images the realism test's classifier is surest are generated, above the "
        f"{len(true)} real held-out images it is surest are real (each judged, after {test.steps[-1]} steps, by "
        "the fold's CNN that did not train on it).")
    return scores


# --------------------------------------------------------------------------- figures


def sample_figures(figs: Figures, cfg: EvaluateConfig, gen: Generator, real: np.ndarray, generated: np.ndarray,
                   means: np.ndarray | None, kl_per_dim: list[float]) -> None:
    """Samples (and their means) alone and beside real galaxies, the latent traversal and slerp
    interpolations."""
    figs.image("samples.png", grid(generated[:64]), "Samples",
               f"64 generated galaxies ({cfg.sampler} sampler{' with residual detail' if means is not None else ''}, "
               f"seed {cfg.seed}, temperature {cfg.temperature}).")
    if means is not None:
        figs.image("samples_means.png", grid(means[:64]), "Samples: decoder means",
                   "The same 64 latent codes decoded to their means, without the residual detail.")
    figs.chart("side_by_side.png", side_by_side_chart([("real held-out galaxies", real), ("samples", generated),
                                                        ("decoder means of the same codes", means)]),
               "Real and generated, side by side",
               "The same size and scale: held-out galaxies, samples, and the samples' decoder means (no "
               "residual detail). Look at cores, edges and the sky.")
    trav = traversal_figure(gen, kl_per_dim)
    if trav is not None:
        (d0, d1) = trav[1]
        figs.image("traversal.png", trav[0], "Latent traversal",
                   f"Latent dims {d0} (down) and {d1} (across), the two that vary most over the training codes, "
                   "swept over +-2.5 standard deviations around the sampler's mean code." if gen.sampler is not None
                   else f"Latent dims {d0} (down) and {d1} (across), the two with most KL on the held-out "
                   "set, swept over -3..3 with the others at 0.")
    z = gen.latents(12, cfg.seed + 1, cfg.sampler, cfg.temperature)
    path = torch.cat([slerp(z[2 * i], z[2 * i + 1], 10) for i in range(6)])
    figs.image("interpolations.png", grid(gen.decode_uint8(path), ncols=10), "Interpolations",
               "Each row: spherical interpolation (slerp) between two sampled latents, 10 steps.")


def data_figures(figs: Figures, gen: Generator, inputs: Inputs, recon: np.ndarray, generated: np.ndarray,
                 mem: dict[str, Any], charts: dict[str, bytes]) -> None:
    """Reconstructions, nearest training images and the charts."""
    nshow = min(12, len(inputs.real))
    figs.image("reconstructions.png", pairs(inputs.real[:nshow], recon[:nshow]), "Reconstructions",
               "Top: held-out galaxies; bottom: their posterior-mean reconstructions.")
    if inputs.train is not None:
        nn = min(12, len(generated))
        figs.image("nearest_neighbours.png", pairs(generated[:nn], nearest_training_images(inputs.train, mem, nn)),
                   "Nearest training images",
                   "Top: generated galaxies; bottom: the nearest training image (pixel L2, any of 8 orientations).")
    figs.chart("morphology.png", charts["morphology"], "Morphology",
               "Distributions of each statistic; W/sd is the normalised Wasserstein distance.")
    band = charts["band"]
    figs.chart("power_spectrum.png", charts["power_spectrum"], "Power spectrum",
               f"Shaded: the structure band {band[0]:g}-{band[1]:g} cycles/image where the "
               "deficit is measured; higher frequencies are sensor noise.")
    history = gen.model_dir.metrics.get("history") or []
    if history:
        figs.chart("training_curves.png", training_curves_chart(history), "Training curves",
                   "Per-epoch history from metrics.json (loss uses the configured KL weight and warm-up).")


# --------------------------------------------------------------------------- the whole evaluation


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Run every metric, write figures, metrics.json and report.md under ``cfg.out``."""
    t0 = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = Generator.load(cfg.model)
    cfg = choose_sampler(cfg, gen)
    inputs = load_inputs(cfg, gen, classes.read_table(classes.labels_uri(cfg.labels, gen), bool(cfg.labels)))
    gen = ensure_sampler(cfg, gen, inputs)
    lik, rec, recon = score_real(cfg, gen, inputs.real)
    generated, means = generate(cfg, gen)
    m_real_all, m_gen = morphology.measure_all(inputs.real, morphology.MEASURED), morphology.measure_all(generated)
    m_real = {s: m_real_all[s] for s in morphology.STATS}  # flux is a property, not a morphology distance
    m_means = morphology.measure_all(means) if means is not None else None
    means_only = score_means(cfg, means, inputs, m_real, m_means) if means is not None else None
    morph, sharp, mem = score_generated(cfg, generated, means, recon, inputs,
                                        {"real": m_real, "generated": m_gen, "means": m_means})
    by_class = classes.score_classes(cfg, gen, m_real, inputs.real_labels, inputs.train, inputs.train_labels,
                                     m_gen, inputs.labels_source)

    figs = Figures(out)
    real_vs_fake = score_realism(cfg, figs, inputs.real, generated, means)
    sample_figures(figs, cfg, gen, inputs.real, generated, means, lik["kl_per_dim"])
    charts = {"morphology": morphology_chart(m_real, m_gen, morph["distance"]),
              "power_spectrum": power_spectrum_chart(sharp), "band": sharp["band_cycles_per_image"]}
    data_figures(figs, gen, inputs, recon, generated, mem, charts)
    to_order = properties.score_properties(cfg, gen, figs, m_real_all, m_gen)

    metrics = clean({
        "format": 1, "model": cfg.model, "data": cfg.data, "held_out": inputs.real_info,
        "train_data": inputs.train_uri, "train": inputs.train_info, "crop": inputs.crop,
        "image_size": gen.model_config.image_size, "likelihood_kind": gen.model_config.likelihood,
        "sampler": cfg.sampler, "sampler_meta": gen.sampler.meta if cfg.sampler == "gmm" else None,
        "detail": means is not None, "means_only": means_only,
        "n_generated": int(len(generated)), "seed": cfg.seed, "temperature": cfg.temperature,
        "likelihood": lik, "reconstruction": rec, "morphology": morph, "sharpness": sharp,
        "memorisation": mem, "classes": by_class, "properties": to_order,
        "realism": real_vs_fake, "figures": figs.names, "config": cfg.to_dict(),
        "seconds": round(time.time() - t0, 1),
    })
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out / "report.md").write_text(report_markdown(metrics, figs.files))
    log(f"wrote {out / 'report.md'} in {fmt_seconds(metrics['seconds'])}")
    record_evaluation(cfg, gen.model_dir.metrics, metrics, out, figs.names)
    return metrics


def main_entry(cfg: EvaluateConfig) -> int:
    """Entry point for jobs/evaluate.py: run, print expected errors as one line, return an exit code."""
    try:
        evaluate(cfg)
    except (DataError, ModelDirError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
