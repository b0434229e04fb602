"""Training galaxies' properties kept with the sampler, and draws selected by them (--where).

A copy of the session's model A gets a sampler fitted on 64 synthetic galaxies, half small and
half large, in two classes; at temperature 0 a draw is exactly its kernel's code, so which
training galaxy every draw came from can be read off and its measured properties checked.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from serving import SIZE
from synthetic import galaxy

from conftest import REPO
from ray_galaxy import morphology
from ray_galaxy.generation.fit import fit_sampler
from ray_galaxy.generation.generator import Generator
from ray_galaxy.generation.properties import MIN_MATCHES, PROPERTIES, PROPERTY_NAMES
from ray_galaxy.generation.sampler import MixtureSampler, save_sampler
from ray_galaxy.generation.where import WhereError

N = 64


def _job(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_job", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fitted(models, tmp_path_factory):
    """(model directory, its training images): sizes alternate large / small; every fourth galaxy
    (a small one) is non_spiral, so 'spiral' has 32 large and 16 small galaxies."""
    uri = str(tmp_path_factory.mktemp("props") / "model")
    shutil.copytree(models.a, uri)
    rng = np.random.default_rng(11)
    images = np.stack([galaxy(SIZE, rng, sigma=(2.5 if i % 2 else 5.5)) for i in range(N)])
    fit_sampler(uri, images=images, image_labels=[_label(i) for i in range(N)],
                components=2, detail=False)
    return uri, images


def _label(i: int) -> str:
    return "non_spiral" if i % 4 == 3 else "spiral"


def _picked_images(gen: Generator, z: torch.Tensor) -> np.ndarray:
    """The training image of each temperature-0 draw (its kernel is its code exactly)."""
    codes = gen.sampler.tensors["kernel_codes"]
    kernel = torch.cdist(z.double(), codes.double()).argmin(1)
    assert torch.equal(codes[kernel], z), "temperature 0 draws a kernel's code"
    return (kernel % N).numpy()


def test_properties_are_stored_with_the_sampler_and_reloaded(fitted):
    uri, images = fitted
    meta = json.loads(open(f"{uri}/sampler.json").read())
    assert meta["properties"] == list(PROPERTY_NAMES)
    gen = Generator.load(uri)
    assert gen.sampler.tensors["image_properties"].shape == (N, len(PROPERTY_NAMES))
    measured = morphology.measure_all(images, morphology.MEASURED)
    for name, (stat, _) in PROPERTIES.items():
        np.testing.assert_array_equal(gen.sampler.properties[name], measured[stat])
    small, large = gen.sampler.properties["r50_px"][1::2], gen.sampler.properties["r50_px"][0::2]
    assert small.max() < large.min()  # the sizes were made apart: r50_px tells them apart
    ranges = gen.property_ranges()
    assert list(ranges) == list(PROPERTY_NAMES) and ranges["r50_px"]["unit"] == "px"
    assert ranges["r50_px"]["min"] == small.min() and ranges["r50_px"]["max"] == large.max()
    assert ranges["flux"]["measured"] == N and ranges["flux"]["min"] < ranges["flux"]["median"] < ranges["flux"]["max"]


def test_a_where_draw_uses_only_the_kernels_that_satisfy_it(fitted):
    gen = Generator.load(fitted[0])
    r50 = gen.sampler.properties["r50_px"]
    cut = float(np.median(r50))
    anywhere = _picked_images(gen, gen.latents(256, 3, temperature=0))
    assert (r50[anywhere] < cut).any() and (r50[anywhere] >= cut).any()  # unselected draws take both
    picked = _picked_images(gen, gen.latents(256, 3, temperature=0, where=f"r50_px >= {cut}"))
    assert (r50[picked] >= cut).all() and len(set(picked)) > 15  # only large ones, many of them

    both = f"r50_px >= {cut} and ellipticity >= 0"
    picked = _picked_images(gen, gen.latents(256, 5, temperature=0, label="spiral", where=both))
    assert (r50[picked] >= cut).all() and all(_label(i) == "spiral" for i in picked)
    # A selection that every galaxy satisfies draws exactly what no selection draws.
    assert torch.equal(gen.latents(300, 7, where="r50_px > 0"), gen.latents(300, 7))


def test_too_few_matches_and_unusable_samplers_are_clear_errors(fitted, models):
    uri = fitted[0]
    gen = Generator.load(uri)
    cut = float(np.sort(gen.sampler.properties["r50_px"])[N - MIN_MATCHES + 1])  # 19 at or above
    with pytest.raises(WhereError, match=f"where 'r50_px >= {cut}': 19 of the 64 training galaxies match "
                                         r"\(152 kernels\), fewer than the 20"):
        gen.latents(4, 0, where=f"r50_px >= {cut}")
    with pytest.raises(WhereError, match="of the 48 training galaxies of class 'spiral' match"):
        gen.latents(4, 0, where=f"r50_px >= {cut}", label="spiral")
    with pytest.raises(WhereError, match="the prior N.0, I. has no training galaxies"):
        gen.latents(4, 0, sampler="prior", where="r50_px > 0")
    # A sampler fitted before properties were kept (an older model directory): refit it.
    old = {k: v for k, v in gen.sampler.tensors.items() if k != "image_properties"}
    save_sampler(uri, MixtureSampler(old, {k: v for k, v in gen.sampler.meta.items() if k != "properties"}))
    try:
        older = Generator.load(uri)
        assert older.property_ranges() is None and older.latents(2, 0).shape == (2, 4)  # still draws
        with pytest.raises(WhereError, match=f"fitted without them.*refit the sampler: python jobs/fit_sampler.py "
                                             f"--model {uri}$"):
            older.latents(2, 0, where="r50_px > 0")
    finally:
        save_sampler(uri, gen.sampler)
    # A sampler without kernels (bandwidth 0) draws from components: nothing to select.
    components = {k: v for k, v in gen.sampler.tensors.items() if k not in ("kernel_codes", "kernel_bandwidth")}
    with pytest.raises(WhereError, match="needs a sampler with kernels"):
        Generator(gen.model_dir, MixtureSampler(components, gen.sampler.meta), None).latents(2, 0, where="r50_px > 0")


def test_sample_job_where_writes_the_generators_galaxies(fitted, tmp_path, capsys):
    uri = fitted[0]
    gen = Generator.load(uri)
    where = f"r50_px >= {float(np.median(gen.sampler.properties['r50_px']))}"
    out = tmp_path / "big"
    assert _job("sample").main(["--model", uri, "--n", "3", "--out", str(out), "--where", where]) == 0
    written = np.stack([np.asarray(Image.open(out / f"sample_{i:05d}.png")) for i in range(3)])
    np.testing.assert_array_equal(written, gen.images(3, 0, where=where))
    assert not np.array_equal(written, gen.images(3, 0))
    assert _job("sample").main(["--model", uri, "--n", "3", "--out", str(tmp_path / "x"), "--where", "size > 2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: where 'size > 2': unknown property 'size'") and "known properties: r50_px, flux" in err
    assert not (tmp_path / "x").exists()  # refused before writing anything
    assert _job("generate").main(["--model", uri, "--n", "8", "--out", str(tmp_path / "c"), "--where", "r50_px > 99"]) == 2
    assert "0 of the 64 training galaxies match" in capsys.readouterr().err


def test_generate_job_where_writes_the_generators_galaxies(fitted, ray_address, tmp_path):
    import pyarrow.parquet as pq

    uri = fitted[0]
    gen = Generator.load(uri)
    where = f"r50_px >= {float(np.median(gen.sampler.properties['r50_px']))}"
    out = tmp_path / "cat"
    assert _job("generate").main(["--model", uri, "--n", "6", "--out", str(out), "--shard-size", "8",
                                  "--where", where, "--no-detail"]) == 0
    assert json.loads((out / "manifest.json").read_text())["where"] == where
    rows = pq.read_table(out / "shards").to_pydict()
    np.testing.assert_array_equal(np.asarray(rows["latent"], np.float32), gen.latents(6, 0, where=where).numpy())


def test_measuring_on_a_process_pool_gives_the_same_values_in_the_same_order(fitted):
    images = fitted[1][:12]
    alone = morphology.measure_all(images, morphology.MEASURED, workers=1)
    pooled = morphology.measure_all(images, morphology.MEASURED, workers=2)
    for stat in morphology.MEASURED:
        np.testing.assert_array_equal(pooled[stat], alone[stat])
    assert len(set(alone["r_half"].tolist())) == 12  # every image differs: a reordering would show
