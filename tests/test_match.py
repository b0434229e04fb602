"""Galaxies to order (--match): targets tables checked, draws near the requested properties, and
catalogues of them written locally and to S3, resumed byte for byte.

A copy of the session's model A gets a sampler fitted on 64 synthetic galaxies of sizes and
shapes spread wide, every fourth one non_spiral. At temperature 0 a draw is exactly its
kernel's code, so which training galaxy each row drew from can be read off.
"""

import io
import json
import shutil

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from serving import SIZE
from synthetic import galaxy
from tiny_model import SIZE as TINY_SIZE
from tiny_model import copy_fixture, tiny_fixture  # noqa: F401 - fixtures

from conftest import REPO
from ray_galaxy import morphology
from ray_galaxy.catalogue import CatalogueConfig, CatalogueError, generate_catalogue, plan_of, start_output
from ray_galaxy.generation.fit import fit_sampler
from ray_galaxy.generation.generator import Generator
from ray_galaxy.generation.match import MATCH_TRIES, MatchError, best_tries, read_targets, targets_from_table
from ray_galaxy.generation.properties import PROPERTIES, PROPERTY_NAMES
from ray_galaxy.images import png_bytes

N, ROWS, SHARD = 64, 40, 16


def _job():
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_job", REPO / "jobs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fitted(models, tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("match") / "model")
    shutil.copytree(models.a, uri)
    rng = np.random.default_rng(5)
    images = np.stack([galaxy(SIZE, rng, sigma=rng.uniform(1.5, 6.5), ellipticity=rng.uniform(0, 0.7))
                       for _ in range(N)])
    labels = ["non_spiral" if i % 4 == 3 else "spiral" for i in range(N)]
    fit_sampler(uri, images=images, image_labels=labels, components=2, detail=False)
    return uri, labels


@pytest.fixture(scope="module")
def targets_csv(fitted, tmp_path_factory):
    """ROWS requests of (r50_px, ellipticity) spread over the training galaxies' ranges."""
    props = Generator.load(fitted[0]).sampler.properties
    rng = np.random.default_rng(1)
    r50 = rng.uniform(np.nanmin(props["r50_px"]), np.nanmax(props["r50_px"]), ROWS)
    ell = rng.uniform(0, 0.6, ROWS)
    path = tmp_path_factory.mktemp("targets") / "targets.csv"
    path.write_text("r50_px,ellipticity\n" + "".join(f"{float(a)!r},{float(b)!r}\n" for a, b in zip(r50, ell)))
    return path


def _kernel_galaxies(gen: Generator, z: torch.Tensor) -> np.ndarray:
    codes = gen.sampler.tensors["kernel_codes"]
    kernel = torch.cdist(z.double(), codes.double()).argmin(1)
    assert torch.equal(codes[kernel], z), "temperature 0 draws a kernel's code"
    return (kernel % N).numpy()


def test_bad_targets_tables_are_one_line_errors_naming_the_column_or_row(tmp_path):
    def error(text: str, name: str = "t.csv") -> str:
        (tmp_path / name).write_text(text)
        with pytest.raises(MatchError) as e:
            read_targets(str(tmp_path / name))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "unknown column 'size'" in error("r50_px,size\n3,4\n") and "r50_px, flux, ellipticity" in error("size\n3\n")
    assert "row 1 (counting from 0 below the header), column 'flux': 'bright' is not a number" in \
        error("r50_px,flux\n3,40\n4,bright\n")
    assert "row 0 (counting from 0 below the header), column 'flux': is empty" in error("r50_px,flux\n3,\n")
    assert "row 1 (counting from 0 below the header), column 'flux': is nan, not a finite number" in \
        error("r50_px,flux\n3,4\n5,nan\n")
    assert "column 'gini': 'True' is not a number" in error("gini\ntrue\n")
    assert "no rows" in error("r50_px,flux\n") and "the file is empty" in error("")
    assert "must be a .csv or .parquet file" in error("r50_px\n3\n", "t.txt")
    assert "no property column" in str(pytest.raises(MatchError, targets_from_table, pa.table({}), "x.parquet").value)
    pq.write_table(pa.table({"colour": [0.1, float("inf")]}), tmp_path / "t.parquet")
    with pytest.raises(MatchError, match="t.parquet row 1 .*column 'colour': is inf, not a finite number"):
        read_targets(str(tmp_path / "t.parquet"))
    good = read_targets(str(_write(tmp_path / "ok.csv", "ellipticity,r50_px\n0.5,3\n0.1,7.25\n")))
    assert good.names == ("ellipticity", "r50_px") and good.values.tolist() == [[0.5, 3.0], [0.1, 7.25]]


