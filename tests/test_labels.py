"""Conditional generation: labels CSVs, the per-label sampler, the Generator's label errors and
the jobs that draw one class (jobs/fit_sampler.py, jobs/sample.py, jobs/generate.py, prepare)."""

import importlib.util
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from synthetic import galaxy
from tiny_model import SIZE, copy_fixture, tiny_fixture  # noqa: F401 (the tiny and copy fixtures)

from conftest import REPO
from ray_galaxy.checkpoint import load_model_dir
from ray_galaxy.config import train_config
from ray_galaxy.generation.fit import fit_sampler
from ray_galaxy.generation.generator import Generator, LabelError
from ray_galaxy.generation.sampler import MixtureSampler, fit_codes
from ray_galaxy.imageset import load_images, read_image_set
from ray_galaxy.labels import LabelsError, describe_labels, label_counts, labels_for, parse_labels, read_labels

CLASSES = ["non_spiral", "spiral"]


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_job", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _class_of(i: int) -> str:
    return CLASSES[i % 2]


def write_tiny_labels(path, n: int = 48, missing: tuple[int, ...] = (5, 6)) -> None:
    """Labels of tiny_model's g000.png ..: keyed by stem (even) or file name (odd), GZ2's columns."""
    rows = ["id,split,morphology"] + [f"{f'g{i:03d}' if i % 2 == 0 else f'g{i:03d}.png'},train,{_class_of(i)}"
                                      for i in range(n) if i not in missing]
    path.write_text("\n".join(rows) + "\n")


# --------------------------------------------------------------------------- the CSV


def test_labels_match_by_stem_or_file_name_and_pick_the_class_column(tmp_path):
    gz2 = parse_labels("id,split,morphology\n101654,train,non_spiral\n101997.jpg,val,spiral\n", "gz2.csv")
    assert gz2.label_column == "morphology" and gz2.classes == CLASSES
    got = labels_for(["train/101654.jpg", "s3-bucket/val/101997.jpg", "train/999.jpg"], gz2)
    assert got == ["non_spiral", "spiral", None]  # by stem, by file name, unlabelled
    assert label_counts(got) == {"non_spiral": 1, "spiral": 1}
    assert "2 of 3 images labelled (non_spiral 1, spiral 1); 1 without a label" in describe_labels(got, "gz2.csv")
    named = parse_labels("file,Class,weight\nfolder/a.png,bar,0.3\nb.png,,0.1\n", "x.csv")
    assert named.label_column == "Class" and named.by_key == {"a.png": "bar"}  # named column; empty cell: none
    last = parse_labels("\ufefffile,x,kind\na,1,p\n", "y.csv")  # no named column: the last one
    assert last.key_column == "file" and last.by_key == {"a": "p"}
    f = tmp_path / "labels.csv"
    f.write_bytes("\ufeffid,label\n7,q\n".encode())  # a spreadsheet's BOM is not part of the key
    assert read_labels(str(f)).by_key == {"7": "q"} and read_labels(f"file://{f}").classes == ["q"]


def test_a_bad_labels_csv_is_refused_naming_the_file_and_line(tmp_path):
    f = tmp_path / "bad.csv"
    for text, match in [("", "empty"), ("id\n1\n", "has one column"), ("id,label\n1,a\n2\n", "line 3: 1 columns"),
                        ("id,label\n1,a\n1.jpg,a\n1,b\n", "line 4: '1' is labelled both 'a' and 'b'"),
                        ("id,label\n1,\n", "no labelled rows")]:
        f.write_text(text)
        with pytest.raises(LabelsError, match=match) as e:
            read_labels(str(f))
        assert str(f) in str(e.value)
    with pytest.raises(LabelsError, match="cannot read labels file .*nope.csv"):
        read_labels(str(tmp_path / "nope.csv"))
    with pytest.raises(LabelsError, match=r"none of the 2 images matches a key \(keys look like 'x1'"):
        labels_for(["a/1.png", "b.png"], parse_labels("id,label\nx1,a\n", "k.csv"))


def test_train_config_records_a_labels_csv():
    assert train_config().labels is None and train_config().to_dict()["labels"] is None
    assert train_config(labels="path/labels.csv").to_dict()["labels"] == "path/labels.csv"


