"""Training images/s: Ray Train (1 worker) against a plain PyTorch loop, side by side.

Same model, batch size, decoded images and augmentation; the plain loop runs before and after
the Ray run and its mean is the baseline, so drift on a noisy machine hits both sides.

    python benchmarks/train_throughput.py --image-size 64 --epochs 8
    python benchmarks/train_throughput.py --epochs 8 --profile   # + where the time goes

``--profile`` splits each training step into time blocked on the next batch and compute
(to tensor, augmentation, forward, backward, optimiser), in the plain loop and in the Ray Train
worker, and samples every process's and the worker's threads' CPU time over the worker's
training passes (warm-up excluded) as CPU-seconds per training second. The timers add one
``perf_counter`` call per batch; the training itself is unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

import ray

import psutil  # noqa: E402,I001 - ships with Ray, importable once ray is (its thirdparty_files)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _add(acc: dict, more: dict) -> None:
    """Add ``more``'s numbers into ``acc`` key by key."""
    for k, v in more.items():
        acc[k] = acc.get(k, 0.0) + v


def _label(p: psutil.Process) -> str:
    """A process's group: Ray's process title up to the first dot (ray::RayTrainWorker,
    ray::SplitCoordinator, ray::IDLE), the script of a Python process, else the name."""
    cmd = p.info["cmdline"] or [p.info["name"] or "?"]
    if cmd[0].startswith("ray::"):
        return cmd[0].split(" ")[0].split(".")[0]
    script = next((os.path.basename(a) for a in cmd[1:] if a.endswith(".py")), "")
    return f"python {script}" if script else (p.info["name"] or "?")


def _cpu_snapshot(driver_pid: int) -> dict[tuple[str, int], tuple[str, float]]:
    """CPU seconds (user + system) used so far by every process on the machine and by every
    thread of this one, keyed by pid / thread id, each with a label to group by; processes
    outside this run (not the driver's descendants: other jobs on the machine) as "other"."""
    ours = {driver_pid} | {c.pid for c in psutil.Process(driver_pid).children(recursive=True)}
    snap = {}
    for p in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        if p.info["cpu_times"] is not None:
            label = _label(p) if p.pid in ours else "other (not this run)"
            snap[("process", p.pid)] = (label, p.info["cpu_times"].user + p.info["cpu_times"].system)
    names = {t.native_id: t.name for t in threading.enumerate()}
    for th in psutil.Process().threads():
        if th.id not in names:  # a native thread (torch/OpenMP, gloo, gRPC): its kernel name
            with open(f"/proc/self/task/{th.id}/comm") as f:
                names[th.id] = "native " + f.read().strip()
        snap[("thread", th.id)] = (names[th.id], th.user_time + th.system_time)
    return snap