def _write(path, text):
    path.write_text(text)
    return path


def test_each_row_draws_among_the_k_training_galaxies_nearest_in_spread_units(fitted, targets_csv):
    uri, labels = fitted
    gen = Generator.load(uri)
    targets = read_targets(str(targets_csv))
    props = gen.sampler.properties
    train = np.stack([props[p] for p in targets.names], axis=1)
    q1, q3 = np.nanpercentile(train, [25, 75], axis=0)
    d = (((targets.values[:, None, :] - train[None]) / ((q3 - q1) / 1.349)) ** 2).sum(-1)
    d[:, ~np.isfinite(train).all(1)] = np.inf
    rank = np.argsort(np.argsort(d, axis=1, kind="stable"), axis=1)  # rank of each galaxy per row
    z, galaxies = gen.matched_latents(targets, ROWS, seed=3, k=1, temperature=0)
    assert (rank[np.arange(ROWS), galaxies] == 0).all() and (_kernel_galaxies(gen, z) == galaxies).all()
    z, galaxies = gen.matched_latents(targets, ROWS, seed=3, k=4, temperature=0)
    assert (rank[np.arange(ROWS), galaxies] < 4).all() and (rank[np.arange(ROWS), galaxies] > 0).any()
    _, spirals = gen.matched_latents(targets, ROWS, seed=3, k=4, label="non_spiral")
    assert all(labels[i] == "non_spiral" for i in spirals)
    # Row i does not depend on the rows drawn with it (across a seed block's edge too).
    big = targets_from_table(pa.table({"r50_px": np.linspace(1, 9, 300)}), "big")
    whole = gen.matched_latents(big, 300, seed=9)[0]
    assert torch.equal(torch.cat([gen.matched_latents(big, 250, seed=9)[0],
                                  gen.matched_latents(big, 50, seed=9, start=250)[0]]), whole)
    with pytest.raises(MatchError, match="fewer than k = 65 to draw among; lower --match-k"):
        gen.matched_latents(targets, 1, k=65)
    with pytest.raises(MatchError, match="the prior N.0, I. has no training galaxies"):
        gen.matched_latents(targets, 1, sampler="prior")


def test_best_of_tries_keeps_the_draw_measured_nearest_to_the_request(tiny, copy):
    """make_tiny's model (its samples are measurable galaxies), its sampler fitted to its 48
    training galaxies; the requests: the sizes and ellipticities of its 24 held-out galaxies."""
    from ray_galaxy.imageset import load_images

    fit_sampler(copy, components=2, detail=False)
    gen = Generator.load(copy)
    held = morphology.measure_all(load_images(str(tiny["val"]), TINY_SIZE, 1.0)[0], ["r_half", "ellipticity"])
    values = np.stack([held["r_half"], held["ellipticity"]], axis=1)
    targets = targets_from_table(pa.table({"r50_px": values[:, 0], "ellipticity": values[:, 1]})
                                 .filter(pa.array(np.isfinite(values).all(1))), "held-out")
    rows = len(targets)
    spread = np.array([np.subtract(*np.nanpercentile(gen.sampler.properties[p], [75, 25])) / 1.349
                       for p in targets.names])

    def distance(measured: dict) -> np.ndarray:
        got = np.stack([measured[p] for p in targets.names], axis=1)
        d = np.sqrt((((got - targets.values) / spread) ** 2).sum(1))
        return np.where(np.isfinite(d), d, np.inf)

    tries = []  # each try of every row, decoded and measured on its own
    for t in range(4):
        z = gen.matched_latents(targets, rows, seed=3, k=4, attempt=t)[0]
        stats = morphology.measure_all(gen.decode_uint8(z), morphology.MEASURED)
        tries.append((z, distance({p: stats[stat] for p, (stat, _) in PROPERTIES.items()})))
    z1, _, m1 = gen.matched_images(targets, rows, seed=3, k=4, tries=1)
    assert torch.equal(z1, tries[0][0]), "one try is the single draw"
    z4, images, m4 = gen.matched_images(targets, rows, seed=3, k=4, tries=4)
    d_all = np.stack([d for _, d in tries])  # (tries, rows)
    np.testing.assert_array_equal(distance(m4), d_all.min(0))
    kept = d_all.argmin(0)
    assert torch.equal(z4, torch.stack([tries[t][0][i] for i, t in enumerate(kept)]))
    assert np.isfinite(d_all.min(0)).all() and (kept > 0).any()
    assert np.median(distance(m4)) < np.median(distance(m1)), "the best of four comes out nearer than one draw"
    np.testing.assert_array_equal(gen.decode_uint8(z4), images)
    # Row i's galaxy does not depend on the rows made with it.
    z_part, _, _ = gen.matched_images(targets, rows - 5, seed=3, start=5, k=4, tries=4)
    assert torch.equal(z_part, z4[5:])
    # An unmeasured try loses to any measured one; a row with none measured keeps the first.
    nan = float("nan")
    measured = np.array([[[nan], [5.0], [nan]], [[2.0], [nan], [nan]], [[9.0], [4.0], [nan]]])
    assert best_tries(np.array([[1.0], [1.0], [1.0]]), measured, np.array([1.0])).tolist() == [1, 2, 0]


