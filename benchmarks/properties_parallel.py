"""Measuring the training galaxies' properties at sampler-fit time: in one process against a
process pool on every core (:func:`ray_galaxy.parallel.ordered_map`).

The same images (read once, at the model's size and crop) measured by
:func:`ray_galaxy.generation.properties.measure_properties` with ``workers=1`` and with the
default (every core this process may run on), alternating, pool start-up included; the two
results must be identical (NaN where NaN).

    python benchmarks/properties_parallel.py --data path/to/gz2/val --image-size 64 --crop 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from ray_galaxy import morphology  # noqa: E402
from ray_galaxy.generation.properties import PROPERTIES  # noqa: E402
from ray_galaxy.imageset import read_image_set  # noqa: E402
from ray_galaxy.parallel import cores  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--crop", type=float, default=0.5)
    p.add_argument("--max-images", type=int, default=600)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    images = read_image_set(args.data, args.image_size, args.crop, limit=args.max_images).images
    stats = [stat for stat, _ in PROPERTIES.values()]
    times: dict[str, list[float]] = {"serial": [], "pool": []}
    results = {}
    for _ in range(args.repeats):
        for name, workers in (("serial", 1), ("pool", None)):
            t0 = time.perf_counter()
            results[name] = morphology.measure_all(images, stats, workers=workers)
            times[name].append(time.perf_counter() - t0)
    same = all(np.array_equal(results["serial"][k], results["pool"][k], equal_nan=True) for k in stats)
    best = {k: min(v) for k, v in times.items()}
    print(json.dumps({"images": len(images), "image_size": args.image_size, "cores": cores(),
                      "load_average": os.getloadavg(), "seconds": times,
                      "ms_per_image": {k: round(1000 * v / len(images), 2) for k, v in best.items()},
                      "speedup": round(best["serial"] / best["pool"], 2), "identical": same}, indent=1))


if __name__ == "__main__":
    main()
