"""What a sweep leaves for people: the trials table (CSV, Markdown), its plot, the best model.

The table is built from Tune's results plus each trial's Train history (read from its latest
checkpoint), so it holds every epoch a trial finished, even across an interrupted sweep.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from typing import Any, Mapping

import ray.train
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatter

from ray_galaxy.checkpoint import STATE_FILE
from ray_galaxy.config import TrainConfig
from ray_galaxy.plots import figure
from ray_galaxy.storage import join, read_bytes
from ray_galaxy.training.export import export_model, fit_sampler_into
from ray_galaxy.tuning.config import TUNE_METRIC, TUNE_MODE, TuneConfig, trial_train_config, trials_storage
from ray_galaxy.tuning.space import SearchSpace

BLUE, RED = "#1f77b4", "#d62728"  # every trial; the best one

# --------------------------------------------------------------------------- trial rows


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def trial_states(results: Any) -> list[tuple[str, str]]:
    """(trial_id, Tune status) per result. A Result lacks both; the grid's analysis has them."""
    trials = getattr(getattr(results, "_experiment_analysis", None), "trials", None) or []
    if len(trials) == len(results):
        return [(str(t.trial_id), str(t.status)) for t in trials]
    # Fallback (private attribute gone): ids from the trial directories, named by trial id.
    return [(str(r.path).rstrip("/").rsplit("/", 1)[-1], "TERMINATED") for r in results]


def _per_epoch(result: Any, history: list[dict[str, Any]]) -> dict[int, tuple[float | None, float | None]]:
    """epoch -> (val_bpd, val_psnr), from Tune's results and then the Train history."""
    out: dict[int, tuple[float | None, float | None]] = {}
    df = result.metrics_dataframe
    if df is not None and len(df) and TUNE_METRIC in df.columns:
        ep = [int(v) for v in df["epoch"]] if "epoch" in df.columns else list(range(1, len(df) + 1))
        ps = df["val_psnr"] if "val_psnr" in df.columns else [None] * len(df)
        out.update({e: (_finite(b), _finite(q)) for e, b, q in zip(ep, df[TUNE_METRIC], ps)})
    for h in history:
        if "epoch" in h:
            out[int(h["epoch"])] = (_finite(h.get(TUNE_METRIC)), _finite(h.get("val_psnr")))
    return out


def _metric_columns(per_epoch: Mapping[int, tuple[float | None, float | None]]) -> dict[str, Any]:
    best = final = best_epoch = psnr = None
    epochs_run = max(per_epoch) if per_epoch else 0
    if per_epoch:
        final, psnr = per_epoch[epochs_run]
        good = [(v, e) for e, (v, _) in sorted(per_epoch.items()) if v is not None]
        if good:
            best, best_epoch = min(good)
    return {"best_val_bpd": best, "best_epoch": best_epoch, "final_val_bpd": final,
            "final_val_psnr": psnr, "epochs_run": epochs_run}


def _status(error: Any, tune_status: str, epochs_run: int, epochs: int) -> str:
    if error is not None or tune_status == "ERROR":
        return "error"
    if tune_status != "TERMINATED":
        return "interrupted"
    return "stopped" if epochs_run < epochs else "completed"


