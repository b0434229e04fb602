"""The model directory: round trip, unfinished directories, and tensors-only loading."""

import json
import os

import pytest
import torch

from ray_galaxy.checkpoint import ModelDirError, load_model_dir, save_model_dir
from ray_galaxy.config import ModelConfig
from ray_galaxy.model import ConvVAE

CFG = ModelConfig(image_size=32, channels=(8, 16), latent_dim=3)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_round_trip_and_overwrite(tmp_path):
    m = ConvVAE(CFG)
    d = save_model_dir(str(tmp_path / "m"), m.state_dict(), CFG, extra_config={"train": {"x": 1}},
                       metrics={"best": {"val_loss": 1.0}}, files={"samples.png": b"png"})
    md = load_model_dir(d)
    assert md.config["train"] == {"x": 1} and md.metrics["best"]["val_loss"] == 1.0
    z = torch.zeros(1, 3)
    assert torch.equal(md.model.decode(z), m.eval().decode(z))
    m2 = ConvVAE(CFG)
    save_model_dir(d, m2.state_dict(), CFG)  # replacing an existing directory
    assert torch.equal(load_model_dir(d).model.decode(z), m2.eval().decode(z))
    assert [p.name for p in tmp_path.iterdir()] == ["m"], "no temporary folders left behind"


def test_unfinished_directory_is_refused(tmp_path):
    d = save_model_dir(str(tmp_path / "m"), ConvVAE(CFG).state_dict(), CFG)
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(ModelDirError, match="not a finished model directory"):
        load_model_dir(d)


def test_pickle_with_code_is_refused(tmp_path):
    d = save_model_dir(str(tmp_path / "m"), ConvVAE(CFG).state_dict(), CFG)
    torch.save({"weights": Evil()}, os.path.join(d, "model.pt"))
    with pytest.raises(ModelDirError, match="tensors-only"):
        load_model_dir(d)


def test_weights_that_do_not_match_the_config_are_named(tmp_path):
    d = save_model_dir(str(tmp_path / "m"), ConvVAE(CFG).state_dict(), CFG)
    cfg = json.loads(open(os.path.join(d, "config.json")).read())
    cfg["model"]["latent_dim"] = 5
    open(os.path.join(d, "config.json"), "w").write(json.dumps(cfg))
    with pytest.raises(ModelDirError, match="do not match config.json"):
        load_model_dir(d)
