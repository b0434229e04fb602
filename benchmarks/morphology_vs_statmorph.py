"""Our morphology statistics (ray_galaxy.morphology) against statmorph's, per image.

statmorph (Rodriguez-Gomez et al. 2019) is the reference implementation of the non-parametric
statistics; docs/morphology.md holds the table this prints and explains the differences.
Each image (64 px, centre crop 0.5 by default: what the evaluation measures) goes to statmorph twice:

* **same input**: our sky-subtracted luminance and our segmentation (central object = label 1,
  the other sources masked), so only the definitions differ;
* **independent**: statmorph's usual inputs, made with photutils: background and noise from
  3-sigma-clipped statistics of the pixels outside a first detection, sources detected at
  1.5 sigma after a 3-px-FWHM Gaussian kernel (10 connected pixels, no deblending), the source
  under the image centre measured.

statmorph needs a weight map or a gain: these are 8-bit JPEGs with no gain, so the weight map
is the sky noise everywhere; statmorph uses it only for the Sersic fit and the S/N per pixel,
neither of which is compared. Images that statmorph flags as bad (flag >= 2) are left out.
Extra rows (:data:`ROWS`) take apart A and S: statmorph's A on the half-pixel grid, A and S
without background terms, and statmorph against itself with another sky box.

    python benchmarks/morphology_vs_statmorph.py --data ../shared/datasets/gz2/val --n 200

Also the reference for tests/test_statmorph.py (statmorph 0.7.2; :class:`Reference` and
:func:`diagnostics` read a few of its private attributes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import statmorph
from astropy.convolution import convolve
from astropy.stats import sigma_clipped_stats
from photutils.segmentation import detect_sources, make_2dgaussian_kernel
from photutils.utils import circular_footprint
from scipy import ndimage
from scipy.stats import pearsonr, spearmanr

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ray_galaxy.console import fmt_seconds, log  # noqa: E402
from ray_galaxy import morphology as M  # noqa: E402
from ray_galaxy.images import luminance  # noqa: E402
from ray_galaxy.imageset import load_images  # noqa: E402

# Our statistic -> statmorph's attribute (colour has no statmorph counterpart).
REFERENCE = {"concentration": "concentration", "asymmetry": "asymmetry", "smoothness": "smoothness",
             "gini": "gini", "m20": "m20", "r_half": "r50", "ellipticity": "ellipticity_centroid"}
COMPARED = tuple(REFERENCE)


class Reference(statmorph.SourceMorphology):
    """statmorph computing only the statistics compared here: no Sersic fit, no MID statistics
    (10x faster; each value is statmorph's own lazy property, unchanged)."""

    def _calculate_morphology(self) -> None:
        for name in REFERENCE.values():
            _ = self[name]

    def _check_segmaps(self) -> None:
        """Skipped: it compares the Gini segment with the MID one, which is not computed."""


def our_inputs(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(sky-subtracted luminance, segmap with the central object as 1, noise) as measure() sees them."""
    lum = luminance(image)
    bg, noise = M.sky(lum)
    lum = lum - bg
    seg = M.segment(lum, noise)
    if seg is None:
        return None
    obj, others = seg
    labels, _ = ndimage.label(others)
    return lum, np.where(obj, 1, np.where(others, labels + 1, 0)), noise


def photutils_inputs(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(sky-subtracted luminance, segmap with the source under the centre as 1, noise), photutils' way."""
    lum = luminance(image)
    kernel = make_2dgaussian_kernel(3.0, size=5)
    _, med, std = sigma_clipped_stats(lum, sigma=3.0)
    first = detect_sources(convolve(lum - med, kernel), 1.5 * std, n_pixels=10)
    if first is not None:  # the sky statistics again without the sources
        _, med, std = sigma_clipped_stats(lum, sigma=3.0, mask=first.make_source_mask(footprint=circular_footprint(2)))
    lum = lum - med
    seg = detect_sources(convolve(lum, kernel), 1.5 * std, n_pixels=10)
    if seg is None:
        return None
    c = lum.shape[0] // 2
    centre = seg.data[c, c]
    if centre == 0:
        return None
    # Relabel so the measured source is 1 (the others keep distinct labels).
    data = np.where(seg.data == centre, 1, np.where(seg.data > 0, seg.data + 1, 0))
    return lum, data, float(std)


def reference(lum: np.ndarray, segmap: np.ndarray, noise: float, skybox: int = 32) -> Reference | None:
    """statmorph's measurement of label 1, or None when it flags it as bad (flag >= 2).

    ``skybox``: statmorph's skybox_size, the sky box it starts from (halved until one is free
    of sources; 32 is its default).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statmorph warns per image about what its flag records
        m = Reference(lum, segmap, 1, weightmap=np.full_like(lum, max(noise, 1e-6)), skybox_size=skybox)
    return m if m.flag <= 1 else None


def diagnostics(m: Reference) -> dict[str, float]:
    """statmorph's A and S without the parts we do not copy (docs/morphology.md); call it after
    reading the statistics, as it switches off ``m``'s background terms:

    * ``asymmetry_grid``: its A minimised over the half-pixel grid round its centre, where a
      180-degree rotation needs no interpolation;
    * ``asymmetry_raw`` and ``smoothness_raw``: A (on that grid) and S without background terms
      (statmorph's own switch: no sky box);
    * ``odd_box``: whether its boxcar width int(0.25 r_p) is odd, i.e. centred.
    """
    img = m._cutout_stamp_maskzeroed
    grid = [np.round(np.asarray(m._asymmetry_center) * 2) / 2 + np.array([i, j]) / 2
            for i in (-1, 0, 1) for j in (-1, 0, 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {"asymmetry_grid": min(m._asymmetry_function(c, img, "cas") for c in grid),
               "odd_box": float(int(M.PETRO_FRACTION_CAS * m.rpetro_circ) % 2 == 1)}
        m._sky_asymmetry = m._sky_smoothness = -99.0  # what statmorph uses when it finds no sky box
        del m.smoothness
        out |= {"asymmetry_raw": min(m._asymmetry_function(c, img, "cas") for c in grid),
                "smoothness_raw": m.smoothness}
    return {k: float(v) for k, v in out.items()}


def ours_raw(image: np.ndarray) -> dict[str, float]:
    """Our A and S without background terms: :func:`morphology.cas` with no sky and no noise."""
    lum, segmap, _ = our_inputs(image)
    obj, valid = segmap == 1, segmap <= 1
    img = np.where(valid, lum, 0.0)
    cy, cx = M.centroid(np.where(obj, lum, 0.0))
    c = M.cas(img, valid, cy, cx, np.zeros(img.shape, bool), 0.0)
    return {"asymmetry_raw": c["asymmetry"], "smoothness_raw": c["smoothness"]}


def measure_pair(image: np.ndarray, inputs) -> tuple[dict[str, float], dict[str, float]] | None:
    """(ours, statmorph's incl. diagnostics) for one image, or None when either has no measurement."""
    prepared = inputs(image)
    if prepared is None:
        return None
    m = reference(*prepared)
    ours = M.measure(image)
    if m is None or any(not math.isfinite(ours[k]) for k in COMPARED):
        return None
    ref = {k: float(m[v]) for k, v in REFERENCE.items()}
    if any(v == -99.0 for v in ref.values()):
        return None
    m8 = reference(*prepared, skybox=8)  # the reference's own sensitivity to its sky box
    box8 = {"asymmetry_box8": m8.asymmetry, "smoothness_box8": m8.smoothness} if m8 is not None else {}
    return ours | ours_raw(image), ref | diagnostics(m) | box8


def agreement(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """n, Pearson, Spearman, median(ours - statmorph), median |ours - statmorph|, 90th percentile |.|,
    and statmorph's median and standard deviation."""
    d = ours - ref
    return {"n": int(len(d)), "pearson": float(pearsonr(ours, ref)[0]), "spearman": float(spearmanr(ours, ref)[0]),
            "median_offset": float(np.median(d)), "median_abs": float(np.median(np.abs(d))),
            "p90_abs": float(np.percentile(np.abs(d), 90)), "statmorph_median": float(np.median(ref)),
            "statmorph_std": float(np.std(ref))}


# Extra rows: what is compared per image (None: image left out of the row).
ROWS = {
    "A, statmorph on the half-pixel grid": lambda o, r: (o["asymmetry"], r["asymmetry_grid"]),
    "A without background terms, same grid": lambda o, r: (o["asymmetry_raw"], r["asymmetry_raw"]),
    "S without background terms, odd boxcar": lambda o, r: (o["smoothness_raw"], r["smoothness_raw"])
    if r["odd_box"] else None,
    "statmorph's own A, 8-px sky box vs default": lambda o, r: (r["asymmetry_box8"], r["asymmetry"])
    if "asymmetry_box8" in r else None,
    "statmorph's own S, 8-px sky box vs default": lambda o, r: (r["smoothness_box8"], r["smoothness"])
    if "smoothness_box8" in r else None,
}


def compare(images: np.ndarray, inputs) -> dict[str, dict[str, float]]:
    """Per statistic (and the :data:`ROWS`): :func:`agreement` over the images both measure."""
    pairs, t0 = [], time.time()
    for i, im in enumerate(images):
        if (p := measure_pair(im, inputs)) is not None:
            pairs.append(p)
        if (i + 1) % 50 == 0:
            log(f"{inputs.__name__}: {i + 1}/{len(images)} images, {fmt_seconds(time.time() - t0)}")
    out = {k: agreement(np.array([o[k] for o, _ in pairs]), np.array([r[k] for _, r in pairs])) for k in COMPARED}
    for row, pick in ROWS.items():
        keep = [xy for o, r in pairs if (xy := pick(o, r)) is not None]
        out[row] = agreement(*map(np.array, zip(*keep)))
    return out


def markdown(table: dict[str, dict[str, float]]) -> str:
    """The table docs/morphology.md shows."""
    lines = [("| statistic | n | Pearson | Spearman | median ours - statmorph | median abs diff | 90% abs diff "
              "| statmorph median (sd) |"), "|---|---|---|---|---|---|---|---|"]
    for k, a in table.items():
        lines.append(f"| {k} | {a['n']} | {a['pearson']:.3f} | {a['spearman']:.3f} | {a['median_offset']:+.4f} "
                     f"| {a['median_abs']:.4f} | {a['p90_abs']:.4f} "
                     f"| {a['statmorph_median']:.3f} ({a['statmorph_std']:.3f}) |")
    return "\n".join(lines)


def main() -> None:
    """Load the images, compare on both inputs, print the two tables (and write JSON with --out)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="images, e.g. ../shared/datasets/gz2/val")
    p.add_argument("--n", type=int, default=200, help="images, a seeded random subset (default 200)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--crop", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the tables here as JSON")
    args = p.parse_args()
    images, _ = load_images(args.data, args.image_size, args.crop, args.n, seed=args.seed)
    log(f"{len(images)} images from {args.data}, {args.image_size}px, crop {args.crop}; "
        f"statmorph {statmorph.__version__}")
    tables = {"same_input": compare(images, our_inputs), "independent": compare(images, photutils_inputs)}
    for name, table in tables.items():
        print(f"\n{name} ({len(images)} images)\n\n{markdown(table)}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"images": len(images), "data": args.data, "image_size": args.image_size, "crop": args.crop,
                       "statmorph": statmorph.__version__, **tables}, f, indent=1)


if __name__ == "__main__":
    main()