def _cpu_delta(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds per label between two snapshots (a process born in between counts whole)."""
    out: dict[str, float] = {}
    for key, (label, secs) in after.items():
        _add(out, {f"{key[0]} {label}": secs - before.get(key, (label, 0.0))[1]})
    return out


class _TimedShard:
    """A dataset shard whose ``iter_torch_batches`` adds to ``acc`` the seconds the loop was
    blocked waiting for each batch ("data") and the seconds until it asked for the next ("compute")."""

    def __init__(self, shard, acc: dict) -> None:
        self.shard, self.acc = shard, acc

    def iter_torch_batches(self, **kwargs):
        it = iter(self.shard.iter_torch_batches(**kwargs))
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            t1 = time.perf_counter()
            _add(self.acc, {"data": t1 - t0})
            if batch is None:
                return
            yield batch
            _add(self.acc, {"compute": time.perf_counter() - t1, "steps": 1})


def profiled_worker(loop_config: dict) -> None:
    """The project's Train worker, its training passes after the first timed by
    :class:`_TimedShard` and CPU-sampled; the totals go to ``loop_config["profile_path"]``."""
    import torch

    from ray_galaxy.training import loop

    untimed = loop.train_epoch
    prof = {"batches": {}, "cpu": {}, "train_seconds": 0.0}

    def timed_epoch(w, shard, epoch: int, beta: float) -> list[float]:
        if epoch == 0:  # warm-up, as in the images/s figures
            return untimed(w, shard, epoch, beta)
        prof["torch_threads"] = torch.get_num_threads()  # as the worker's setup set it
        driver = loop_config["driver_pid"]
        before, t0 = _cpu_snapshot(driver), time.perf_counter()
        sums = untimed(w, _TimedShard(shard, prof["batches"]), epoch, beta)
        prof["train_seconds"] += time.perf_counter() - t0
        _add(prof["cpu"], _cpu_delta(before, _cpu_snapshot(driver)))
        with open(loop_config["profile_path"], "w") as f:
            json.dump(prof, f)
        return sums

    loop.train_epoch = timed_epoch  # run_epoch looks it up in the module at each call
    loop.train_loop_per_worker(loop_config)


def profile_table(plain: dict, prof: dict) -> dict:
    """Milliseconds per step (data wait, compute) on both sides; CPU-s per training second by group."""
    def per_step(t: dict) -> dict:
        return {k: round(1000 * t.get(k, 0.0) / t["steps"], 2) for k in ("data", "compute")}

    def per_second(cpu: dict, seconds: float) -> dict:
        return {k: round(v / seconds, 3) for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])
                if v / seconds >= 0.005}
    return {"plain_ms_per_step": per_step(plain), "ray_ms_per_step": per_step(prof["batches"]),
            "ray_worker_torch_threads": prof["torch_threads"],
            "plain_cpu_s_per_train_s": per_second(plain["cpu"], plain["seconds"]),
            "ray_cpu_s_per_train_s": per_second(prof["cpu"], prof["train_seconds"])}


def plain_loop(images, cfg, epochs: int, timing: dict | None = None) -> float:
    """Images/s of a plain single-process PyTorch loop over the same decoded images; with
    ``timing``, adds seconds spent gathering batches ("data") and computing, after warm-up."""
    import torch

    from ray_galaxy.images import augment_d4
    from ray_galaxy.model import ConvVAE
    from ray_galaxy.training.loop import kl_weight_at

    torch.manual_seed(cfg.seed)
    model = ConvVAE(cfg.model_config()).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    x_all = torch.from_numpy(images)  # (N, S, S, 3) uint8
    gen = torch.Generator().manual_seed(0)
    rates = []
    for epoch in range(epochs):
        if timing is not None and epoch == 1:  # CPU use of every process over the timed epochs
            before, t_timed = _cpu_snapshot(os.getpid()), time.time()
        t0, n = time.time(), 0
        perm = torch.randperm(len(x_all), generator=gen)
        for i in range(0, len(x_all), cfg.batch_size):
            t_data = time.perf_counter()
            x = x_all[perm[i:i + cfg.batch_size]]
            t_compute = time.perf_counter()
            x = augment_d4(x.permute(0, 3, 1, 2).float().div_(255), gen)
            a, mu, logvar = model(x)
            loss = (model.recon_nll(a, x) + kl_weight_at(cfg, epoch) * model.kl(mu, logvar)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += x.shape[0]
            if timing is not None and epoch > 0:
                _add(timing, {"data": t_compute - t_data, "compute": time.perf_counter() - t_compute, "steps": 1})
        rates.append(n / (time.time() - t0))
    if timing is not None and epochs > 1:
        _add(timing, {"seconds": time.time() - t_timed})
        timing.setdefault("cpu", {})
        _add(timing["cpu"], _cpu_delta(before, _cpu_snapshot(os.getpid())))
    return sum(rates[1:]) / len(rates[1:])  # first epoch is warm-up


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="hubble-xdf")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--preset", default="default")
    p.add_argument("--crop", type=float, default=1.0)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--profile", action="store_true", help="also say where each step's time goes")
    args = p.parse_args()

    import numpy as np

    from ray_galaxy.config import train_config
    from ray_galaxy.streaming import load_datasets
    from ray_galaxy.runtime import ensure_ray
    from ray_galaxy.training.trainer import make_trainer

    ensure_ray()
    storage = tempfile.mkdtemp(prefix="rg-bench-")
    cfg = train_config(data=args.data, image_size=args.image_size, batch_size=args.batch_size,
                       epochs=args.epochs, preset=args.preset, crop=args.crop, storage=storage,
                       name="bench", num_workers=1, use_gpu=args.use_gpu, max_failures=0)
    train_ds, val_ds, stats = load_datasets(cfg.data, cfg.image_size, cfg.crop, cfg.val_fraction)
    images = np.stack([r["image"] for r in train_ds.take_all()])
    print(f"{len(images)} training images at {cfg.image_size}px, batch {cfg.batch_size}, "
          f"{args.epochs} epochs (first is warm-up), torch threads {os.cpu_count()}", flush=True)

    timing: dict | None = {} if args.profile else None
    plain_before = plain_loop(images, cfg, args.epochs, timing) if not args.use_gpu else float("nan")
    profile_path = os.path.join(storage, "profile.json")
    trainer = make_trainer(cfg, train_ds, val_ds, {"profile_path": profile_path,
                                                        "driver_pid": os.getpid()})
    if args.profile:
        trainer.train_loop_per_worker = profiled_worker  # Train V2 keeps the function here
    t0 = time.time()
    result = trainer.fit()
    ray_wall = time.time() - t0
    with result.checkpoint.as_directory() as d:
        history = json.load(open(os.path.join(d, "state.json")))["history"]
    ray_rate = float(np.mean([h["images_per_s"] for h in history[1:]]))
    epoch_wall = float(np.mean([h["epoch_seconds"] for h in history[1:]]))
    plain_after = plain_loop(images, cfg, args.epochs, timing) if not args.use_gpu else float("nan")
    plain = (plain_before + plain_after) / 2
    out = {
        "image_size": cfg.image_size, "batch_size": cfg.batch_size, "images": len(images),
        "plain_images_per_s": round(plain, 1), "plain_before": round(plain_before, 1),
        "plain_after": round(plain_after, 1), "ray_train_images_per_s": round(ray_rate, 1),
        "ratio": round(ray_rate / plain, 3), "ray_epoch_seconds_with_val_and_checkpoint": round(epoch_wall, 2),
        "ray_fit_wall_seconds": round(ray_wall, 1), "cpus": os.cpu_count(),
    }
    if args.profile:
        with open(profile_path) as f:
            out["profile"] = profile_table(timing, json.load(f))
    print(json.dumps(out, indent=1))
    ray.shutdown()


if __name__ == "__main__":
    main()
