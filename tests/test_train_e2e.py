"""End to end: jobs/train.py and jobs/sample.py as real subprocesses on the shared Ray cluster."""

import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, job_env
from ray_galaxy.checkpoint import load_model_dir

TINY = ["--image-size", "32", "--channels", "8,16,32,32", "--latent-dim", "4", "--batch-size", "8",
        "--lr", "3e-3", "--kl-warmup-epochs", "0"]


# Two likelihood epochs, then two of adversarial fine-tuning (augmentation, R1, sampler codes):
# the critic's two-worker path, its checkpoint and its resume run here too.
CRITIC = ["--finetune-epochs", "2", "--adv-weight", "0.5", "--r1-gamma", "1", "--adv-sample-share", "0.5"]


def run_job(args, timeout=600):
    r = subprocess.run([sys.executable, *args], cwd=REPO, env=job_env(), capture_output=True,
                       text=True, timeout=timeout)
    return r


@pytest.fixture(scope="module")
def trained(ray_address, tiny_folder, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    r = run_job(["jobs/train.py", "--data", str(tiny_folder), "--storage", str(storage), "--name", "e2e",
                 "--epochs", "2", "--num-workers", "2", "--cpus-per-worker", "0.5", *TINY, *CRITIC])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return storage, r


def test_train_job_writes_a_complete_model_directory(trained):
    storage, r = trained
    model_dir = storage / "e2e" / "model"
    assert f"model directory: {model_dir}" in r.stdout
    assert {"model.pt", "config.json", "metrics.json", "samples.png", "traversal.png"} <= {
        p.name for p in model_dir.iterdir()}
    metrics = json.loads((model_dir / "metrics.json").read_text())
    hist = metrics["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    assert hist[-1]["val_loss"] < hist[0]["val_loss"], "validation loss should fall"
    assert all(h["workers"] == 2 for h in hist)
    # both workers' shards cover the training split every epoch; the equal split may hold back
    # at most (workers - 1) images to keep the DDP ranks in step
    total = metrics["data"]["train_images"]
    assert all(total - 1 <= h["train_images"] <= total for h in hist)
    assert metrics["data"]["skipped"] == 0
    for line in ("epoch 1/4", "img/s", "ETA"):
        assert line in r.stdout
    # the two-stage sampler is fitted into the directory and drew samples.png
    sampler = json.loads((model_dir / "sampler.json").read_text())
    assert sampler["train_images"] == total and sampler["detail"]["k_min"] == 2
    assert "residual detail" in r.stderr + r.stdout and "samples.png and traversal.png redrawn" in r.stderr + r.stdout
    assert f"mixture and kernels, and residual detail, taken over from {storage / 'e2e' / 'likelihood-model'}" in r.stdout
    assert sampler["kernels"] == "codes" and "drawing from kernels on the codes (bandwidth 0.45)" in r.stderr + r.stdout
    assert all(h["steps_skipped"] == 0 and h["lr_now"] > 0 for h in hist)
    assert hist[1]["lr_now"] < hist[0]["lr_now"]  # cosine schedule, then fine-tuning's constant step
    assert hist[2]["lr_now"] == hist[3]["lr_now"] == 2e-4
    # The fine-tuning phase: the encoder frozen, so the likelihood model's codes and sampler kernels
    # carry over, and the residual detail the critic judged the decoder's images with.
    first = storage / "e2e" / "likelihood-model"
    assert json.loads((first / "metrics.json").read_text())["epochs_run"] == 2
    assert sampler["codes_from"] == str(first) and sampler["detail"]["kept"]
    assert sampler["detail"]["gain"] == json.loads((first / "sampler.json").read_text())["detail"]["gain"]
    fine, like = load_model_dir(str(model_dir)).model, load_model_dir(str(first)).model
    assert torch.equal(fine.fc_mu.weight, like.fc_mu.weight) and torch.equal(fine.encoder[0].weight, like.encoder[0].weight)
    assert not torch.equal(fine.last_layer(), like.last_layer())
    assert all(0 <= h["critic_acc_real"] <= 1 and h["adv_lambda"] > 0 and h["critic_r1"] >= 0 for h in hist[2:])
    assert metrics["best_epoch"] == 4  # the last epoch, not the best validation loss


def test_train_job_prints_a_header_one_line_per_epoch_and_a_summary(trained):
    storage, r = trained
    out = r.stdout + r.stderr
    assert "[ray-galaxy] training run 'e2e': data '" in r.stdout and f"checkpoints in {storage / 'e2e'}" in r.stdout
    # one line per epoch from the rank-0 worker, printed as the driver's own lines are: without
    # Ray's "(RayTrainWorker pid=...)" prefix
    epochs = re.findall(r"^\[ray-galaxy\] epoch (\d+)/4 ", r.stdout, re.M)
    assert epochs == ["1", "2", "3", "4"], r.stdout[-4000:]
    assert "RayTrainWorker pid=" not in r.stdout, r.stdout[-4000:]
    # the critic's loss, accuracy on real/generated images and adaptive weight once it has started
    with_critic = re.findall(r"\[ray-galaxy\] epoch (\d+)/4 .* critic [\d.]+ acc [\d.]+/[\d.]+ \(x [\d.e+-]+\) ",
                             r.stdout)
    assert with_critic == ["3", "4"], r.stdout[-4000:]
    assert "fine-tuning the decoder for 2 epochs against a critic" in r.stdout
    assert re.search(r"\[ray-galaxy\] last epoch 4: val loss .* bits/dim, PSNR .* dB; total ", r.stdout)
    assert "[ray-galaxy] Ray's own logs: " in r.stdout
    # Ray's own chatter stays in Ray's log folder
    for noise in ("TrainingReport(", "DeprecationWarning", "execution finished", "Execution finished",
                  "Starting execution of Dataset", "Progress bars disabled"):
        assert noise not in out, f"{noise!r} in the job's output:\n" + out[-4000:]


def _mlflow_client(storage):
    import mlflow  # imported where used: seconds of import the other tests here need not pay

    return mlflow.MlflowClient(f"sqlite:///{storage}/mlflow.db")


def test_train_job_records_an_mlflow_run_in_the_local_store(trained):
    storage, r = trained
    model_dir = storage / "e2e" / "model"
    tracking = json.loads((model_dir / "metrics.json").read_text())["tracking"]
    assert tracking["uri"] == f"sqlite:///{storage}/mlflow.db" and tracking["experiment"] == "ray-galaxy"
    assert f"tracking: MLflow run {tracking['run_id']}" in r.stdout
    client = _mlflow_client(storage)
    run = client.get_run(tracking["run_id"])
    assert run.info.run_name == "e2e" and run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "2" and run.data.params["finetune_epochs"] == "2"
    assert run.data.params["channels"] == "8,16,32,32"
    assert run.data.params["num_workers"] == "2" and run.data.tags["model_dir"] == str(model_dir)
    # rank 0 logged every epoch once (two workers, one writer)
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    recorded = json.loads((model_dir / "metrics.json").read_text())["history"]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
        [h["val_loss"] for h in recorded])
    assert run.data.metrics["best.val_bpd"] == pytest.approx(
        json.loads((model_dir / "metrics.json").read_text())["best"]["val_bpd"])
    assert {"samples.png", "traversal.png", "metrics.json"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)}


