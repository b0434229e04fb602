"""A tiny trained model directory with recorded training data, for the evaluation and
generation tests (plain torch, no Ray): 48 training and 24 held-out synthetic galaxies.

The ``tiny`` (one model per test module) and ``copy`` (a copy a test may fit samplers into)
fixtures are shared by importing them into a test module (see ``tiny_fixture``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic import galaxy

from ray_galaxy.checkpoint import save_model_dir
from ray_galaxy.config import ModelConfig
from ray_galaxy.model import ConvVAE

SIZE = 32


def write_galaxies(root: Path, n: int, seed: int) -> np.ndarray:
    """``n`` synthetic galaxies as PNG files under ``root``; returns them (n, SIZE, SIZE, 3) uint8."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    imgs = np.stack([galaxy(SIZE, rng, sigma=rng.uniform(2.5, 5.0)) for _ in range(n)])
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(root / f"g{i:03d}.png")
    return imgs


def make_tiny(root: Path) -> dict:
    """A ConvVAE trained for a few steps on ``root/train``, saved with its training source and a
    short history; returns {root, model, train, val}."""
    train_imgs = write_galaxies(root / "train", 48, seed=1)
    write_galaxies(root / "val", 24, seed=2)
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=SIZE, channels=(8, 16), latent_dim=4)
    model = ConvVAE(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.from_numpy(train_imgs).permute(0, 3, 1, 2).float() / 255
    history = []
    for step in range(60):
        idx = torch.randint(0, len(x), (16,))
        out = model.loss(x[idx], kl_weight=1.0)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        if step % 20 == 19:
            history.append({"epoch": len(history) + 1, "train_loss": out["loss"].item(),
                            "val_loss": out["loss"].item(), "val_bpd": 9.0 - len(history),
                            "val_psnr": 15.0 + len(history)})
    model.eval()
    uri = save_model_dir(str(root / "model"), {k: v.detach() for k, v in model.state_dict().items()}, cfg,
                         extra_config={"train": {"data": str(root / "train"), "crop": 1.0, "val_fraction": 0.1}},
                         metrics={"history": history})
    return {"root": root, "model": uri, "train": root / "train", "val": root / "val"}


# Fixtures named by ``name=`` so that a test module imports them without its parameters
# shadowing the import (ruff F811): ``from tiny_model import copy_fixture, tiny_fixture``.
@pytest.fixture(scope="module", name="tiny")
def tiny_fixture(tmp_path_factory, request) -> dict:
    """make_tiny's model, trained once per test module."""
    return make_tiny(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]))


@pytest.fixture(name="copy")
def copy_fixture(tiny, tmp_path) -> str:
    """A copy of the tiny model directory that a test may fit samplers into."""
    uri = str(tmp_path / "model")
    shutil.copytree(tiny["model"], uri)
    return uri
