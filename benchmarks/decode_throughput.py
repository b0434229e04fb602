"""Decoding throughput by precision: float64 (the CPU default) against float32 and bfloat16.

The default preset's decoder (random weights: the cost does not depend on what they learned)
decodes ``--n`` prior codes in batches of ``--batch-size`` on each device, in each precision,
alternating, and reports galaxies/s and the largest difference from the float64 decode in
8-bit levels (what a PNG would show).

    python benchmarks/decode_throughput.py --image-size 64                 # CPU
    python benchmarks/decode_throughput.py --image-size 256 --device cuda  # a GPU node (benchmarks/gpu.sh)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from ray_galaxy.config import TrainConfig  # noqa: E402
from ray_galaxy.model import DECODE_DTYPES, ConvVAE, to_uint8  # noqa: E402


def rate(model: ConvVAE, z: torch.Tensor, dtype: torch.dtype, batch: int) -> tuple[float, torch.Tensor]:
    """Galaxies/s of decoding ``z`` in ``dtype`` (after one warm-up batch), and the images."""
    model.decode(z[:batch], dtype=dtype)
    if z.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = torch.cat([model.decode(z[i:i + batch], dtype=dtype) for i in range(0, len(z), batch)])
    if z.device.type == "cuda":
        torch.cuda.synchronize()
    return len(z) / (time.perf_counter() - t0), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    model = ConvVAE(TrainConfig(image_size=args.image_size).model_config()).eval().to(args.device)
    z = torch.randn(args.n, model.config.latent_dim, device=args.device)
    rates: dict[str, list[float]] = {name: [] for name in DECODE_DTYPES}
    images: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for name, dtype in DECODE_DTYPES.items():
            r, out = rate(model, z, dtype, args.batch_size)
            rates[name].append(r)
            images[name] = to_uint8(out.cpu()).int()
    base = sum(rates["float64"]) / len(rates["float64"])
    result = {}
    for name in DECODE_DTYPES:
        mean = sum(rates[name]) / len(rates[name])
        levels = int((images[name] - images["float64"]).abs().max())
        share = float((images[name] != images["float64"]).float().mean())
        result[name] = {"galaxies_per_s": mean, "vs_float64": mean / base, "max_levels": levels,
                        "pixels_differing": share}
        print(f"{args.device} {args.image_size}px {name}: {mean:.0f} galaxies/s ({mean / base:.2f}x float64), "
              f"max difference {levels} levels, {share:.2%} of pixel values differ", flush=True)
    print(json.dumps({"device": args.device, "image_size": args.image_size, "results": result}))


if __name__ == "__main__":
    main()