def test_evaluation_adds_its_numbers_and_figures_to_the_models_run(trained, tiny_folder, tmp_path):
    from ray_galaxy.evaluation.config import EvaluateConfig
    from ray_galaxy.evaluation.evaluate import evaluate

    storage, _ = trained
    model_dir = storage / "e2e" / "model"
    run_id = json.loads((model_dir / "metrics.json").read_text())["tracking"]["run_id"]
    m = evaluate(EvaluateConfig(model=str(model_dir), data=str(tiny_folder), out=str(tmp_path / "eval"),
                                n=8, max_images=8, iwae_k=2, train_data="none"))
    client = _mlflow_client(storage)
    run = client.get_run(run_id)
    assert run.data.metrics["eval.likelihood.iwae_bpd"] == pytest.approx(m["likelihood"]["iwae_bpd"])
    assert "eval.reconstruction.psnr" in run.data.metrics
    assert run.data.tags["evaluation"] == str(tmp_path / "eval")
    logged = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/report.md", "evaluation/metrics.json", "evaluation/samples.png"} <= logged
    assert len(client.search_runs([run.info.experiment_id])) == 1  # no new run


def test_model_loads_with_weights_only_and_decodes(trained):
    storage, _ = trained
    model_dir = storage / "e2e" / "model"
    state = torch.load(model_dir / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    md = load_model_dir(str(model_dir))
    assert md.model.config.image_size == 32 and md.model.config.latent_dim == 4
    assert md.config["train"]["num_workers"] == 2
    out = md.model.decode(torch.zeros(3, 4))
    assert out.shape == (3, 3, 32, 32) and torch.isfinite(out).all()


def test_sample_job_writes_deterministic_images(trained, tmp_path):
    storage, _ = trained
    model_dir = storage / "e2e" / "model"
    outs = []
    for name in ("a", "b"):
        r = run_job(["jobs/sample.py", "--model", str(model_dir), "--n", "5", "--out", str(tmp_path / name),
                     "--seed", "3", "--grid"])
        assert r.returncode == 0, r.stderr
        outs.append(sorted((tmp_path / name).iterdir()))
    names = [p.name for p in outs[0]]
    assert names == ["grid.png"] + [f"sample_{i:05d}.png" for i in range(5)]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(*outs))
    # default 'auto' is the fitted sampler with its detail; --no-detail gives the decoder means
    r = run_job(["jobs/sample.py", "--model", str(model_dir), "--n", "5", "--out", str(tmp_path / "m"),
                 "--seed", "3", "--no-detail"])
    assert r.returncode == 0, r.stderr
    means = sorted((tmp_path / "m").iterdir())
    assert [p.read_bytes() for p in means] != [p.read_bytes() for p in outs[0][1:]]
    r = run_job(["jobs/sample.py", "--model", str(model_dir), "--n", "5", "--out", str(tmp_path / "g"),
                 "--seed", "3", "--sampler", "gmm"])
    assert r.returncode == 0 and [p.read_bytes() for p in sorted((tmp_path / "g").iterdir())] == \
        [p.read_bytes() for p in outs[0][1:]]


