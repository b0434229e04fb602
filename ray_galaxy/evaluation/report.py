"""The evaluation's report: its charts (matplotlib, :mod:`ray_galaxy.plots`), the figure files
it links, and report.md itself."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from ray_galaxy import plots
from ray_galaxy.evaluation.sharpness import SETS
from ray_galaxy.images import grid, png_bytes
from ray_galaxy.morphology import LABELS, STATS

# --------------------------------------------------------------------------- figure files


@dataclass
class Figures:
    """The PNG files of a report, in the order it shows them: (file, title, caption)."""

    out: Path
    files: list[tuple[str, str, str]] = field(default_factory=list)

    def image(self, name: str, image: np.ndarray, title: str, caption: str) -> None:
        """Write an (H, W, 3) uint8 mosaic as ``name``."""
        self.chart(name, png_bytes(image), title, caption)

    def chart(self, name: str, png: bytes, title: str, caption: str) -> None:
        """Write encoded PNG bytes as ``name``."""
        (self.out / name).write_bytes(png)
        self.files.append((name, title, caption))

    @property
    def names(self) -> list[str]:
        return [f[0] for f in self.files]


# --------------------------------------------------------------------------- charts


def morphology_chart(m_real: dict[str, np.ndarray], m_gen: dict[str, np.ndarray],
                     distance: dict[str, float]) -> bytes:
    """One histogram panel per morphology statistic, held-out (real) vs generated, as PNG."""
    ncols = 4
    fig, axes = plots.figure(math.ceil(len(STATS) / ncols), ncols, panel=(3.4, 2.6))
    for ax, s in zip(axes, STATS):
        plots.histograms(ax, [("real", m_real[s]), ("generated", m_gen[s])],
                         f"{LABELS[s]}   W/sd {fmt(distance[s], 2)}")
    for ax in axes[len(STATS):]:
        ax.set_visible(False)
    fig.suptitle("Morphology: held-out (real) vs generated")
    return plots.png(fig)


def requested_measured_chart(points: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                             per_property: dict[str, dict[str, Any]]) -> bytes:
    """One panel per requested property: requested (x) against measured (y) for the generated
    galaxies and for the nearest real ones, with the diagonal, as PNG."""
    fig, axes = plots.figure(1, len(points), panel=(3.4, 3.2))
    for ax, (p, (requested, generated, floor)) in zip(axes, points.items()):
        v = per_property[p]
        plots.scatter(ax, [("generated", requested, generated), ("nearest real", requested, floor)],
                      f"{p}: |error|/spread {fmt(v['generated'], 2)}, real {fmt(v['floor'], 2)}",
                      "requested", "measured", diagonal=True)
    fig.suptitle("Galaxies to order: requested against measured")
    return plots.png(fig)


def side_by_side_chart(sets: list[tuple[str, np.ndarray]], per_row: int = 8, rows: int = 2) -> bytes:
    """Real and generated galaxies at the same size, one titled panel per set (``rows`` x
    ``per_row`` images each, pixels shown 1:1 scaled up without smoothing), as PNG."""
    sets = [(name, imgs[:per_row * rows]) for name, imgs in sets if imgs is not None and len(imgs)]
    fig, axes = plots.figure(len(sets), 1, panel=(1.2 * per_row, 1.2 * rows + 0.4))
    for ax, (name, imgs) in zip(axes, sets):
        ax.imshow(grid(imgs, ncols=per_row), interpolation="nearest")
        ax.set_title(name)
        ax.set_axis_off()
    return plots.png(fig)


def power_spectrum_chart(sharp: dict[str, Any]) -> bytes:
    """The real and generated images' luminance power spectra, structure band shaded, as PNG."""
    fig, (ax,) = plots.figure(1, 1, panel=(6.4, 4.2))
    k = sharp["k"]
    plots.lines(ax, [("real", k, sharp["power_real"]), ("generated", k, sharp["power_generated"])],
                "Radially averaged power spectrum of luminance", "cycles per image", "power",
                logx=True, logy=True, band=tuple(sharp["band_cycles_per_image"]))
    return plots.png(fig)


def training_curves_chart(history: list[dict[str, Any]]) -> bytes:
    """Loss, validation bits/dim and validation PSNR per epoch (metrics.json history), as PNG."""
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]

    def series(*keys: str) -> list[tuple[str, list, list]]:
        return [(key, epochs, [h.get(key, math.nan) for h in history]) for key in keys
                if any(key in h for h in history)]

    fig, axes = plots.figure(1, 3, panel=(3.8, 2.8))
    plots.lines(axes[0], series("train_loss", "val_loss"), "loss", "epoch")
    plots.lines(axes[1], series("val_bpd"), "validation bits/dim", "epoch")
    plots.lines(axes[2], series("val_psnr"), "validation PSNR (dB)", "epoch")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    return plots.png(fig)