def _rows(table: pa.Table) -> dict:
    return table.sort_by("index").to_pydict()


def test_match_catalogue_local_and_s3_resumes_byte_for_byte(fitted, targets_csv, ray_address, s3_endpoint, tmp_path,
                                                            capsys):
    uri = fitted[0]
    out = tmp_path / "cat"
    cfg = dict(model=uri, out=str(out), match=str(targets_csv), shard_size=SHARD, seed=2)
    manifest = generate_catalogue(CatalogueConfig(**cfg))
    names = [f"shard-00000{k}.parquet" for k in range(3)]
    assert sorted(p.name for p in (out / "shards").iterdir()) == names and manifest["n"] == ROWS
    rows = _rows(pq.read_table(out / "shards"))
    targets = read_targets(str(targets_csv))
    np.testing.assert_array_equal(np.stack([rows["requested_r50_px"], rows["requested_ellipticity"]], 1),
                                  targets.values)
    gen = Generator.load(uri)
    z, images, _ = gen.matched_images(targets, ROWS, seed=2)
    assert rows["image"] == [png_bytes(im) for im in images], "the Generator's galaxies, byte for byte"
    np.testing.assert_array_equal(np.array(rows["latent"], np.float32), z.numpy().astype(np.float32))
    measured = morphology.measure_all(images, morphology.MEASURED)  # measured again, from the PNGs' pixels
    for p, (stat, _) in PROPERTIES.items():
        np.testing.assert_array_equal(rows[f"measured_{p}"], measured[stat])
    assert manifest["columns"][-len(PROPERTY_NAMES):] == [f"measured_{p}" for p in PROPERTY_NAMES]

    # To S3 through the job, the targets there too, into a prefix where a run was stopped after
    # two of the three shards (its settings and those shards, no manifest): it makes the third,
    # and every shard is the local run's bytes.
    before = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="match")
    s3.upload_file(str(targets_csv), "match", "in/targets.csv")
    s3.upload_file(str(out / "settings.json"), "match", "cat/settings.json")
    for name in names[:2]:
        s3.upload_file(str(out / "shards" / name), "match", f"cat/shards/{name}")
    capsys.readouterr()
    assert _job().main(["--model", uri, "--match", "s3://match/in/targets.csv", "--out", "s3://match/cat",
                        "--seed", "2", "--shard-size", str(SHARD)]) == 0
    assert "2 already written, 1 to generate" in capsys.readouterr().out
    for name in names:
        assert s3.get_object(Bucket="match", Key=f"cat/shards/{name}")["Body"].read() == before[name]
    assert json.loads(s3.get_object(Bucket="match", Key="cat/manifest.json")["Body"].read())["n"] == ROWS
    settings = json.loads(s3.get_object(Bucket="match", Key="cat/settings.json")["Body"].read())
    assert settings["match"]["columns"] == ["r50_px", "ellipticity"] and settings["match"]["k"] == 8
    assert settings["match"]["tries"] == MATCH_TRIES
    table = pq.read_table(io.BytesIO(s3.get_object(Bucket="match", Key=f"cat/shards/{names[2]}")["Body"].read()))
    assert table.column("index").to_pylist() == list(range(32, ROWS))