def test_sample_job_reports_a_missing_model_clearly(tmp_path):
    r = run_job(["jobs/sample.py", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert r.returncode == 2 and "not a finished model directory" in r.stderr
    assert "Traceback" not in r.stderr


def test_rerun_with_same_name_resumes_instead_of_restarting(trained, tiny_folder):
    storage, _ = trained
    r = run_job(["jobs/train.py", "--data", str(tiny_folder), "--storage", str(storage), "--name", "e2e",
                 "--epochs", "2", "--num-workers", "2", "--cpus-per-worker", "0.5", *TINY, *CRITIC,
                 "--finetune-epochs", "3"])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "likelihood phase: its 2 epochs are done" in r.stdout and "fitting the two-stage sampler (codes" not in r.stdout
    assert "resuming from checkpoint after epoch 4 (with its critic)" in r.stdout
    assert (storage / "e2e-finetune" / "checkpoint_epoch_0005" / "critic.pt").is_file()
    assert "epoch 1/5" not in r.stdout and "epoch 4/5" not in r.stdout and "epoch 5/5" in r.stdout
    metrics = json.loads((storage / "e2e" / "model" / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4, 5]
    # a second run in the experiment, with the whole history (the resumed epochs included)
    client = _mlflow_client(storage)
    runs = client.search_runs([client.get_experiment_by_name("ray-galaxy").experiment_id],
                              order_by=["attributes.start_time DESC"])
    assert len(runs) == 2 and metrics["tracking"]["run_id"] == runs[0].info.run_id
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "val_loss"))
    assert steps == [1, 2, 3, 4, 5]


def test_missing_data_is_one_clear_error(ray_address, tmp_path):
    r = run_job(["jobs/train.py", "--data", str(tmp_path / "nowhere"), "--storage", str(tmp_path)])
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr
