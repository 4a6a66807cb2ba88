"""The few figure styles the chapters share (seaborn on tidy frames)."""
from __future__ import annotations

from matplotlib.ticker import MaxNLocator
import pandas as pd
import seaborn as sns

from ..matching import ALIGNMENTS

# The order (and colour) pairs and alignment methods are drawn in: the spawned pair, then the alignment
# registry's methods in its display order (naive, wm, swm, am, ste, cm, ...). Appended: chapter 4's matching
# table also compares B under the identity and under a random permutation, which are no alignment methods.
PAIR_ORDER = ("spawn",) + ALIGNMENTS + ("identity", "random")
PALETTE = dict(zip(PAIR_ORDER, sns.color_palette("colorblind", len(PAIR_ORDER))))


def order(values) -> list:
    """The distinct `values` (pairs, methods) in drawing order: those of `PAIR_ORDER` first, in its order,
    then any others sorted."""
    values = set(values)
    return [p for p in PAIR_ORDER if p in values] + sorted(values - set(PAIR_ORDER))


def interpolation_curves(lmc: pd.DataFrame, metric: str = "error", style: str = "split"):
    """metric along alpha, one panel per setting, colour = pair, dashes = `style` (split or correction)."""
    hues = order(lmc.pair)
    g = sns.relplot(data=lmc, x="alpha", y=metric, hue="pair", hue_order=hues, palette=PALETTE, style=style,
                    col="setting", col_wrap=min(3, lmc.setting.nunique()), kind="line", marker="o", markersize=4,
                    height=3.2, aspect=1.2, facet_kws={"sharey": False}, errorbar="sd")  # replicates: mean ± sd
    g.set_titles("{col_name}")
    g.set_xlabels("α  (α = 1 is model A)")
    return g


def per_layer(frame: pd.DataFrame, y: str, baseline: str | None = None, hue: str = "pair", log: bool = True,
              col: str = "setting", ylabel: str | None = None, style: str | None = None):
    """A per-layer metric against depth; an optional baseline column drawn dashed in the same colour
    (or, with `style`, a second variable such as the BatchNorm convention drawn as the line style)."""
    hues = order(frame[hue])
    palette = PALETTE if set(hues) <= set(PALETTE) else None  # pairs get fixed colours, anything else defaults
    g = sns.relplot(data=frame, x="depth", y=y, hue=hue, hue_order=hues, palette=palette, col=col, style=style,
                    col_wrap=min(3, frame[col].nunique()), kind="line", marker="o", markersize=4, height=3.2,
                    aspect=1.2, facet_kws={"sharey": False, "sharex": False}, errorbar=None)
    if baseline is not None:
        for name, ax in g.axes_dict.items():
            sub = frame[frame[col] == name]
            for h in hues:
                part = sub[sub[hue] == h].groupby("depth")[baseline].mean()
                ax.plot(part.index, part.values, ls="--", lw=1, color=(palette or {}).get(h, "grey"))
    for ax in g.axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # depths are layer numbers
    if log:
        g.set(yscale="log")
    g.set_titles("{col_name}")
    g.set_axis_labels("layer depth ℓ", ylabel or y)
    return g


def separation(frame: pd.DataFrame, x: str, y: str, level: float, ratio: float, col: str = "setting"):
    """One point per layer and pair: a metric against the naive pair's at the same layer (log-log), with
    a claim's absolute level (horizontal) and ratio (the line y = ratio * x) drawn in."""
    hues = order(frame.pair)
    g = sns.relplot(data=frame, x=x, y=y, hue="pair", hue_order=hues, palette=PALETTE, col=col,
                    col_wrap=min(3, frame[col].nunique()), kind="scatter", s=30, height=3.2, aspect=1.1,
                    facet_kws={"sharex": False, "sharey": False})
    g.set(xscale="log", yscale="log")
    for ax in g.axes.flat:
        lo = max(min(ax.get_xlim()[0], ax.get_ylim()[0]), 1e-6)
        hi = max(ax.get_xlim()[1], ax.get_ylim()[1])
        ax.axhline(level, color="grey", lw=1, ls="--")
        ax.plot([lo, hi], [ratio * lo, ratio * hi], color="grey", lw=1, ls=":")
    g.set_titles("{col_name}")
    return g


def lines(frame: pd.DataFrame, x: str, y: str, hue: str, col: str = "setting", log: bool = False,
          xlabel: str | None = None, ylabel: str | None = None, style: str | None = None, logx: bool = False,
          errorbar=None, points: bool = False):
    """y against any x (the spawn epoch, the width), one panel per `col`, colour = `hue` (a layer, a pair).
    Repeated rows per point (replicates) are averaged; `errorbar="sd"` shows their spread. `points=True`:
    every row as a dot, nothing joined or averaged (a scatter)."""
    palette = PALETTE if set(frame[hue]) <= set(PALETTE) else "viridis"
    hues = order(frame[hue]) if palette is PALETTE else None
    how = {"kind": "scatter", "s": 30} if points else {"kind": "line", "marker": "o", "markersize": 4, "errorbar": errorbar}
    g = sns.relplot(data=frame, x=x, y=y, hue=hue, hue_order=hues, palette=palette, style=style, col=col,
                    col_wrap=min(3, frame[col].nunique()), height=3.2, aspect=1.2,
                    facet_kws={"sharey": False, "sharex": False}, **how)
    if log:
        g.set(yscale="log")
    if logx:
        g.set(xscale="log")
    g.set_titles("{col_name}")
    g.set_axis_labels(xlabel or x, ylabel or y)
    return g
