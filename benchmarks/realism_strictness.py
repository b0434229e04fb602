"""How strict is the realism test? Real galaxies against slightly changed copies of other real ones.

The evaluation's classifier two-sample test (ray_galaxy/evaluation/realism.py) is run between one
half of a folder of real survey JPEGs and copies of the other half that were changed a little:
re-saved as JPEG with their own quantisation tables (a control: the pixels barely move), white
noise of a few 8-bit levels added, or blurred by a fraction of a pixel. The two halves as they
are give the floor. What it says: how close a generated galaxy's pixel statistics must come to
the survey's before the test stops telling them apart (docs/experiments.md, "How strict the
realism test is").

    python benchmarks/realism_strictness.py --data ../shared/datasets/gz2/val

About 40 s per row on 2 cores at 64 px.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from ray_galaxy.data import BadImage, decode_image
from ray_galaxy.evaluation.realism import STEPS, two_sample_test


def rejpeg(data: bytes) -> bytes:
    """The JPEG re-saved with its own quantisation tables and 4:2:0 chroma subsampling."""
    im = Image.open(io.BytesIO(data))
    buf = io.BytesIO()
    im.save(buf, "JPEG", qtables=im.quantization, subsampling=2)
    return buf.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/datasets/gz2/val", help="a folder of real galaxy JPEGs")
    p.add_argument("--n", type=int, default=600, help="images used (two halves of n/2)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--crop", type=float, default=0.5)
    p.add_argument("--noise", type=float, default=2.5, help="white noise sd, in 8-bit levels")
    p.add_argument("--blur", type=float, default=0.7, help="Gaussian blur sd, in pixels of the --size image")
    a = p.parse_args()
    load = lambda blobs: np.stack([decode_image(b, a.size, a.crop) for b in blobs])  # noqa: E731
    raw, skipped = [], 0
    for f in sorted(Path(a.data).glob("*.jpg")):
        if len(raw) == a.n:
            break
        data = f.read_bytes()
        try:  # an unreadable file is skipped and counted, as the training data loader does
            decode_image(data, a.size, a.crop)
            Image.open(io.BytesIO(data)).quantization
        except (BadImage, AttributeError, OSError):
            skipped += 1
            continue
        raw.append(data)
    if len(raw) < 8:
        raise SystemExit(f"--data {a.data}: found {len(raw)} readable JPEGs ({skipped} skipped), the test needs at least 8")
    half = len(raw) // 2
    real_a, real_b = load(raw[:half]), load(raw[half:2 * half])
    x = real_b.astype(np.float64)
    u8 = lambda v: np.clip(v, 0, 255).round().astype(np.uint8)  # noqa: E731
    rows = {
        "floor: the other half as it is": real_b,
        "re-saved as JPEG with its own tables": load([rejpeg(b) for b in raw[half:2 * half]]),
        f"white noise, sd {a.noise:g} levels": u8(x + np.random.default_rng(0).normal(0, a.noise, x.shape)),
        f"blur, sd {a.blur:g} px": u8(gaussian_filter(x, (0, a.blur, a.blur, 0))),
    }
    print(f"{half} real images from {a.data} against {half} changed copies of others, {a.size} px, crop {a.crop}"
          f"{f'; {skipped} unreadable files skipped' if skipped else ''}")
    print(f"{'copies':42s} " + "  ".join(f"{k} steps" for k in STEPS))
    for name, images in rows.items():
        t0 = time.time()
        r = two_sample_test(real_a, images, seed=0)
        cells = "  ".join(f"{r.at(k):.3f} ± {r.spread(k):.3f}" for k in STEPS)
        print(f"{name:42s} {cells}   ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
