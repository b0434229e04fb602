"""Same seed, same data, one CPU worker: the same run. The epoch order of streamed data is seeded
per epoch, so epochs differ from each other but not between runs."""

import hashlib
import shutil

import pytest
from ray.train import RunConfig

from ray_galaxy.config import TrainConfig
from ray_galaxy.streaming import load_datasets
from ray_galaxy.training.trainer import make_trainer
from synthetic import write_corrupt

TINY = dict(image_size=32, channels=(8, 16, 32, 32), latent_dim=4, batch_size=8, lr=3e-3,
            kl_warmup_epochs=0, epochs=2, num_workers=1, cpus_per_worker=0.5, tracking=False)


def _order(ds) -> list[str]:
    """The dataset's rows in the order one execution (= one epoch) delivers them."""
    return [hashlib.sha1(r["image"].tobytes()).hexdigest()[:12] for r in ds.iter_rows()]


@pytest.mark.parametrize("cache", ["off", "on"])
def test_each_epoch_has_its_own_seeded_order(ray_address, tiny_folder, cache):
    orders = []
    for _ in range(2):
        train, _, _ = load_datasets(str(tiny_folder), 32, 1.0, 0.2, cache=cache, seed=5)
        train.context.execution_options.preserve_order = True  # as training sets it (trainer._ingest_config)
        orders.append([_order(train) for _epoch in range(2)])
    first, second = orders
    assert first == second, "the same seed gives the same order, epoch by epoch"
    assert sorted(first[0]) == sorted(first[1]) and first[0] != first[1], "each epoch is a new order"
    other, _, _ = load_datasets(str(tiny_folder), 32, 1.0, 0.2, cache=cache, seed=6)
    other.context.execution_options.preserve_order = True
    assert _order(other) != first[0], "another seed, another order"


def _run(tmp_path, data: str, name: str, **kw) -> tuple[list[tuple[float, float]], dict]:
    """Train as the training job does; per-epoch (train loss, val loss) and the data stats."""
    cfg = TrainConfig(data=data, storage=str(tmp_path), name=name, **{**TINY, **kw})
    train, val, stats = load_datasets(cfg.data, cfg.image_size, cfg.crop, cfg.val_fraction, cache=cfg.cache,
                                      seed=cfg.seed)
    result = make_trainer(cfg, train, val, run_config=RunConfig(name=name, storage_path=str(tmp_path))).fit()
    stats.finish()
    history = result.metrics_dataframe
    return list(zip(history["train_loss"], history["val_loss"])), stats.to_dict()


def test_same_seed_same_losses_on_one_cpu_worker(ray_address, tiny_folder, tmp_path):
    """Exact equality: with one worker on CPU every step sees the same batches in the same order
    with the same augmentation and noise, and the same kernels add in the same order. Streamed,
    with three broken files the decode step skips and counts while training reads them."""
    data = tmp_path / "data"
    shutil.copytree(tiny_folder, data)
    write_corrupt(data / "broken")
    runs = [_run(tmp_path, str(data), f"run{i}", seed=3, cache="off") for i in range(2)]
    (losses, stats), (again, _) = runs
    assert len(losses) == 2 and losses == again, runs
    assert losses[0] != losses[1], "the two epochs differ"
    assert stats["skipped_by_reason"] == {"unreadable": 3} and stats["train_images"] + stats["val_images"] == 40