def trial_rows(results: Any, space: SearchSpace, epochs: int,
               saved_status: Mapping[str, str] | None = None,
               histories: Mapping[str, list[dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    """One row per trial of a Tune ResultGrid, best first (by best val_bpd).

    status: completed (ran all epochs), stopped (by ASHA), error, or interrupted (the sweep
    ended, e.g. by Ctrl-C, while the trial was pending or running). ``saved_status`` (trial
    id -> Tune status in the saved experiment state) takes precedence: after Ctrl-C, Tune
    saves the state and then marks the trials it ends TERMINATED in what ``fit`` returns.
    ``histories`` (trial id -> :func:`train_history`) add the epochs Tune's own results lack:
    a trial resumed without a Tune checkpoint restarts its Tune results, and epochs its Train
    run finished just before an interruption were never reported to Tune.
    """
    rows = []
    for r, (trial_id, tune_status) in zip(results, trial_states(results)):
        tune_status = (saved_status or {}).get(trial_id, tune_status)
        row: dict[str, Any] = {"trial_id": trial_id}
        row.update({p: (r.config or {}).get(p) for p in space.names})
        row.update(_metric_columns(_per_epoch(r, (histories or {}).get(trial_id, []))))
        status = _status(r.error, tune_status, row["epochs_run"], epochs)
        row.update({
            "stopped_early": "yes" if status == "stopped" else "no",
            "status": status,
            "error": "" if r.error is None else f"{type(r.error).__name__}: {r.error}".splitlines()[0][:200],
        })
        rows.append(row)
    rows.sort(key=lambda r: (r["best_val_bpd"] is None, r["best_val_bpd"] or 0.0, r["trial_id"]))
    return rows


def fmt(v: Any) -> str:
    """A table cell: 4 significant digits for floats, lists comma-joined, None empty."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def rows_csv(rows: list[dict[str, Any]]) -> bytes:
    """trials.csv: full precision, one row per trial."""
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else ",".join(map(str, v)) if isinstance(v, (list, tuple))
                            else v) for k, v in r.items()})
    return buf.getvalue().encode()


def rows_markdown(rows: list[dict[str, Any]], cfg: TuneConfig, space: SearchSpace,
                  model_dir: str) -> bytes:
    """trials.md: the same table for people, with the sweep's settings above it."""
    cols = [c for c in (rows[0] if rows else {}) if c != "error" or any(r["error"] for r in rows)]
    lines = [
        f"# Sweep `{cfg.name}`",
        "",
        f"{len(rows)} trials; metric `{TUNE_METRIC}` (bits/dim of the kl_weight=1 negative ELBO on "
        f"the validation split, lower is better); ASHA on `epoch` with grace period "
        f"{cfg.grace_period}, reduction factor {cfg.reduction_factor:g}, at most {cfg.epochs} epochs.",
        "",
        "Searched: " + ", ".join(f"`{p.name}` {p.distribution} {list(p.args)}" for p in space.params),
    ]
    if space.fixed:
        lines.append("Fixed: " + ", ".join(f"`{k}`={fmt(v)}" for k, v in space.fixed.items()))
    if cfg.metric == "morphology":
        lines.append("Ranked by `morphology_distance`: the mean normalised Wasserstein distance of "
                     f"{cfg.rank_samples} samples of each completed trial to the validation galaxies "
                     "(lower is better); `rank_val_bpd` is the ranking by val_bpd alone.")
    if rows and rows[0]["best_val_bpd"] is not None:
        lines.append(f"Best: `{rows[0]['trial_id']}` (first row), exported to `{model_dir}`.")
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r[c]).replace("|", "/") for c in cols) + " |")
    return ("\n".join(lines) + "\n").encode()


# --------------------------------------------------------------------------- plot


def _panel(ax: Any, name: str, log_scale: bool, categories: list[str] | None,
           rows: list[dict[str, Any]], best_id: str | None) -> None:
    """One scatter panel: best val_bpd against one hyperparameter."""
    for r in sorted(rows, key=lambda r: r["trial_id"] == best_id):  # best drawn last, on top
        v = r.get(name)
        if v is None or (categories is not None and fmt(v) not in categories):
            continue
        x = categories.index(fmt(v)) if categories is not None else float(v)
        colour = RED if r["trial_id"] == best_id else BLUE
        hollow = r.get("stopped_early") == "yes"
        ax.plot([x], [r["best_val_bpd"]], "o", ms=8, mew=2, color=colour,
                mfc="none" if hollow else colour)
    if categories:
        ax.set_xticks(range(len(categories)), categories)
        ax.set_xlim(-0.5, len(categories) - 0.5)
    elif log_scale:
        ax.set_xscale("log")
        # Plain numbers (0.5, 2, 0.001) rather than 2x10^0: searched ranges often span under a
        # decade, where the minor ticks carry the labels and scientific ones collide.
        ax.xaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
    ax.set_xlabel(name + (" (log scale)" if log_scale else ""))
    ax.set_title(name)
    ax.grid(True, alpha=0.3)


def plot_trials(rows: list[dict[str, Any]], space: SearchSpace) -> Figure:
    """Scatter panels of best val_bpd against each searched hyperparameter (trial ids when
    nothing is searched). Filled dots ran to the end, hollow ones were stopped early by ASHA;
    the best trial is red. Save it with :func:`ray_galaxy.plots.png`."""
    pts = [dict(r, trial=r["trial_id"]) for r in rows if r["best_val_bpd"] is not None]
    best_id = rows[0]["trial_id"] if pts else None
    panels = ([(p.name, p.log_scale, [fmt(v) for v in p.args] if p.categorical else None)
               for p in space.params]
              or [("trial", False, [r["trial_id"] for r in rows])])
    fig, axes = figure(1, len(panels), panel=(4.5, 3.4))
    for ax, (name, log_scale, categories) in zip(axes, panels):
        _panel(ax, name, log_scale, categories, pts, best_id)
    axes[0].set_ylabel("best val_bpd (bits/dim)")
    if not pts:
        axes[0].text(0.5, 0.5, f"no trial reported {TUNE_METRIC}", ha="center", va="center",
                     transform=axes[0].transAxes)
    legend = [Line2D([], [], ls="", marker="o", color=BLUE, label="ran to the end"),
              Line2D([], [], ls="", marker="o", color=BLUE, mfc="none", mew=2,
                     label="stopped early by ASHA"),
              Line2D([], [], ls="", marker="o", color=RED, label="best")]
    fig.legend(handles=legend, loc="outside lower center", ncols=3, frameon=False)
    fig.suptitle("best val_bpd per trial (bits/dim, lower is better)")
    return fig


# --------------------------------------------------------------------------- best model


def _train_result(train_run: str) -> Any:
    """The ``ray.train.Result`` of a finished or interrupted Train run, read from storage."""
    # Restoring a Result logs, at INFO, advice about starting a new run; nothing is started.
    train_logger = logging.getLogger("ray.train")
    level = train_logger.level
    train_logger.setLevel(logging.WARNING)
    try:
        return ray.train.Result.from_path(train_run)
    finally:
        train_logger.setLevel(level)


def train_history(train_run: str) -> list[dict[str, Any]]:
    """Per-epoch metrics of a trial's Train run, from its latest checkpoint (``[]`` if none).

    Every epoch's report carries a checkpoint whose ``state.json`` holds the whole history, so
    this is complete up to the last epoch the run finished, whatever Tune recorded.
    """
    try:
        latest = _train_result(train_run).checkpoint
        if latest is None:
            return []
        state = json.loads(read_bytes(join(train_run, latest.path.rstrip("/").rsplit("/", 1)[-1],
                                           STATE_FILE)))
    except Exception:  # no run (trial never started), or no readable checkpoint
        return []
    return list(state.get("history") or [])


def export_best(cfg: TuneConfig, base: TrainConfig, best: dict[str, Any], space: SearchSpace,
                results_params: dict[str, Any], n_trials: int, data_stats: dict[str, Any],
                model_dir: str) -> str:
    """Export a trial's best checkpoint (by val_bpd) as a model directory with its sampler at
    ``model_dir``; returns ``model_dir``. The config records the sweep and how the trial ranked."""
    trial_id = best["trial_id"]
    train_run = join(trials_storage(cfg), trial_id)
    result = _train_result(train_run)
    checkpoint = result.get_best_checkpoint(metric=TUNE_METRIC, mode=TUNE_MODE) or result.checkpoint
    if checkpoint is None:
        raise RuntimeError(f"trial {trial_id} left no checkpoint in {train_run}")
    trial_cfg = trial_train_config(base, results_params, name=trial_id)
    extra = {"tune": {
        "sweep": cfg.name, "trial_id": trial_id, "train_run": train_run,
        "metric": TUNE_METRIC, "mode": TUNE_MODE, "best_val_bpd": best["best_val_bpd"],
        "ranked_by": cfg.metric,
        "best_epoch": best["best_epoch"], "params": {p: results_params.get(p) for p in space.names},
        "trials": n_trials, "config": {**cfg.to_dict(), "search_space": space.to_spec()},
        "scheduler": {"type": "ASHA", "time_attr": "epoch", "grace_period": cfg.grace_period,
                      "reduction_factor": cfg.reduction_factor, "max_t": cfg.epochs},
    }}
    export_model(checkpoint, result.checkpoint, model_dir, trial_cfg, data_stats, extra_config=extra)
    if trial_cfg.fit_sampler:
        fit_sampler_into(model_dir, trial_cfg)
    return model_dir
