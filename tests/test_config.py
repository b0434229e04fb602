"""Config: defaults, presets, YAML and flags, clear errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from ray_galaxy.config import ConfigError, TrainConfig, parse_config, PRESETS, resolve, train_config

REPO = Path(__file__).resolve().parent.parent


def test_unknown_yaml_key_lists_the_valid_ones(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("epochs: 3\nlatent_dims: 8\n")
    with pytest.raises(ConfigError) as e:
        train_config(p)
    msg = str(e.value)
    assert "'latent_dims'" in msg and "latent_dim" in msg and "kl_weight" in msg


def test_precedence_defaults_preset_yaml_flags(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("preset: seed\nepochs: 3\nlr: 0.01\n")
    cfg, _ = parse_config(TrainConfig, ["--config", str(p), "--lr", "0.5", "--crop", "0.5"], "t", PRESETS)
    assert cfg.epochs == 3  # yaml over default
    assert cfg.lr == 0.5  # flag over yaml
    assert cfg.crop == 0.5
    assert cfg.latent_dim == 4 and cfg.likelihood == "bce"  # preset 'seed'
    cfg2 = train_config(p, latent_dim=12)
    assert cfg2.latent_dim == 12 and cfg2.likelihood == "bce"  # explicit value beats the preset


def test_bad_values_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="epochs"):
        train_config(epochs="many")
    with pytest.raises(ConfigError, match="crop"):
        train_config(crop=1.5)
    with pytest.raises(ConfigError, match="image_size"):
        train_config(image_size=100)
    with pytest.raises(ConfigError, match="preset"):
        train_config(preset="fancy")


def test_channels_and_bools_parse_from_flags():
    cfg, _ = parse_config(TrainConfig, ["--channels", "8,16,32", "--use-gpu", "--no-use-gpu"], "t", PRESETS)
    assert cfg.channels == (8, 16, 32) and cfg.use_gpu is False


def test_cluster_train_yaml_is_the_default_config():
    """cluster/train.yaml documents the defaults: it must not drift from the dataclass."""
    assert train_config(REPO / "cluster" / "train.yaml") == TrainConfig()


def test_train_help_documents_every_flag():
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in out, name


def test_unknown_flag_and_bad_yaml_exit_with_usage_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("epochz: 3\n")
    r = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--config", str(p)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "epochz" in r.stderr and "valid keys" in r.stderr


def test_gz2_recipe_names_every_training_image_and_keeps_val_held_out():
    """cluster/gz2.yaml (README's Galaxy Zoo command): train/ and extra/ relative to the checkout,
    labels, crop, then adversarial fine-tuning; val/ is never read for training."""
    from conftest import GZ2

    cfg = train_config(REPO / "cluster" / "gz2.yaml")
    sources = cfg.data.split(",")
    assert sources == ["../shared/datasets/gz2/train", "../shared/datasets/gz2/extra"]
    assert cfg.labels == "../shared/datasets/gz2/labels.csv" and cfg.crop == 0.5 and cfg.finetune_epochs > 0
    assert all("val" not in s for s in sources)
    if not GZ2.is_dir():
        pytest.skip("the Galaxy Zoo 2 set is not next to this checkout")
    assert all((REPO / s).resolve().is_dir() for s in sources) and (REPO / cfg.labels).is_file()
    assert sum(len(list((REPO / s).glob("*.jpg"))) for s in sources) == 5907


def test_worker_counts_fixed_or_elastic_from_flags_and_yaml(tmp_path):
    """--num-workers 2 stays fixed; 1-4 (YAML [1, 4]) is elastic; a bad count names the field."""
    fixed, _ = parse_config(TrainConfig, ["--num-workers", "2"], "", presets=PRESETS)
    assert fixed.num_workers == 2 and not fixed.elastic
    elastic, _ = parse_config(TrainConfig, ["--num-workers", "1-4", "--batch-size", "8"], "", presets=PRESETS)
    assert (elastic.num_workers, elastic.min_workers, elastic.max_workers) == ((1, 4), 1, 4) and elastic.elastic
    assert elastic.to_dict()["num_workers"] == [1, 4]
    assert TrainConfig(**{**elastic.to_dict(), "channels": tuple(elastic.channels)}).num_workers == (1, 4)
    (tmp_path / "c.yaml").write_text("num_workers: [2, 3]\n")
    assert resolve(TrainConfig, tmp_path / "c.yaml", {}).num_workers == (2, 3)
    assert TrainConfig(num_workers=[3, 3]).num_workers == 3  # MIN == MAX: fixed
    for bad in ("0", "4-1", "two", "1-2-3", 1.5):
        with pytest.raises(ConfigError, match="num_workers"):
            TrainConfig(num_workers=bad)
    with pytest.raises(ConfigError, match="largest number of workers"):
        TrainConfig(num_workers="1-8", batch_size=4)


def test_elastic_workers_refuse_a_strict_placement():
    """Train's elastic policy counts workers by free resources alone: a strict strategy it cannot
    satisfy would wait for ever, so the combination is refused up front, naming both settings."""
    with pytest.raises(ConfigError, match="num_workers 1-2.*STRICT_SPREAD"):
        TrainConfig(num_workers="1-2", placement_strategy="STRICT_SPREAD")
    assert TrainConfig(num_workers=2, placement_strategy="STRICT_SPREAD").num_workers == 2
    for key in ("placement_tries", "max_preemptions"):  # -1 is "no limit"; below that is an error
        assert getattr(TrainConfig(**{key: -1}), key) == -1
        with pytest.raises(ConfigError, match=key):
            TrainConfig(**{key: -2})
