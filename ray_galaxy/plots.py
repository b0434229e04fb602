"""Small Pillow-drawn charts for the evaluation report: line charts and histograms.

No matplotlib: each chart is a few rectangles, lines and labels on a white Pillow image, and
every function returns an (H, W, 3) uint8 array for :func:`ray_galaxy.figures.png_bytes`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100



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


COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189)]
BAND = (225, 225, 235)  # shaded x-range (e.g. the structure band of a power spectrum)
MARGIN = (64, 14, 30, 42)  # left, right, top, bottom of each panel


def font(size: int = 12):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 times a power of ten) covering [lo, hi]."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    return f"{v:.0f}" if 1e3 <= abs(v) < 1e7 else f"{v:.3g}"


class Axes:
    """One panel: data limits, optional log axes, and the mapping from data to pixels."""

    def __init__(self, draw, box: tuple[int, int, int, int], xlim: tuple[float, float],
                 ylim: tuple[float, float], logx: bool = False, logy: bool = False) -> None:
        self.d, self.logx, self.logy = draw, logx, logy
        self.x0, self.y0, self.x1, self.y1 = box
        self.xlim = tuple(map(self._tx, xlim))
        self.ylim = tuple(map(self._ty, ylim))

    def _tx(self, v: float) -> float:
        return math.log10(v) if self.logx else float(v)

    def _ty(self, v: float) -> float:
        return math.log10(v) if self.logy else float(v)

    def px(self, x: float) -> float:
        lo, hi = self.xlim
        return self.x0 + (self._tx(x) - lo) / ((hi - lo) or 1.0) * (self.x1 - self.x0)

    def py(self, y: float) -> float:
        lo, hi = self.ylim
        return self.y1 - (self._ty(y) - lo) / ((hi - lo) or 1.0) * (self.y1 - self.y0)

    def frame(self, title: str = "", xlabel: str = "", ylabel: str = "", f=None) -> None:
        """Box, ticks with labels (powers of ten on log axes), title and axis labels."""
        f = f or font()
        d = self.d
        d.rectangle((self.x0, self.y0, self.x1, self.y1), outline="black")
        for t in self._ticks(self.xlim, self.logx):
            x = self.px(t)
            d.line((x, self.y1, x, self.y1 + 4), fill="black")
            d.text((x, self.y1 + 6), _fmt(t), fill="black", font=f, anchor="mt")
        for t in self._ticks(self.ylim, self.logy):
            y = self.py(t)
            d.line((self.x0 - 4, y, self.x0, y), fill="black")
            d.text((self.x0 - 6, y), _fmt(t), fill="black", font=f, anchor="rm")
        d.text(((self.x0 + self.x1) / 2, self.y0 - 8), title, fill="black", font=f, anchor="md")
        d.text(((self.x0 + self.x1) / 2, self.y1 + 22), xlabel, fill=(90, 90, 90), font=f, anchor="mt")
        if ylabel:
            d.text((self.x0 + 4, self.y0 + 4), ylabel, fill=(90, 90, 90), font=f, anchor="la")

    @staticmethod
    def _ticks(lim: tuple[float, float], log: bool) -> list[float]:
        lo, hi = lim
        if log:
            powers = [10.0 ** e for e in range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1)]
            if len(powers) >= 2:
                return powers
            return [10 ** t for t in nice_ticks(lo, hi, 3)]
        return nice_ticks(lo, hi)

    def line(self, xs: Sequence[float], ys: Sequence[float], colour, width: int = 2) -> None:
        pts = [(self.px(x), self.py(y)) for x, y in zip(xs, ys)
               if math.isfinite(x) and math.isfinite(y) and (not self.logx or x > 0) and (not self.logy or y > 0)]
        if len(pts) > 1:
            self.d.line(pts, fill=colour, width=width, joint="curve")
        elif pts:
            x, y = pts[0]
            self.d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)

    def xband(self, lo: float, hi: float) -> None:
        self.d.rectangle((self.px(lo), self.y0 + 1, self.px(hi), self.y1 - 1), fill=BAND)


def _limits(values: Sequence[float], log: bool) -> tuple[float, float]:
    v = np.asarray([x for x in values if math.isfinite(x) and (x > 0 or not log)], np.float64)
    if len(v) == 0:
        return (1.0, 10.0) if log else (0.0, 1.0)
    lo, hi = float(v.min()), float(v.max())
    if log:
        return (lo / 1.5, hi * 1.5) if hi > lo else (lo / 10, hi * 10)
    pad = (hi - lo) * 0.05 or abs(hi) * 0.1 or 1.0
    return lo - pad, hi + pad


def _legend(d, x: float, y: float, labels: Sequence[str], f) -> None:
    """Colour keys for several series (none for one: the title names it), on a white box."""
    if len(labels) < 2:
        return
    width = max(d.textlength(label, font=f) for label in labels) + 30
    d.rectangle((x - 4, y - 2, x + width, y + 16 * len(labels)), fill="white", outline=(200, 200, 200))
    for i, label in enumerate(labels):
        c = COLOURS[i % len(COLOURS)]
        d.line((x, y + 7 + 16 * i, x + 18, y + 7 + 16 * i), fill=c, width=3)
        d.text((x + 24, y + 16 * i), label, fill="black", font=f)


def panels(draws: Sequence[Callable], ncols: int = 3, size: tuple[int, int] = (360, 260),
           title: str = "") -> np.ndarray:
    """Lay out panels on a grid; each ``draw(draw, box, font)`` fills its (x0, y0, x1, y1) box."""
    from PIL import Image, ImageDraw

    ncols = max(1, min(ncols, len(draws)))
    nrows = math.ceil(len(draws) / ncols)
    top = 26 if title else 0
    img = Image.new("RGB", (ncols * size[0], nrows * size[1] + top), "white")
    d = ImageDraw.Draw(img)
    f = font()
    if title:
        d.text((8, 6), title, fill="black", font=font(14))
    ml, mr, mt, mb = MARGIN
    for i, draw in enumerate(draws):
        r, c = divmod(i, ncols)
        x, y = c * size[0], top + r * size[1]
        draw(d, (x + ml, y + mt, x + size[0] - mr, y + size[1] - mb), f)
    return np.asarray(img)


def line_chart(series: Sequence[tuple[str, Sequence[float], Sequence[float]]], title: str = "",
               xlabel: str = "", ylabel: str = "", logx: bool = False, logy: bool = False,
               band: tuple[float, float] | None = None) -> Callable:
    """A panel of labelled lines ``(label, xs, ys)``; ``band`` shades an x-range."""

    def draw(d, box, f) -> None:
        xs = [x for _, sx, _ in series for x in sx]
        ys = [y for _, _, sy in series for y in sy]
        ax = Axes(d, box, _limits(xs, logx), _limits(ys, logy), logx, logy)
        if band:
            ax.xband(*band)
        ax.frame(title, xlabel, ylabel, f)
        for i, (_, sx, sy) in enumerate(series):
            ax.line(sx, sy, COLOURS[i % len(COLOURS)])
        _legend(d, box[2] - 150, box[1] + 6, [s[0] for s in series], f)

    return draw


def histogram(samples: Sequence[tuple[str, np.ndarray]], title: str = "", bins: int = 24) -> Callable:
    """A panel of step histograms (densities on shared bins) of several samples."""

    def draw(d, box, f) -> None:
        clean = [np.asarray(v, np.float64)[np.isfinite(v)] for _, v in samples]
        allv = np.concatenate([c for c in clean if len(c)] or [np.zeros(1)])
        lo, hi = np.percentile(allv, [0.5, 99.5]) if len(allv) > 1 else (allv[0] - 1, allv[0] + 1)
        if not hi > lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        dens = [np.histogram(np.clip(c, lo, hi), bins=edges, density=True)[0] if len(c) else np.zeros(bins)
                for c in clean]
        ax = Axes(d, box, (lo, hi), (0.0, max(float(max(h.max() for h in dens)), 1e-12) * 1.1))
        ax.frame(title, "", "", f)
        for i, h in enumerate(dens):
            xs = np.repeat(edges, 2)[1:-1]
            ax.line(xs, np.repeat(h, 2), COLOURS[i % len(COLOURS)])
        _legend(d, box[2] - 100, box[1] + 6, [s[0] for s in samples], f)

    return draw
