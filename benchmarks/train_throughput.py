"""Training images/s: Ray Train (1 worker) against a plain PyTorch loop, side by side.

Same model, batch size, decoded images and augmentation; the plain loop runs before and after
the Ray run and its mean is the baseline, so drift on a noisy machine hits both sides.

    python benchmarks/train_throughput.py --image-size 64 --epochs 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def plain_loop(images, cfg, epochs: int) -> float:
    """Images/s of a plain single-process PyTorch loop over the same decoded images."""
    import torch

    from ray_galaxy.images import augment_d4
    from ray_galaxy.model import ConvVAE
    from ray_galaxy.training.loop import kl_weight_at

    torch.manual_seed(cfg.seed)
    model = ConvVAE(cfg.model_config()).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    x_all = torch.from_numpy(images)  # (N, S, S, 3) uint8
    gen = torch.Generator().manual_seed(0)
    rates = []
    for epoch in range(epochs):
        t0, n = time.time(), 0
        perm = torch.randperm(len(x_all), generator=gen)
        for i in range(0, len(x_all), cfg.batch_size):
            x = x_all[perm[i:i + cfg.batch_size]].permute(0, 3, 1, 2).float().div_(255)
            x = augment_d4(x, gen)
            a, mu, logvar = model(x)
            loss = (model.recon_nll(a, x) + kl_weight_at(cfg, epoch) * model.kl(mu, logvar)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += x.shape[0]
        rates.append(n / (time.time() - t0))
    return sum(rates[1:]) / len(rates[1:])  # first epoch is warm-up


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="hubble-xdf")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--preset", default="default")
    p.add_argument("--crop", type=float, default=1.0)
    p.add_argument("--use-gpu", action="store_true")
    args = p.parse_args()

    import numpy as np
    import ray

    from ray_galaxy.config import train_config
    from ray_galaxy.streaming import load_datasets
    from ray_galaxy.runtime import ensure_ray
    from ray_galaxy.training.trainer import make_trainer

    ensure_ray()
    storage = tempfile.mkdtemp(prefix="rg-bench-")
    cfg = train_config(data=args.data, image_size=args.image_size, batch_size=args.batch_size,
                       epochs=args.epochs, preset=args.preset, crop=args.crop, storage=storage,
                       name="bench", num_workers=1, use_gpu=args.use_gpu, max_failures=0)
    train_ds, val_ds, stats = load_datasets(cfg.data, cfg.image_size, cfg.crop, cfg.val_fraction)
    images = np.stack([r["image"] for r in train_ds.take_all()])
    print(f"{len(images)} training images at {cfg.image_size}px, batch {cfg.batch_size}, "
          f"{args.epochs} epochs (first is warm-up), torch threads {os.cpu_count()}", flush=True)

    plain_before = plain_loop(images, cfg, args.epochs) if not args.use_gpu else float("nan")
    t0 = time.time()
    result = make_trainer(cfg, train_ds, val_ds).fit()
    ray_wall = time.time() - t0
    with result.checkpoint.as_directory() as d:
        history = json.load(open(os.path.join(d, "state.json")))["history"]
    ray_rate = float(np.mean([h["images_per_s"] for h in history[1:]]))
    epoch_wall = float(np.mean([h["epoch_seconds"] for h in history[1:]]))
    plain_after = plain_loop(images, cfg, args.epochs) if not args.use_gpu else float("nan")
    plain = (plain_before + plain_after) / 2
    out = {
        "image_size": cfg.image_size, "batch_size": cfg.batch_size, "images": len(images),
        "plain_images_per_s": round(plain, 1), "plain_before": round(plain_before, 1),
        "plain_after": round(plain_after, 1), "ray_train_images_per_s": round(ray_rate, 1),
        "ratio": round(ray_rate / plain, 3), "ray_epoch_seconds_with_val_and_checkpoint": round(epoch_wall, 2),
        "ray_fit_wall_seconds": round(ray_wall, 1), "cpus": os.cpu_count(),
    }
    print(json.dumps(out, indent=1))
    ray.shutdown()


if __name__ == "__main__":
    main()
