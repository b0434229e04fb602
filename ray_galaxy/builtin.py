"""The built-in data set: galaxies cut out of the Hubble eXtreme Deep Field (``--data hubble-xdf``).

scikit-image ships the XDF picture, so the set is built on this machine on first use, without
a download, into ``$RAY_GALAXY_CACHE`` (default ``~/.cache/ray-galaxy``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

BUILTIN_DATASETS = ("hubble-xdf",)
HUBBLE_XDF_FOLDER = "hubble-xdf-v1"
# The built set's own description; not a prepared-shards manifest (its "format" differs).
CUTOUTS_MANIFEST = "manifest.json"


def cache_dir() -> Path:
    """Folder for built datasets: $RAY_GALAXY_CACHE or ~/.cache/ray-galaxy."""
    return Path(os.environ.get("RAY_GALAXY_CACHE", Path.home() / ".cache" / "ray-galaxy"))


def resolve_data_uri(data: str) -> str:
    """Map a built-in dataset name to its (built on demand) folder; other URIs pass through."""
    if data == "hubble-xdf":
        return str(build_hubble_xdf())
    return data


def build_hubble_xdf(root: Path | None = None, k_sigma: float = 3.0, min_area: int = 60,
                     pad: float = 1.6, out_size: int = 64) -> Path:
    """Cut galaxies out of the Hubble eXtreme Deep Field image shipped with scikit-image.

    Sources are pixels more than ``k_sigma`` robust standard deviations above the median
    background of the smoothed luminance, grouped into connected components; components of at
    least ``min_area`` pixels not touching the border are cut out as squares ``pad`` times
    their larger extent and resized to ``out_size``. Built once; later calls reuse the folder.
    """
    root = Path(root) if root else cache_dir() / HUBBLE_XDF_FOLDER
    if (root / CUTOUTS_MANIFEST).is_file():
        return root
    # scikit-image is needed only here, once per machine: not worth importing with the data layer.
    from skimage import data as skdata

    img = skdata.hubble_deep_field()  # (872, 1000, 3) uint8, ships inside scikit-image
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".hubble-xdf-", dir=root.parent))
    kept = _write_cutouts(img, tmp, k_sigma, min_area, pad, out_size)
    (tmp / CUTOUTS_MANIFEST).write_text(json.dumps({
        "source": "skimage.data.hubble_deep_field()", "k_sigma": k_sigma, "min_area": min_area,
        "count": len(kept), "cutouts": kept}, indent=1))
    try:
        tmp.rename(root)  # atomic: concurrent builders never see a half-built folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / CUTOUTS_MANIFEST).is_file():
            raise
    return root


def _source_regions(img: np.ndarray, k_sigma: float) -> list:
    """Connected regions of the smoothed luminance above the robust background threshold."""
    # Same reason as in build_hubble_xdf: scikit-image only when the set is built.
    from skimage import filters, measure

    lum = img.astype(np.float32).mean(-1)
    bg = float(np.median(lum))
    noise = float(np.median(np.abs(lum - bg)) * 1.4826)
    smooth = filters.gaussian(lum, sigma=1.5, preserve_range=True)
    return measure.regionprops(measure.label(smooth > bg + k_sigma * noise))


def _write_cutouts(img: np.ndarray, folder: Path, k_sigma: float, min_area: int, pad: float,
                   out_size: int) -> list[dict]:
    """Save one PNG per usable source into ``folder``; returns their descriptions."""
    h, w = img.shape[:2]
    kept = []
    for p in _source_regions(img, k_sigma):
        if p.area < min_area:
            continue
        r0, c0, r1, c1 = p.bbox
        side = max(int(max(r1 - r0, c1 - c0) * pad), 16)
        cy, cx = (r0 + r1) // 2, (c0 + c1) // 2
        top, left = cy - side // 2, cx - side // 2
        if top < 0 or left < 0 or top + side > h or left + side > w:
            continue
        cut = Image.fromarray(img[top:top + side, left:left + side])
        cut = cut.resize((out_size, out_size), Image.Resampling.LANCZOS)
        name = f"xdf_{len(kept):04d}.png"
        cut.save(folder / name)
        kept.append({"file": name, "row": int(cy), "col": int(cx), "side": side, "area": int(p.area)})
    return kept
