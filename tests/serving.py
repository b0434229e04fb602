"""Shared pieces of the Serve tests: tiny trained models and the expected decoder output.

The ``models``, ``server`` and ``labelled_server`` fixtures (conftest.py) build on these; one Serve
instance on a loopback port serves every Serve, explorer and load test of the session.
"""

from __future__ import annotations

import io
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests

TOKEN = "tok-" + "7f3a9c21e4b8d05f"
SIZE, LATENT, MAX_BATCH = 32, 4, 8
CLASSES = ["non_spiral", "spiral"]  # of the ``labelled_server`` fixture's sampler (conftest.py)
BODY_LIMIT = 64 * 1024
# Small replicas: the shared test cluster has 4 logical CPUs on 2 cores.
SMALL = {"GalaxyAPI": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}},
         "Decoder": {"num_replicas": 1, "max_ongoing_requests": 32, "ray_actor_options": {"num_cpus": 0.25}}}


def train_tiny(uri: str, seed: int, latent_dim: int = LATENT) -> str:
    """A 32px model after a few Adam steps on synthetic galaxies, saved as a model directory."""
    import torch
    from synthetic import galaxy

    from ray_galaxy.checkpoint import save_model_dir
    from ray_galaxy.config import ModelConfig
    from ray_galaxy.model import ConvVAE

    torch.manual_seed(seed)
    cfg = ModelConfig(image_size=SIZE, channels=(8, 16, 32, 32), latent_dim=latent_dim)
    model = ConvVAE(cfg).train()
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(np.stack([galaxy(SIZE, rng) for _ in range(16)])).permute(0, 3, 1, 2).float() / 255
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(8):
        loss = model.loss(x)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    metrics = {"best_epoch": 1, "epochs_run": 1,
               "best": {"epoch": 1, "val_loss": loss.item(), "val_psnr": 12.5,
                        "val_kl_per_dim": [0.1, 3.0, 0.2, 2.0, 0.0, 0.0][:latent_dim]},
               "data": {"source": "synthetic", "train_images": 16, "val_images": 0, "skipped": 0}}
    return save_model_dir(uri, model.state_dict(), cfg, {"train": {"crop": 1.0}}, metrics)


def expected_images(model, z) -> np.ndarray:
    from ray_galaxy.model import to_uint8

    return to_uint8(model.decode(z)).numpy()


def generator(models):
    """Model A loaded as every way out of the project loads it (jobs/sample.py, training's figures)."""
    from ray_galaxy.generation.generator import Generator

    if not hasattr(models, "gen_a"):
        models.gen_a = Generator.load(models.a)
    return models.gen_a


def seed_latents(models, n: int, seed: int, sampler: str = "auto", temperature: float = 1.0):
    """The codes of a seed's first ``n`` galaxies on model A (a seed's block, as jobs/sample.py
    draws it); 'auto' is A's GMM sampler."""
    return generator(models).latents(n, seed, sampler, temperature)


def default_latents(models, n: int, seed: int, temperature: float = 1.0):
    """The codes a request without ``sampler`` decodes on model A: 'auto' is its GMM sampler."""
    return seed_latents(models, n, seed, "auto", temperature)


def default_images(models, n: int, seed: int, temperature: float = 1.0, detail: bool = True) -> np.ndarray:
    """POST /sample {n, seed, temperature} of model A (default sampler 'auto' = its GMM, with the
    residual detail unless ``detail`` is false), generated in this process as jobs/sample.py does."""
    return generator(models).images(n, seed, "auto", temperature, detail)


def expected_png(models, seed: int, temperature: float = 1.0, detail: bool = True) -> bytes:
    """GET /sample?seed=...&temperature=... of model A, generated in this process."""
    from ray_galaxy.images import png_bytes

    return png_bytes(default_images(models, 1, seed, temperature, detail)[0])


def pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def tile(strip: np.ndarray, i: int, j: int = 0, pad: int = 2) -> np.ndarray:
    """Tile (row j, column i) of a figures.grid mosaic of SIZE-pixel images."""
    y, x = pad + j * (SIZE + pad), pad + i * (SIZE + pad)
    return strip[y:y + SIZE, x:x + SIZE]


def galaxy_png(size: int = 48, seed: int = 5) -> bytes:
    """A synthetic galaxy of ``size`` px as PNG bytes (an upload for /reconstruct)."""
    from synthetic import galaxy

    from ray_galaxy.images import png_bytes

    return png_bytes(galaxy(size, np.random.default_rng(seed)))


def percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64) * 1000
    return {"n": int(a.size), "p50_ms": round(float(np.percentile(a, 50)), 1),
            "p99_ms": round(float(np.percentile(a, 99)), 1), "max_ms": round(float(a.max()), 1)}


def drive(base: str, plan: list[tuple[str, dict, str]], concurrency: int, deadline_s: float,
          on_done=None, rate: float | None = None) -> dict:
    """Send ``plan`` with ``concurrency`` threads (one keep-alive session each), request i not
    before i / ``rate`` s when a rate is given; nothing is sent after ``deadline_s``.
    Returns (endpoint, outcome, latency s, start time.monotonic()) per request and the wall time."""
    local = threading.local()
    started = time.monotonic()
    stop_at = started + deadline_s
    done = [0]
    lock = threading.Lock()

    def one(indexed):
        i, (ep, kwargs, ctype) = indexed
        if rate:
            time.sleep(max(0.0, started + i / rate - time.monotonic()))
        if time.monotonic() > stop_at:
            return ep, "not sent (deadline)", 0.0, time.monotonic()
        if not hasattr(local, "s"):
            local.s = requests.Session()
        method, path = ep.split(" ")
        sent_at = time.monotonic()
        t0 = time.perf_counter()
        try:
            r = local.s.request(method, base + path, timeout=(10, 60), **kwargs)
            elapsed = time.perf_counter() - t0
            if r.status_code != 200:
                outcome = f"{r.status_code}: {r.text[:160]}"
            elif not r.headers.get("content-type", "").startswith(ctype):
                outcome = f"content-type {r.headers.get('content-type')!r}, wanted {ctype}"
            elif ctype == "application/zip" and zipfile.ZipFile(io.BytesIO(r.content)).testzip() is not None:
                outcome = "bad zip"
            elif ctype == "application/octet-stream" and \
                    np.load(io.BytesIO(r.content)).shape != (kwargs["json"]["n"], SIZE, SIZE, 3):
                outcome = "bad npy shape"
            else:
                outcome = "ok"
        except Exception as e:  # noqa: BLE001 - a connection error is a result to count
            elapsed, outcome = time.perf_counter() - t0, f"exception {type(e).__name__}: {e}"[:200]
        with lock:
            done[0] += 1
            n = done[0]
        if on_done is not None:
            on_done(n)
        return ep, outcome, elapsed, sent_at

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, enumerate(plan)))
    return {"results": results, "wall_s": time.perf_counter() - t0}