def test_match_job_errors_are_one_line(fitted, targets_csv, tmp_path, capsys):
    uri = fitted[0]
    bad = _write(tmp_path / "bad.csv", "r50_px,radius\n3,4\n")
    assert _job().main(["--model", uri, "--match", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown column 'radius'" in err
    assert _job().main(["--model", uri, "--match", str(targets_csv), "--n", "5", "--out", str(tmp_path / "o")]) == 2
    assert f"has {ROWS} rows: with --match the catalogue has one galaxy per row" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _job().main(["--model", uri, "--match", str(targets_csv), "--format", "png", "--out", str(tmp_path / "o")])
    assert "use --format parquet" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # A resume asked another table (or k) is refused, naming what differs; nothing is generated.
    other = _write(tmp_path / "other.csv", "r50_px\n3\n4\n")
    start_output(plan_of(CatalogueConfig(model=uri, out=str(tmp_path / "c"), match=str(targets_csv)))[0])
    with pytest.raises(CatalogueError, match=r"holds galaxies of other settings \(match .*'columns': \['r50_px', "
                                             r"'ellipticity'\].* there, .*'columns': \['r50_px'\]"):
        start_output(plan_of(CatalogueConfig(model=uri, out=str(tmp_path / "c"), match=str(other)))[0])


def test_the_evaluation_compares_requested_with_measured_and_with_the_nearest_real_galaxy(tiny, copy, tmp_path):
    """make_tiny's model (its samples are measurable galaxies), its sampler fitted to its 48
    training galaxies, its 24 held-out galaxies the requests."""
    from ray_galaxy.evaluation import properties as P
    from ray_galaxy.evaluation.config import EvaluateConfig
    from ray_galaxy.evaluation.report import Figures, _properties
    from ray_galaxy.imageset import load_images

    fit_sampler(copy, components=2, detail=False)
    gen = Generator.load(copy)
    held = load_images(str(tiny["val"]), TINY_SIZE, 1.0)[0]
    m_real = morphology.measure_all(held, morphology.MEASURED)
    m_uncond = morphology.measure_all(gen.images(24, 0, detail=False))
    real = P.as_properties(m_real)
    cut = float(np.sort(real["r50_px"])[-21])  # 21 held-out galaxies at or above it
    cfg = EvaluateConfig(model=copy, data="unused", out=str(tmp_path), n=40, sampler="gmm", detail=False,
                         where=f"r50_px >= {cut}")
    out = P.score_properties(cfg, gen, Figures(tmp_path), m_real, m_uncond)
    match = out["match"]
    values = np.stack([real[p] for p in P.REQUESTED], axis=1)
    ok = np.isfinite(values).all(1)
    assert match["requests"] == ok.sum() >= 20 and list(match["per_property"]) == list(P.REQUESTED)
    # The floor, recomputed: each request's nearest other held-out galaxy by the training
    # galaxies' spread-scaled distance, its error in the held-out set's spread.
    req = values[ok]
    train = np.stack([gen.sampler.properties[p] for p in P.REQUESTED], axis=1)
    q1, q3 = np.nanpercentile(train, [25, 75], axis=0)
    d2 = (((req[:, None] - req[None]) / (q3 - q1)) ** 2).sum(-1) + np.diag(np.full(len(req), np.inf))
    nn = req[d2.argmin(1)]
    r1, r3 = np.percentile(req, [25, 75], axis=0)
    floor = np.median(np.abs(nn - req) / ((r3 - r1) / 1.349), axis=0)
    assert [match["per_property"][p]["floor"] for p in P.REQUESTED] == pytest.approx(floor.tolist())
    for v in match["per_property"].values():
        assert v["failed"] < 0.5 and v["ratio"] == pytest.approx(v["generated"] / v["floor"])
    (row,) = out["where"]
    assert row["real"] == 21 and row["skipped"] is None
    assert 0 <= row["distance_selected"] and 0 <= row["distance_unconditional"] and row["distance_floor"] > 0
    assert (tmp_path / "requested_vs_measured.png").read_bytes()[:4] == b"\x89PNG"
    lines = "\n".join(_properties(out))
    assert "## Galaxies to order" in lines and f"| `r50_px >= {cut}` | 21 |" in lines

    # Too few: a selection that 3 held-out galaxies satisfy, 19 requests; off; the prior.
    few = dict(cfg.to_dict(), where=f"r50_px >= {float(np.sort(real['r50_px'])[-3])}")
    thin = P.score_properties(EvaluateConfig(**few), gen, Figures(tmp_path), {k: v[:19] for k, v in m_real.items()},
                              m_uncond)
    assert "19 held-out galaxies have r50_px, flux, ellipticity, colour all measured" in thin["match"]["skipped"]
    assert "fewer than 20" in thin["where"][0]["skipped"]
    assert P.score_properties(EvaluateConfig(**dict(few, properties=False)), gen, None, m_real, m_uncond) is None
    prior = P.score_properties(EvaluateConfig(**dict(few, sampler="prior")), gen, None, m_real, m_uncond)
    assert "draws from no training galaxies" in prior["skipped"]