# --------------------------------------------------------------------------- report.md


def fmt(v: Any, nd: int = 3) -> str:
    """A number for the report: ``nd`` decimals, 'n/a' for missing or non-finite values."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _sampler_kind(m: dict[str, Any]) -> str:
    """' (kernels on 10056 training codes, bandwidth 0.45)' for the report, '' for the prior."""
    meta = m.get("sampler_meta") or {}
    if m.get("sampler") != "gmm" or not meta:
        return ""
    if meta.get("kernels") == "codes":
        return f" (kernels on {meta['codes']} training codes, bandwidth {meta['bandwidth']:g})"
    return f" ({meta.get('components')} mixture components)"


def _header(m: dict[str, Any]) -> list[str]:
    held, train = m["held_out"], m["train"]
    return [
        "# Evaluation report", "",
        f"- model: `{m['model']}` ({m['likelihood_kind']} likelihood, {m['image_size']}px, crop {m['crop']})",
        f"- held-out images: {held['images']} from `{held['source']}` "
        f"(split: {held['split']}; {held['skipped']} unreadable skipped)",
        "- training images: " + (f"{train['images']} from `{m['train_data']}` (split: {train['split']})"
                                 if train else "not available"),
        f"- generated: {m['n_generated']} images, sampler `{m['sampler']}`{_sampler_kind(m)}, seed {m['seed']}, "
        f"temperature {m['temperature']}", "",
    ]


def _summary(m: dict[str, Any]) -> list[str]:
    lik, rec, mo, sh, mem = m["likelihood"], m["reconstruction"], m["morphology"], m["sharpness"], m["memorisation"]
    band = sh["band_cycles_per_image"]
    return [
        "## Summary", "",
        "| metric | value | note |", "|---|---|---|",
        f"| negative ELBO (KL weight 1) | {fmt(lik['elbo_bpd'], 4)} bits/dim | lower is better |",
        f"| IWAE bound, K={lik['iwae_k']} | {fmt(lik['iwae_bpd'], 4)} bits/dim | tighter (lower) than the ELBO |",
        f"| reconstruction PSNR | {fmt(rec['psnr'], 2)} dB | posterior mean |",
        f"| reconstruction SSIM | {fmt(rec['ssim'], 3)} | |",
        f"| morphology distance (mean W/sd) | {fmt(mo['mean_distance'])} | noise floor {fmt(mo['mean_floor'])} |",
        f"| structure-band power vs real | {fmt(sh['power_deficit_dex'], 3)} dex | "
        f"{band[0]:g}-{band[1]:g} cycles/image; negative = missing detail; floor {fmt(sh['floor_dex'], 3)} |",
        f"| structure-band power of reconstructions | {fmt(sh['reconstruction_dex'], 3)} dex | "
        "the decoder's own blur, for reference |",
        f"| high-pass sharpness (W/sd) | {fmt(sh['highpass']['distance']['generated'])} | "
        f"noise-corrected fine structure in the galaxy; floor {fmt(sh['highpass'].get('floor'))} |",
        f"| memorisation ratio | {fmt(mem.get('ratio'))} | "
        + ("median NN distance to the training set, generated / held-out; ~1 is healthy, "
           "< 1 copies or blur |" if mem.get("ratio") is not None else f"{mem.get('skipped')} |"),
        f"| memorisation ratio vs reconstructions | {fmt(mem.get('ratio_vs_reconstructions'))} | "
        "the same over held-out reconstructions: as blurry, not copies; < 1 means copying |",
        "",
        "Bits/dim of a `bce` model are not comparable with those of a `gaussian` one: cross-entropy on "
        "grey values is not a normalised likelihood.", "",
    ]


def _realism(r: dict[str, Any] | None) -> list[str]:
    if not r:
        return []
    if r.get("skipped"):
        return ["## Realism", "", f"Not measured: {r['skipped']}.", ""]
    rows = [("generated images", r["generated"]), ("their decoder means", r.get("means")),
            ("floor: two halves of the real set", r["floor"])]
    budgets = [str(k) for k in r["steps"]]
    lines = [
        "## Realism", "",
        f"A {r['method']}: a small CNN is trained from scratch to tell the held-out real images from each set "
        f"({r['folds']} folds, batches of {r['batch_per_set']} images per set, random flips and quarter turns) "
        "and scored on the fold it did not train on, after each training budget. 0.5: it cannot tell them apart; "
        f"1.0: it always can. The headline is the last budget ({budgets[-1]} steps, a classifier that has learnt "
        "what it can); the shorter ones show how easy the difference is to find. The floor is the same test "
        "between two halves of the real set.", "",
        "| real against | " + " | ".join(f"accuracy after {k} steps" for k in budgets) + " | images per set |",
        "|---|" + "---|" * len(budgets) + "---|",
    ]
    for name, t in rows:
        if t:
            cells = [f"{fmt(t['by_steps'][k]['accuracy'])} ± {fmt(t['by_steps'][k]['spread'])}" for k in budgets]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {t['n_per_set']} |")
    return lines + [""]


def _residual_detail(m: dict[str, Any]) -> list[str]:
    means = m.get("means_only")
    if not means:
        return []
    mo, sh, mem = m["morphology"], m["sharpness"], m["memorisation"]
    gain = ((m.get("sampler_meta") or {}).get("detail") or {}).get("gain")
    return [
        "## Residual detail", "",
        "Generated images are draws from p(x | z): the decoder's mean plus the sampler's residual "
        "detail model (texture the mean cannot predict: amplitude following the galaxy's light, "
        "spatially correlated, from 1/16 of the image size down)"
        + (f", its amplitude scaled by {fmt(gain, 2)} when the sampler was fitted so that samples have the "
           "training images' structure-band power" if gain is not None else "")
        + ". The same codes' means alone:", "",
        "| metric | with detail | means only |", "|---|---|---|",
        f"| morphology distance (mean W/sd) | {fmt(mo['mean_distance'])} | {fmt(means['morphology_mean_distance'])} |",
        f"| structure-band power vs real | {fmt(sh['power_deficit_dex'], 3)} dex | "
        f"{fmt(means['power_deficit_dex'], 3)} dex |",
        f"| high-pass sharpness (W/sd) | {fmt(sh['highpass']['distance']['generated'])} | "
        f"{fmt(sh['highpass']['distance'].get('means'))} |",
        f"| memorisation ratio | {fmt(mem.get('ratio'))} | {fmt(means.get('memorisation_ratio'))} |", "",
    ]


def _morphology(mo: dict[str, Any]) -> list[str]:
    means = mo.get("distance_means")
    failed = ", ".join(f"{k} {v:.1%}" for k, v in mo["failed_fraction"].items())
    lines = [
        "## Morphology", "",
        "Normalised 1-D Wasserstein distance between the real and generated distributions (divided by "
        "the real standard deviation), next to the same distance between two halves of the real set"
        + (" and the decoder means' distance (the same codes without the residual detail)" if means else "")
        + f". Failed measurements: {failed}.", "",
        "| statistic | real mean ± sd | generated mean ± sd | W/sd | floor |"
        + (" means mean ± sd | means W/sd |" if means else ""),
        "|---|---|---|---|---|" + ("---|---|" if means else ""),
    ]
    for s in STATS:
        r, g = mo["summary"]["real"][s], mo["summary"]["generated"][s]
        row = (f"| {LABELS[s]} | {fmt(r['mean'])} ± {fmt(r['std'])} | "
               f"{fmt(g['mean'])} ± {fmt(g['std'])} | {fmt(mo['distance'][s])} | {fmt(mo['floor'][s])} |")
        if means:
            e = mo["summary"]["means"][s]
            row += f" {fmt(e['mean'])} ± {fmt(e['std'])} | {fmt(means[s])} |"
        lines.append(row)
    return lines


def _highpass(hp: dict[str, Any]) -> list[str]:
    lines = [
        "## High-pass sharpness", "",
        f"Power of each galaxy minus its Gaussian-smoothed copy (sigma {hp['sigma_px']:g} px) in its segment, "
        "less the power its sky noise gives, over the segment's squared mean brightness: fine structure "
        "that pixel noise cannot fake. W/sd as for morphology (floor: two halves of the real set, "
        f"{fmt(hp.get('floor'))}).", "",
        "| images | median | W/sd vs real | failed |", "|---|---|---|---|",
    ]
    for name in SETS:
        if hp["median"].get(name) is None and hp["failed_fraction"].get(name) is None:
            continue  # no decoder means in this evaluation
        failed = hp["failed_fraction"][name]
        lines.append(f"| {name} | {fmt(hp['median'][name], 4)} | {fmt(hp['distance'].get(name))} | "
                     f"{'n/a' if failed is None else f'{failed:.1%}'} |")
    return lines + [""]


def _classes(c: dict[str, Any] | None) -> list[str]:
    if not c:
        return []
    if c.get("skipped"):
        return ["## Classes", "", f"Skipped: {c['skipped']}.", ""]
    held = c["held_out"]
    lines = [
        "## Classes", "",
        f"A classifier ({c['classifier']}) fitted to {c['train_images']} labelled training images "
        f"({c['train_dropped']} left out: a statistic failed), classes from `{c['labels_source']}`. Its accuracy "
        f"on {held['images']} labelled held-out images: {fmt(held['accuracy'])} (balanced "
        f"{fmt(held['balanced_accuracy'])}). Per class: the share of {c['n_per_class']} conditional samples it "
        "assigns to the class asked for, next to its recall on real held-out galaxies of that class (what "
        "samples like real ones would score); and the morphology distance (mean W/sd over the statistics) from the class's held-out "
        "galaxies to its conditional samples and to the unconditional ones.", "",
        "| class | training | held-out | real assigned to class | conditional assigned to class | W/sd conditional | "
        "W/sd unconditional | floor |", "|---|---|---|---|---|---|---|---|",
    ]
    for r in c["per_class"]:
        lines.append(f"| {r['label']} | {r['train']} | {r['held_out']} | {fmt(r['held_out_recall'])} | "
                     f"{fmt(r['conditional_share'])} | {fmt(r['distance_conditional'])} | "
                     f"{fmt(r['distance_unconditional'])} | {fmt(r['distance_floor'])} |")
    return lines + [""]


def _properties(pr: dict[str, Any] | None) -> list[str]:
    if not pr:
        return []
    if pr.get("skipped"):
        return ["## Galaxies to order", "", f"Skipped: {pr['skipped']}.", ""]
    match = pr["match"]
    lines = ["## Galaxies to order", ""]
    if match.get("skipped"):
        lines += [f"By catalogue (`--match`): skipped: {match['skipped']}.", ""]
    else:
        lines += [
            f"By catalogue (`--match`): {match['requests']} held-out galaxies' own values requested, one galaxy "
            f"generated for each (among the k = {match['k']} nearest training galaxies, the best of "
            f"{match.get('tries', 1)} measured draws) and measured. Median "
            "|measured - requested| in units of the held-out set's spread (IQR / 1.349), next to the same for the "
            "nearest other real held-out galaxy to each request (the floor); ratio = generated / floor.", "",
            "| property | generated | nearest real (floor) | ratio | not measured |", "|---|---|---|---|---|"]
        lines += [f"| {p} | {fmt(v['generated'])} | {fmt(v['floor'])} | {fmt(v['ratio'], 2)} | {v['failed']:.1%} |"
                  for p, v in match["per_property"].items()]
        lines.append("")
    lines += ["By range (`--where`): the morphology distance (mean W/sd over the statistics) from the held-out "
              "galaxies that satisfy each selection to its samples and to the unconditional samples.", "",
              "| where | held-out matching | W/sd selected | W/sd unconditional | floor |", "|---|---|---|---|---|"]
    for r in pr["where"]:
        lines.append(f"| `{r['where']}` | {r.get('real', 'n/a')} | " + (f"skipped: {r['skipped']} | | |" if r["skipped"]
                     else f"{fmt(r['distance_selected'])} | {fmt(r['distance_unconditional'])} | "
                          f"{fmt(r['distance_floor'])} |"))
    return lines + [""]


def report_markdown(m: dict[str, Any], files: list[tuple[str, str, str]]) -> str:
    """The human-readable report: headline table, realism, residual detail, morphology table, classes,
    galaxies to order, figures."""
    lines = _header(m) + _summary(m) + _realism(m.get("realism")) + _residual_detail(m) + _morphology(m["morphology"])
    lines += [""] + _highpass(m["sharpness"]["highpass"]) + _classes(m.get("classes")) + _properties(m.get("properties"))
    lines += ["## Figures", ""]
    for name, title, caption in files:
        lines += [f"### {title}", "", f"![{title}]({name})", "", caption, ""]
    lines += ["Definitions and caveats: docs/model.md of ray-galaxy, section \"Evaluation\".", ""]
    return "\n".join(lines)
