"""Charts as PNG bytes, drawn with matplotlib's object API on an Agg canvas.

No pyplot: its global figure registry is not thread-safe and keeps figures alive, while jobs,
Tune callbacks and the evaluation draw charts in whatever process and thread they run in.
:func:`figure` makes a grid of panels, :func:`png` encodes it; :func:`lines`, :func:`histograms`
and :func:`scatter` draw the kinds of panel the reports use onto given axes.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
BAND_COLOUR = "#e1e1eb"  # a shaded x-range (e.g. the structure band of a power spectrum)

Series = tuple[str, Sequence[float], Sequence[float]]  # (label, xs, ys)


def figure(nrows: int = 1, ncols: int = 1, panel: tuple[float, float] = (4.0, 3.0)) -> tuple[Figure, list]:
    """A figure of ``nrows`` x ``ncols`` panels of ``panel`` inches each; (figure, flat list of axes)."""
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def lines(ax: Axes, series: Sequence[Series], title: str = "", xlabel: str = "", ylabel: str = "",
          logx: bool = False, logy: bool = False, band: tuple[float, float] | None = None) -> None:
    """Labelled lines ``(label, xs, ys)`` on ``ax``; ``band`` shades an x-range. A legend only for
    several series (the title names a single one); non-finite points are left out."""
    for label, xs, ys in series:
        x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
        ok = np.isfinite(x) & np.isfinite(y) & ((x > 0) | (not logx)) & ((y > 0) | (not logy))
        ax.plot(x[ok], y[ok], label=label, marker="o" if ok.sum() == 1 else None, linewidth=1.8)
    if band is not None:
        ax.axvspan(*band, color=BAND_COLOUR, zorder=0)
    ax.set_xscale("log" if logx else "linear")
    ax.set_yscale("log" if logy else "linear")
    _labels(ax, title, xlabel, ylabel, len(series))


def histograms(ax: Axes, samples: Sequence[tuple[str, np.ndarray]], title: str = "", bins: int = 24) -> None:
    """Step histograms (densities on shared bins) of several samples on ``ax``.

    The bins span the 0.5..99.5 percentiles of all samples together, so one outlier does not
    squash the rest; NaNs (failed measurements) are dropped."""
    clean = [np.asarray(v, np.float64)[np.isfinite(v)] for _, v in samples]
    both = np.concatenate([c for c in clean if len(c)] or [np.zeros(1)])
    lo, hi = np.percentile(both, [0.5, 99.5]) if len(both) > 1 else (both[0] - 1, both[0] + 1)
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    for (label, _), c in zip(samples, clean):
        if len(c):
            ax.hist(np.clip(c, lo, hi), bins=edges, density=True, histtype="step", linewidth=1.8, label=label)
    _labels(ax, title, "", "", len(samples))


def scatter(ax: Axes, samples: Sequence[Series], title: str = "", xlabel: str = "", ylabel: str = "",
            diagonal: bool = False) -> None:
    """Labelled point clouds ``(label, xs, ys)`` on ``ax`` (non-finite points left out);
    ``diagonal`` draws y = x over the points' range, where y equals x."""
    lo, hi = np.inf, -np.inf
    for label, xs, ys in samples:
        x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
        ok = np.isfinite(x) & np.isfinite(y)
        ax.scatter(x[ok], y[ok], s=6, alpha=0.5, label=label, linewidths=0)
        if ok.any():
            lo, hi = min(lo, x[ok].min(), y[ok].min()), max(hi, x[ok].max(), y[ok].max())
    if diagonal and hi > lo:
        ax.plot([lo, hi], [lo, hi], color="black", linewidth=1, zorder=0)
    _labels(ax, title, xlabel, ylabel, len(samples))


def _labels(ax: Axes, title: str, xlabel: str, ylabel: str, n_series: int) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if n_series > 1:
        ax.legend(fontsize=8)
