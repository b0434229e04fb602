"""Several data sources in one run: training, the sampler fit's image sets and prepare_data read
them as one collection, each file keeping the train/val side it has on its own."""

import pytest
import yaml

from ray_galaxy.config import ConfigError, TrainConfig, train_config
from ray_galaxy.data import DataError, data_sources, list_sources
from ray_galaxy.imageset import read_image_set, recorded_train_data, same_source
from ray_galaxy.prepare import PrepareConfig, prepare
from ray_galaxy.streaming import load_datasets
from synthetic import write_folder


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    write_folder(root / "a", 24, size=40, seed=1)
    write_folder(root / "b", 16, size=40, seed=2)
    return root / "a", root / "b"


def test_a_data_setting_names_one_or_several_sources():
    assert data_sources("s3://b/raw") == ["s3://b/raw"]
    assert data_sources("path/train, path/extra") == ["path/train", "path/extra"]
    for bad, why in [("a,,b", "empty source"), ("a,", "empty source"), ("a,a", "twice")]:
        with pytest.raises(DataError, match=why):
            data_sources(bad)


def test_yaml_lists_of_sources_become_one_setting(tmp_path):
    f = tmp_path / "recipe.yaml"
    f.write_text(yaml.safe_dump({"data": ["path/to/gz2/train", "path/to/gz2/extra"], "crop": 0.5}))
    assert train_config(f).data == "path/to/gz2/train,path/to/gz2/extra"
    assert PrepareConfig(input="a,b", output="o").input == "a,b"
    with pytest.raises(ConfigError, match="name: expected str"):
        train_config(None, name=["a", "b"])  # only settings that name sources take lists
    assert TrainConfig(data="a,b").data == "a,b"


def test_listing_keeps_each_files_path_relative_to_its_own_source(two_folders):
    a, b = two_folders
    fs, relative = list_sources([str(a), str(b)])
    assert len(relative) == 40
    assert relative[str(a / "gal_0001.png")] == "gal_0001.png"
    assert relative[str(b / "nested" / "gal_0000.png")] == "nested/gal_0000.png"


def test_training_reads_two_folders_as_one_with_each_files_split_kept(ray_address, two_folders):
    a, b = two_folders
    counts = {}
    for name, spec in {"a": str(a), "b": str(b), "both": f"{a},{b}"}.items():
        train, val, stats = load_datasets(spec, 32, 1.0, 0.25, cache="on", seed=0)
        counts[name] = (stats.train_images, stats.val_images)
        assert train.count() == stats.train_images and stats.files == {"a": 24, "b": 16, "both": 40}[name]
    assert counts["both"] == (counts["a"][0] + counts["b"][0], counts["a"][1] + counts["b"][1])


def test_image_sets_join_sources_and_keep_the_training_split(two_folders):
    a, b = two_folders
    spec = f"{a},{b}"
    whole = read_image_set(spec, 32, 1.0)
    assert whole.images.shape == (40, 32, 32, 3) and whole.info["files"] == 40
    train = read_image_set(spec, 32, 1.0, split="train", val_fraction=0.25)
    alone = [read_image_set(str(s), 32, 1.0, split="train", val_fraction=0.25) for s in (a, b)]
    assert sorted(train.paths) == sorted(alone[0].paths + alone[1].paths)
    assert len(read_image_set(spec, 32, 1.0, limit=10).images) == 10
    assert same_source(f"{b},{a}", spec) and not same_source(str(a), spec)
    assert recorded_train_data({"data": spec}) == spec
    assert recorded_train_data({"data": f"{a},{a.parent / 'gone'}"}) is None


def test_prepare_writes_several_inputs_into_one_output(ray_address, two_folders, tmp_path):
    a, b = two_folders
    out = tmp_path / "shards"
    manifest = prepare(PrepareConfig(input=f"{a},{b}", output=str(out), image_size=32, crop=1.0, min_size=16))
    assert manifest["read"] == 40 and manifest["written"] == 40
    train, val, stats = load_datasets(str(out), 32, 1.0, 0.25, cache="on", seed=0)
    files = load_datasets(f"{a},{b}", 32, 1.0, 0.25, cache="on", seed=0)[2]
    assert (stats.train_images, stats.val_images) == (files.train_images, files.val_images)
    with pytest.raises(DataError, match="mixes prepared outputs and folders"):
        load_datasets(f"{out},{a}", 32, 1.0, 0.25)
    # two prepared outputs read as one
    out2 = tmp_path / "shards2"
    prepare(PrepareConfig(input=str(b), output=str(out2), image_size=32, crop=1.0, min_size=16))
    train, val, both = load_datasets(f"{out},{out2}", 32, 1.0, 0.25, cache="on", seed=0)
    assert both.files == 56 and train.count() + val.count() == 56