def test_training_refuses_a_bad_labels_csv_before_it_starts(tmp_path, capsys):
    from ray_galaxy.training.trainer import main_entry

    bad = tmp_path / "labels.csv"
    bad.write_text("id\n")  # a header and no rows
    for labels in (str(bad), str(tmp_path / "missing.csv")):
        assert main_entry(train_config(labels=labels, storage=str(tmp_path), epochs=1)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and labels in err and "Traceback" not in err
        assert not (tmp_path / "galaxy-vae").exists()  # nothing trained, no run folder


# --------------------------------------------------------------------------- the per-label sampler


def _synthetic(bandwidth: float) -> dict[str, torch.Tensor]:
    """Four far-apart codes of two components; with kernels unless bandwidth is 0."""
    codes = torch.tensor([[10.0, 0.0], [-10.0, 5.0], [0.0, -20.0], [20.0, 20.0]])
    t = {"weights": torch.tensor([0.5, 0.5], dtype=torch.float64),
         "means": torch.tensor([[10.0, 0.0], [-10.0, 5.0]], dtype=torch.float64),
         "covariances": torch.eye(2, dtype=torch.float64).repeat(2, 1, 1) * 0.01}
    if bandwidth > 0:
        t.update({"kernel_codes": codes, "kernel_component": torch.tensor([0, 1, 1, 0]),
                  "kernel_bandwidth": torch.tensor(bandwidth, dtype=torch.float64)})
    return t


def test_a_labels_draws_come_only_from_its_kernels_and_unconditional_draws_do_not_change():
    codes = _synthetic(0.5)["kernel_codes"].double().numpy()
    plain = MixtureSampler(_synthetic(0.5), {})
    labelled = MixtureSampler({**_synthetic(0.5), "kernel_label": torch.tensor([0, 1, -1, 0])},
                              {"labels": ["a", "b"]})
    assert labelled.labels == ["a", "b"] and plain.labels == []
    assert torch.equal(labelled.latents(500, seed=3), plain.latents(500, seed=3))  # byte-identical
    for label, own in (("a", {0, 3}), ("b", {1})):
        z = labelled.latents(2000, seed=3, label=label).double().numpy()
        nearest = np.argmin(((z[:, None] - codes[None]) ** 2).sum(-1), 1)
        assert set(nearest.tolist()) == own  # only that class's kernels, each of them drawn
        assert torch.equal(labelled.latents(7, seed=3, label=label), labelled.latents(7, seed=3, label=label))
    assert not torch.equal(labelled.latents(7, seed=3, label="a"), labelled.latents(7, seed=3))
    with pytest.raises(LabelError, match="unknown label 'c'; valid labels are: a, b"):
        labelled.latents(3, label="c")
    with pytest.raises(LabelError, match="fitted without labels"):
        plain.latents(3, label="a")
    # bandwidth 0: the component of a random code of that class
    comps = MixtureSampler({**_synthetic(0), "kernel_component": torch.tensor([0, 1, 1, 0]),
                            "kernel_label": torch.tensor([1, 0, 0, 1])}, {"labels": ["a", "b"]})
    z = comps.latents(300, seed=1, label="a").numpy()
    assert np.abs(z - [-10.0, 5.0]).max() < 1  # class a's codes are all in component 1
    assert torch.equal(comps.latents(50, seed=1), MixtureSampler(_synthetic(0), {}).latents(50, seed=1))


def test_fitting_with_labels_keeps_the_mixture_and_tags_each_code(tiny):
    model = load_model_dir(tiny["model"]).model
    imgs = np.stack([galaxy(SIZE, np.random.default_rng(i)) for i in range(10)])
    labels = [_class_of(i) for i in range(9)] + [None]
    t0, m0, _ = fit_codes(model, imgs, components=2)
    t1, m1, _ = fit_codes(model, imgs, components=2, labels=labels)
    assert set(t1) - set(t0) == {"kernel_label"} and all(torch.equal(t0[k], t1[k]) for k in t0)
    assert t1["kernel_label"].tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0, -1] * 8  # each image in 8 orientations
    assert m1["labels"] == CLASSES and m1["label_counts"] == {"non_spiral": 5, "spiral": 4}
    assert m1["unlabelled_images"] == 1 and m0["labels"] == []
    assert torch.equal(MixtureSampler(t0, m0).latents(300, seed=2), MixtureSampler(t1, m1).latents(300, seed=2))
    with pytest.raises(ValueError, match="one class .* per image: 9 for 10"):
        fit_codes(model, imgs, components=2, labels=labels[:9])


# --------------------------------------------------------------------------- the Generator


def test_the_generator_names_valid_labels_and_says_when_a_model_has_none(copy, tiny):
    imgs = np.stack([galaxy(SIZE, np.random.default_rng(i)) for i in range(12)])
    gen = Generator.load(copy)  # no sampler at all
    assert gen.labels == []
    with pytest.raises(LabelError, match="has no usable sampler .*fit_sampler.py --model .* --labels CSV"):
        gen.latents(2, label="spiral")
    fit_sampler(copy, images=imgs, components=2, detail=False)
    with pytest.raises(LabelError, match=f"^{copy} was trained without labels; retrain with --labels CSV"):
        Generator.load(copy).check_label("spiral")
    fit_sampler(copy, images=imgs, components=2, detail=False, image_labels=[_class_of(i) for i in range(12)])
    gen = Generator.load(copy)
    assert gen.labels == CLASSES and gen.sampler.summary()["labels"] == CLASSES
    gen.check_label(None)
    gen.check_label("spiral")
    with pytest.raises(LabelError, match=r"^unknown label 'bar'; valid labels are: non_spiral, spiral$"):
        gen.images(2, label="bar")
    with pytest.raises(LabelError, match="prior N\\(0, I\\) has no classes"):
        gen.latents(2, sampler="prior", label="spiral")
    assert isinstance(LabelError("x"), ValueError)  # Serve's 4xx
    # galaxy i of a class depends on (seed, i, label) only, across seed blocks too
    z = gen.latents(260, seed=4, label="spiral")
    torch.testing.assert_close(gen.latents(6, seed=4, start=254, label="spiral"), z[254:])
    np.testing.assert_array_equal(gen.images(3, 4, label="spiral"), gen.images(5, 4, label="spiral")[:3])
    assert not torch.equal(z[:5], gen.latents(5, seed=4, label="non_spiral"))
    with pytest.raises(ValueError, match="pass image_labels"):
        fit_sampler(copy, images=imgs, labels="labels.csv")


# --------------------------------------------------------------------------- the jobs


def test_fit_sampler_with_labels_then_sample_and_generate_one_class(tiny, copy, tmp_path, capsys, ray_address):
    csv = tmp_path / "labels.csv"
    write_tiny_labels(csv)
    assert _job("fit_sampler").main(["--model", copy, "--labels", str(csv), "--components", "2"]) == 0
    log = capsys.readouterr().out
    assert "without a label join no class" in log and "per label: non_spiral (" in log
    meta = json.loads((tmp_path / "model" / "sampler.json").read_text())
    assert meta["labels"] == CLASSES and meta["labels_source"] == str(csv) and meta["detail"]
    assert sum(meta["label_counts"].values()) + meta["unlabelled_images"] == meta["train_images"]
    gen = Generator.load(copy)
    out = tmp_path / "spirals"
    assert _job("sample").main(["--model", copy, "--n", "3", "--out", str(out), "--label", "spiral"]) == 0
    written = sorted(out.iterdir())
    assert [p.name for p in written] == [f"sample_{i:05d}.png" for i in range(3)]
    np.testing.assert_array_equal(np.stack([np.asarray(Image.open(p)) for p in written]),
                                  gen.images(3, 0, label="spiral"))
    assert _job("sample").main(["--model", copy, "--n", "3", "--out", str(tmp_path / "x"), "--label", "bar"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: unknown label 'bar'; valid labels are: non_spiral, spiral"
    assert not (tmp_path / "x").exists()  # refused before writing anything
    cat = tmp_path / "cat"
    assert _job("generate").main(["--model", copy, "--n", "10", "--out", str(cat), "--shard-size", "8",
                                  "--label", "non_spiral"]) == 0
    manifest = json.loads((cat / "manifest.json").read_text())
    assert manifest["label"] == "non_spiral" and manifest["n"] == 10
    rows = pq.read_table(cat / "shards").to_pydict()
    assert rows["label"] == ["non_spiral"] * 10
    np.testing.assert_array_equal(np.asarray(rows["latent"], np.float32),
                                  gen.latents(10, 0, label="non_spiral").numpy())
    assert _job("generate").main(["--model", copy, "--n", "8", "--out", str(tmp_path / "c2"), "--label", "bar"]) == 2
    assert "valid labels are: non_spiral, spiral" in capsys.readouterr().err


def test_prepared_shards_store_labels_so_the_sampler_needs_no_csv(tiny, copy, tmp_path, ray_address):
    from ray_galaxy.prepare import PrepareConfig, prepare

    src = tmp_path / "raw"
    src.mkdir()
    for i in range(8):
        shutil.copy(tiny["train"] / f"g{i:03d}.png", src / f"g{i:03d}.png")
    csv = tmp_path / "labels.csv"
    write_tiny_labels(csv, n=8)
    out = tmp_path / "prepared"
    m = prepare(PrepareConfig(input=str(src), output=str(out), image_size=SIZE, crop=1.0, labels=str(csv),
                              rows_per_shard=4))
    assert m["labels"] == {"source": str(csv), "classes": CLASSES, "counts": {"non_spiral": 3, "spiral": 3},
                           "unlabelled": 2}
    found = read_image_set(str(out), SIZE, 1.0)
    assert sorted(zip(found.paths, found.labels)) == [(f"g{i:03d}.png", None if i in (5, 6) else _class_of(i))
                                                      for i in range(8)]
    assert found.info["labels_source"] == str(csv)
    images, _ = load_images(str(out), SIZE, 1.0)  # the old interface still works
    np.testing.assert_array_equal(images, found.images)
    meta = fit_sampler(copy, train_data=str(out), components=2, detail=False)
    assert meta["labels"] == CLASSES and meta["label_counts"] == {"non_spiral": 3, "spiral": 3}
