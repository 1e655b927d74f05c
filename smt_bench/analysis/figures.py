"""The figures: one style, one colour per method everywhere, PNG + PDF without dates in them.

Each figure answers one question. The shared ones compare each method at its main settings (one series
per method, `cells.main`); `variants` sets each method's other series beside its main one, one panel per
variant. Labels stay short (the long form is in the report's tables), legends sit outside the axes, and
`layout_problems` checks a drawn figure for text that overlaps or leaves the canvas."""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, cast
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.container import ErrorbarContainer  # noqa: E402
from matplotlib.layout_engine import PlaceHolderLayoutEngine  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402
import pandas as pd  # noqa: E402

from . import registry  # noqa: E402
from .schema import MEMORY_PARTS  # noqa: E402
from .stats import Plateau, fmt_budget, pareto_front  # noqa: E402

REFERENCE_COLOR = "#404040"  # the method every ratio is taken against
# the rest, in display order (tab10 without its grey, red last)
GENERIC_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#d62728",
                  # then tab20b's dark shades, so that up to 14 methods each have a colour of their own
                  "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "--", ":", "-.")
PART_COLORS = {"weights": "#d9d9d9", "gradients": "#a8a8a8", "optimizer": "#6f6f6f", "activations": "#e6d3a3"}
PART_HATCHES = {"weights": "", "gradients": "//", "optimizer": "", "activations": ".."}
GIB = 1024 ** 3

STYLE = {
    "figure.dpi": 100, "savefig.dpi": 150, "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9,
    "legend.fontsize": 8, "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.grid": True, "grid.alpha": 0.3,
    "axes.spines.top": False, "axes.spines.right": False, "font.family": "DejaVu Sans",
    "svg.hashsalt": "smt-bench", "hatch.linewidth": 0.5,
}
PNG_META = {"Software": None}
PDF_META = {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None}


class Palette:
    """Display order, colour per method and marker/line per method and series, the same in every figure.

    Order: the reference methods first (full fine-tuning: what the ratios divide by), then by each method's
    contributed `order`, then by name. Colours: grey for a reference, a contributed colour where one is
    given, else the next generic colour not already taken (deterministic for a given set of methods).
    Markers and line styles: one pair per method (so methods differ in grey-scale print too); a method's
    other series cycle through the pairs after its own."""

    def __init__(self, methods, series_by_method: dict[str, list[str]], reference=()):
        self.reference = set(reference)
        self.known = sorted(set(methods) | set(series_by_method), key=self.key)
        self.colors = {m: REFERENCE_COLOR for m in self.known if m in self.reference}
        for m in self.known:
            c = registry.contribution(m)
            if m not in self.colors and c is not None and c.color:
                self.colors[m] = c.color
        free = [c for c in GENERIC_COLORS if c not in self.colors.values()]
        for i, m in enumerate(m for m in self.known if m not in self.colors):
            self.colors[m] = free[i % len(free)]
        self.method_style = {m: (MARKERS[i % len(MARKERS)], LINESTYLES[i % len(LINESTYLES)])
                             for i, m in enumerate(self.known)}
        self.style = {}
        for m, series in series_by_method.items():
            base = self.known.index(m)
            for i, s in enumerate(sorted(series)):  # a method's variants: other markers and line styles
                self.style[s] = (MARKERS[(base + i) % len(MARKERS)], LINESTYLES[(base + i) % len(LINESTYLES)])

    def key(self, method: str) -> tuple:
        c = registry.contribution(method)
        return (method not in self.reference, c.order if c else 0, method)

    def color(self, method: str) -> str:
        return self.colors.get(method, "#000000")

    def method_marker(self, method: str) -> str:
        return self.method_style.get(method, ("o", "-"))[0]

    def method_line(self, method: str) -> str:
        return self.method_style.get(method, ("o", "-"))[1]

    def marker(self, series: str) -> str:
        return self.style.get(series, ("o", "-"))[0]

    def line(self, series: str) -> str:
        return self.style.get(series, ("o", "-"))[1]


@contextmanager
def styled():
    with plt.rc_context(STYLE):
        yield


def freeze_layout(fig):
    """Lay the figure out once (its layout engine, e.g. constrained) and keep that layout: every later draw,
    check and save then sees the same positions (a layout engine re-run at each draw moves things a little)."""
    if fig.get_layout_engine() is not None and not isinstance(fig.get_layout_engine(), PlaceHolderLayoutEngine):
        fig.draw_without_rendering()
        fig.set_layout_engine("none")


def save(fig, out_dir: Path, stem: str) -> list[str]:
    """Write stem.png and stem.pdf under out_dir (one layout for both); returns their names."""
    freeze_layout(fig)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / f"{stem}.png", metadata=PNG_META, bbox_inches="tight")
    fig.savefig(out_dir / f"{stem}.pdf", metadata=PDF_META, bbox_inches="tight")
    plt.close(fig)
    return [f"{stem}.png", f"{stem}.pdf"]


# --- layout helpers ---------------------------------------------------------------------------
def figure(width: float, height: float, nrows: int = 1, ncols: int = 1, **kw):
    """plt.subplots under constrained layout (titles, labels and outside legends get their room)."""
    return plt.subplots(nrows, ncols, figsize=(width, height), layout="constrained", squeeze=False, **kw)


def _logx(ax):
    """Log x axis labelled 0.5, 1, 2, 5 ... rather than 5x10^-1; at least a factor of 4 wide, so that it has
    labelled ticks (call it after plotting)."""
    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    if 0 < lo < hi < 4 * lo:
        mid = math.sqrt(lo * hi)
        ax.set_xlim(mid / 2, mid * 2)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


ROW_IN = 0.2  # the height of one legend row at fontsize 8, inches (with spacing)
COLUMN_IN = 2.3  # the width of one legend column of short() labels at fontsize 8, inches
MAX_HEIGHT_IN = 9.0  # a figure grows this tall for its legend before the legend takes a second column


def _legend_columns(fig, labels, decoration_in: float) -> int:
    """Columns for a legend beside the panels: one while the figure, grown up to MAX_HEIGHT_IN, leaves the
    panels (figure height less `decoration_in` of titles and labels) as tall as the legend; then more, the
    figure widened for each."""
    rows = sum(str(lbl).count("\n") + 1 for lbl in labels)
    need = rows * ROW_IN + 0.35
    height = fig.get_figheight()
    if need > height - decoration_in:
        fig.set_figheight(max(height, min(need + decoration_in, MAX_HEIGHT_IN)))
    ncols = max(1, math.ceil(need / (fig.get_figheight() - decoration_in)))
    if ncols > 1:
        fig.set_figwidth(fig.get_figwidth() + (ncols - 1) * COLUMN_IN)
    return ncols


def legend(ax, handles=None, labels=None, **kw):
    """Beside the axes (never over the data), upper left of the space right of them; the figure grows (or
    the legend takes columns) so that it is no taller than the axes."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    ncols = _legend_columns(ax.figure, labels, 1.4)
    return ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                     ncols=ncols, **kw)


def fig_legend(fig, handles, labels, where: str = "right", **kw):
    """One legend for every panel, outside them ('right' or 'bottom'; constrained layout makes room)."""
    if not handles:
        return None
    if where == "bottom":
        return fig.legend(handles, labels, loc="outside lower center", ncols=min(len(handles), 4), **kw)
    return fig.legend(handles, labels, loc="outside right upper", ncols=_legend_columns(fig, labels, 0.6), **kw)


def wrap(title: str, width: int = 80) -> str:
    """Each line of title wrapped at `width` characters, breaking after a space, comma or '/' (a config value
    like `projections=q,k,v,o,gate,up,down` breaks between its items); a word longer than a line breaks
    after '=', '_' or '-', else anywhere."""
    out = []
    for line in title.split("\n"):
        cur = ""
        for word in re.findall(r"[^ ,/]+[ ,/]*|[ ,/]+", line):
            pieces = [word] if len(word.rstrip()) <= width else re.findall(r"[^=_-]+[=_-]*|[=_-]+", word)
            for tok in pieces:
                if cur.strip() and len((cur + tok).rstrip()) > width:
                    out.append(cur.rstrip())
                    cur = tok.lstrip()
                else:
                    cur += tok
                while len(cur.rstrip()) > width:
                    out.append(cur[:width])
                    cur = cur[width:]
        out.append(cur.rstrip())
    return "\n".join(out)


def fit(text: str, inches: float, fontsize: float = 10) -> str:
    """text wrapped to a width of `inches` at `fontsize` (DejaVu Sans averages about 0.6 em a character)."""
    return wrap(text, max(12, int(inches * 72 / (0.62 * fontsize))))


def short(label: str, width: int = 28) -> str:
    """A legend label of at most two lines of `width` characters (the long form is in the report's tables)."""
    lines = wrap(label, width).split("\n")
    if len(lines) > 2:
        lines = [lines[0], lines[1][:width - 1] + "…"]
    return "\n".join(lines)


def note(ax, text: str):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True, fontsize=9, color="#555555")


def dodge(k: int, n: int, step: float = 0.008) -> float:
    """The factor that moves the k-th of n series sideways on a log axis (decades), so their error bars
    do not sit on one another."""
    return 10 ** ((k - (n - 1) / 2) * step)


OFFSETS = ((5, 4, "left", "bottom"), (5, -4, "left", "top"), (-5, 4, "right", "bottom"), (-5, -4, "right", "top"),
           (0, 8, "center", "bottom"), (0, -8, "center", "top"), (9, 0, "left", "center"), (-9, 0, "right", "center"))


def place_labels(ax, items, avoid=(), radius: float = 8.0, **text_kw) -> int:
    """Point labels that overlap no other label, no marker and nothing outside the axes: items are
    (x, y, text) in data coordinates; each label takes the first of OFFSETS that fits and is left out where
    none does; it keeps clear of every vertex of the axes' lines in data coordinates and of the points in
    `avoid`. Freezes the figure's layout (placement needs final positions), so call it last. Returns how
    many were left out."""
    fig = ax.figure
    freeze_layout(fig)
    renderer = fig.canvas.get_renderer()
    box = ax.get_window_extent(renderer)
    pts = [(x, y) for x, y, _ in items] + list(avoid)
    pts += [tuple(v) for line in ax.lines if line.get_transform() is ax.transData for v in line.get_xydata()]
    pts = np.array([p for p in pts if np.isfinite(p).all()], dtype=float).reshape(-1, 2)
    points = ax.transData.transform(pts)
    placed: list = []
    left_out = 0
    kw = {"fontsize": 7, "color": "#444444", **text_kw}
    for x, y, text in items:
        for dx, dy, ha, va in OFFSETS:
            t = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, **kw)
            bb = t.get_window_extent(renderer)
            inside = box.x0 <= bb.x0 and bb.x1 <= box.x1 and box.y0 <= bb.y0 and bb.y1 <= box.y1
            clear = not any(_overlap(bb, p) for p in placed) and not any(
                bb.x0 - radius < px < bb.x1 + radius and bb.y0 - radius < py < bb.y1 + radius for px, py in points)
            if inside and clear:
                placed.append(bb)
                break
            t.remove()
        else:
            left_out += 1
    return left_out


def _overlap(a, b, tol: float = 1.0) -> bool:
    """Two display boxes share more than `tol` pixels in both directions."""
    return min(a.x1, b.x1) - max(a.x0, b.x0) > tol and min(a.y1, b.y1) - max(a.y0, b.y0) > tol


def drawn_texts(fig) -> list[tuple[Text, object]]:
    """Every non-empty text the figure draws (titles, labels, tick labels, legend texts, annotations), with
    its window extent: recorded while drawing, so tick labels outside the view and hidden axes are left out."""
    drawn: dict = {}
    original = Text.draw

    def draw(self, renderer):
        original(self, renderer)
        if self.get_visible() and self.get_text().strip():
            drawn.setdefault(id(self), (self, self.get_window_extent(renderer)))

    Text.draw = draw
    try:
        fig.canvas.draw()
    finally:
        Text.draw = original
    return list(drawn.values())


def layout_problems(fig) -> list[str]:
    """What makes a drawn figure hard to read, checked mechanically (empty: none found):
    text that runs off the canvas, two texts whose boxes overlap (1-px tolerance), a legend larger than its
    axes or over an axes' data area, an axis with tick labels but no label."""
    freeze_layout(fig)  # what save() writes
    texts = drawn_texts(fig)
    renderer = fig.canvas.get_renderer()
    W, H = fig.bbox.width, fig.bbox.height
    out = []

    def name(t):
        s = t.get_text().replace("\n", " ")
        return repr(s if len(s) <= 40 else s[:39] + "…")

    for t, bb in texts:
        bb = cast(Any, bb)
        if bb.x0 < -1 or bb.y0 < -1 or bb.x1 > W + 1 or bb.y1 > H + 1:
            out.append(f"text {name(t)} runs off the figure ({bb.x0:.0f},{bb.y0:.0f})-({bb.x1:.0f},{bb.y1:.0f}) "
                       f"of {W:.0f}x{H:.0f} px")
    for i, (a, ba) in enumerate(texts):
        for b, bb in texts[i + 1:]:
            if _overlap(ba, bb):
                out.append(f"texts {name(a)} and {name(b)} overlap")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    legends = [(ax.get_legend(), ax) for ax in axes if ax.get_legend() is not None]
    legends += [(lg, None) for lg in fig.legends]
    for lg, owner in legends:
        if not lg.get_visible():
            continue
        lb = lg.get_window_extent(renderer)
        if owner is not None:
            ab = owner.get_window_extent(renderer)
            if lb.width > ab.width + 1 or lb.height > ab.height + 1:
                out.append(f"a legend ({lb.width:.0f}x{lb.height:.0f} px) is larger than its axes "
                           f"({ab.width:.0f}x{ab.height:.0f} px)")
        for ax in axes:
            if ax.axison and _overlap(lb, ax.get_window_extent(renderer)):
                out.append(f"a legend covers the data area of the axes titled {name(ax.title)}")
    for ax in axes:
        if not ax.axison:
            continue
        twins = [ax, *ax.child_axes]  # a secondary axis may carry the label
        for axis, label in ((ax.xaxis, " ".join(a.get_xlabel() for a in twins)),
                            (ax.yaxis, " ".join(a.get_ylabel() for a in twins))):
            own = {id(t) for t in axis.get_ticklabels() + axis.get_ticklabels(minor=True)}
            if any(id(t) in own for t, _ in texts) and not label.strip():
                out.append(f"the {axis.axis_name} axis of the axes titled {name(ax.title)} has no label")
    return out


# --- which cells a figure shows ---------------------------------------------------------------
def main_cells(cells: pd.DataFrame) -> pd.DataFrame:
    """Each method's main series (every series where the table has no `main` column)."""
    return cells[cells["main"].astype(bool)] if "main" in cells.columns else cells


def _ordered_series(cells: pd.DataFrame, pal: Palette) -> list[tuple[str, str]]:
    pairs = {(m, s) for m, s in zip(cells["method"], cells["series"])}
    return sorted(pairs, key=lambda p: (pal.key(p[0]), p[1]))


def _styles(pal: Palette, drawn: list[tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """series -> (marker, line style): the method's own where it is the method's only series drawn, else
    the series' (cells without a `main` column draw every series)."""
    per: dict = {}
    for m, _ in drawn:
        per[m] = per.get(m, 0) + 1
    return {s: (pal.method_marker(m), pal.method_line(m)) if per[m] == 1 else (pal.marker(s), pal.line(s))
            for m, s in drawn}


def _reference_cells(cells: pd.DataFrame) -> pd.DataFrame:
    """The cells of one setting's reference series (full fine-tuning; see stats.cells)."""
    return cells[(cells["ft_series"] != "") & (cells["series"] == cells["ft_series"])] if len(cells) else cells


def _ft(cells: pd.DataFrame):
    ft = _reference_cells(cells)
    return ft.sort_values("budget_fraction").iloc[-1] if len(ft) else None


def _reference_method(cells: pd.DataFrame) -> str | None:
    """Drawn as a line to compare against, not as a series of its own."""
    ref = _reference_cells(cells)
    return ref["method"].iloc[0] if len(ref) else None


def _errorbar(ax, x, y, err, color, marker, ls, label, hollow=False, **kw):
    """A series with its 95% intervals as thin, paler bars (no bar where an interval is unknown)."""
    err = np.nan_to_num(np.asarray(err, dtype=float), nan=0.0)
    return ax.errorbar(x, y, yerr=err if (err > 0).any() else None, color=color, marker=marker,
                       ls=ls if len(x) > 1 else "none", mfc="white" if hollow else color, mec=color,
                       ecolor=to_rgba(color, 0.55), elinewidth=0.9, capsize=2.5, label=label, **kw)


# --- 1. accuracy vs trainable parameters ------------------------------------------------------
def accuracy_vs_params(cells: pd.DataFrame, plateaus: Mapping[str, Plateau | None], pal: Palette, title: str):
    fig, axes = figure(7.6, 4.4)
    ax = axes[0, 0]
    ev = cells[cells["n"] > 0]
    ft = _ft(ev)
    main = main_cells(ev)
    ref = _reference_method(cells)
    drawn = [(m, s) for m, s in _ordered_series(main, pal) if m != ref]
    styles = _styles(pal, drawn)
    for k, (method, series) in enumerate(drawn):
        c = main[main["series"] == series].sort_values("budget_fraction")
        x = c["trainable_pct"].to_numpy() * dodge(k, len(drawn))
        y = c["acc_mean"].to_numpy()
        col = pal.color(method)
        _errorbar(ax, x, y, c["acc_ci"], col, *styles[series],
                  short(series), zorder=3)
        pl = plateaus.get(series)
        if pl is not None and pl.index is not None and pl.budget in list(c["budget_fraction"]):
            i = list(c["budget_fraction"]).index(pl.budget)
            ax.plot([x[i]], [y[i]], marker="*", ms=15, mfc="none", mec=col, mew=1.2, ls="none", zorder=4)
    if ft is not None:
        col = pal.color(ft["method"])
        ax.axhline(ft["acc_mean"], color=col, ls="--", lw=1.2, label=f"{ft['series']} (n={ft['n']})")
        if np.isfinite(ft["acc_ci"]):
            ax.axhspan(ft["acc_mean"] - ft["acc_ci"], ft["acc_mean"] + ft["acc_ci"], color=col, alpha=0.10, lw=0)
    if drawn or ft is not None:
        if any((p := plateaus.get(s)) is not None and p.index is not None for _, s in drawn):
            ax.plot([], [], marker="*", ms=11, mfc="none", mec="#333333", ls="none", label="plateau start")
        _logx(ax)
        handles, labels = ax.get_legend_handles_labels()  # the methods first, then full FT and the star
        order = sorted(range(len(labels)), key=lambda i: not isinstance(handles[i], ErrorbarContainer))
        legend(ax, [handles[i] for i in order], [labels[i] for i in order])
    else:
        note(ax, "no evaluated runs in this setting")
    ax.set_xlabel("trainable parameters (% of model, achieved; log scale)")
    ax.set_ylabel("mean accuracy (%)")
    fig.suptitle(fit(f"{title}: each method at its main settings", fig.get_figwidth()), fontsize=10)
    return fig


# --- 1b. each method's variants against its main series -----------------------------------------
def variants(cells: pd.DataFrame, pal: Palette, title: str):
    """Small multiples: one panel per (method, variant series), the method's main series beside it as the
    reference. None where no method has a variant with an evaluated run."""
    if "main" not in cells.columns:
        return None
    ev = cells[cells["n"] > 0]
    panels = [(m, s) for m, s in _ordered_series(ev[~ev["main"].astype(bool)], pal)]
    if not panels:
        return None
    ft = _ft(ev)
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    width = 2.7 * ncols + 0.8
    fig, axes = figure(width, 2.5 * nrows + 1.3, nrows, ncols, sharex=True, sharey=True)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for i, (ax, (method, series)) in enumerate(zip(axes.flat, panels)):
        col, marker = pal.color(method), pal.method_marker(method)
        main = ev[(ev["method"] == method) & ev["main"].astype(bool)].sort_values("budget_fraction")
        var = ev[ev["series"] == series].sort_values("budget_fraction")
        if len(main):
            _errorbar(ax, main["trainable_pct"].to_numpy() * dodge(0, 2, 0.02), main["acc_mean"].to_numpy(),
                      main["acc_ci"], col, marker, "--", None, hollow=True, lw=1.0)
        _errorbar(ax, var["trainable_pct"].to_numpy() * dodge(1, 2, 0.02), var["acc_mean"].to_numpy(),
                  var["acc_ci"], col, marker, "-", None, lw=1.6)
        if ft is not None:
            ax.axhline(ft["acc_mean"], color=pal.color(ft["method"]), ls=":", lw=1.0)
        _logx(ax)
        variant = var["variant"].iloc[0] if "variant" in var.columns and var["variant"].iloc[0] else series
        ax.set_title(fit(f"{method}: {variant}", 2.5, 8), fontsize=8)
        below = i + ncols
        if below >= len(panels):  # the lowest panel of its column: x labels (sharex hides inner ones)
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel("trainable parameters (%, log)")
        if i % ncols == 0:
            ax.set_ylabel("mean accuracy (%)")
    handles = [Line2D([], [], color="#333333", marker="o", ls="-", lw=1.6, label="variant (± 95% CI)"),
               Line2D([], [], color="#333333", marker="o", mfc="white", ls="--", lw=1.0,
                      label="the method's main series (± 95% CI)")]
    if ft is not None:
        handles.append(Line2D([], [], color=pal.color(ft["method"]), ls=":", lw=1.0, label=f"{ft['series']}"))
    fig_legend(fig, handles, [h.get_label() for h in handles], where="bottom")
    fig.suptitle(fit(f"{title}: each variant against its method's main series", width, 10), fontsize=10)
    return fig


# --- 2. memory --------------------------------------------------------------------------------
def _bar_cells(cells: pd.DataFrame, pal: Palette) -> pd.DataFrame:
    order = sorted(range(len(cells)), key=lambda i: (pal.key(cells.iloc[i]["method"]), cells.iloc[i]["series"],
                                                     cells.iloc[i]["budget_fraction"]))
    return cells.iloc[order]


BAR_IN = 0.42  # inches per bar


def _grouped_positions(c: pd.DataFrame, fontsize: float = 8) -> tuple[np.ndarray, list[tuple[float, str, str]]]:
    """x of each bar, grouped by series with a gap between groups; each group at least as wide as its
    (wrapped) label. Returns the bar positions and (centre, label, method) per group."""
    xs, groups, pos = [], [], 0.0
    for series, g in c.groupby("series", sort=False):
        label = wrap(series, 14)
        need = max(len(line) for line in label.split("\n")) * 0.62 * fontsize / 72 / BAR_IN + 0.3
        slots = max(len(g), need)
        start = pos + (slots - len(g)) / 2
        xs += [start + i for i in range(len(g))]
        groups.append((start + (len(g) - 1) / 2, label, g["method"].iloc[0]))
        pos += slots + 0.6
    return np.array(xs), groups


def memory(cells: pd.DataFrame, pal: Palette, title: str):
    c = _bar_cells(main_cells(cells), pal)
    ft = _ft(cells)
    denom = ft["peak_memory_bytes"] if ft is not None and np.isfinite(ft["peak_memory_bytes"]) else None
    scale, unit = (denom, "÷ full FT's measured peak") if denom else (GIB, "GiB (no full-FT run)")
    x, groups = _grouped_positions(c) if len(c) else (np.zeros(0), [])
    span = (x.max() + 1.5) if len(x) else 4
    width = max(6.0, BAR_IN * span + 3.2)
    fig, axes = figure(width, 4.4)
    ax = axes[0, 0]
    if not len(c):
        note(ax, "no finished runs in this setting")
    bottom = np.zeros(len(c))
    for part in MEMORY_PARTS:
        v = np.nan_to_num(c[f"mem_{part}"].to_numpy(dtype=float), nan=0.0) / scale
        ax.bar(x, v, 0.8, bottom=bottom, color=PART_COLORS[part], hatch=PART_HATCHES[part], label=f"{part} (analytic)",
               edgecolor=[pal.color(m) for m in c["method"]], linewidth=1.0)
        bottom += v
    peak = c["peak_memory_bytes"].to_numpy(dtype=float) / scale
    ax.plot(x, peak, ls="none", marker="D", color="black", ms=5, label="measured peak")
    if denom:
        ax.axhline(1.0, color=pal.color(ft["method"]), ls="--", lw=0.8, label=f"{ft['series']} peak = 1")
    ax.set_xticks(x, [fmt_budget(b) for b in c["budget_fraction"]])
    ax.grid(False, axis="x")
    if len(x):
        ax.set_xlim(x.min() - 0.8, x.max() + 0.8)
    sec = ax.secondary_xaxis("bottom")
    sec.set_xticks([g[0] for g in groups], [g[1] for g in groups])
    sec.tick_params(length=0, pad=16, labelsize=8)
    for tick, (_, _, m) in zip(sec.get_xticklabels(), groups):
        tick.set_color(pal.color(m))
    sec.set_xlabel("method (main series) and trainable budget (% of model)")
    sec.spines["bottom"].set_visible(False)
    kinds = ",".join(sorted(set(",".join(c["peak_memory_kind"]).split(",")) - {""})) if len(c) else ""
    ax.set_ylabel(f"memory, {unit}")
    legend(ax)
    fig.suptitle(fit(title + (f" · peak kind: {kinds}" if kinds else ""), fig.get_figwidth()), fontsize=10)
    return fig


# --- 3. throughput ----------------------------------------------------------------------------
def throughput(cells: pd.DataFrame, pal: Palette, title: str):
    ft = _ft(cells)
    main = main_cells(cells)
    ref_method = _reference_method(cells)
    drawn = [(m, s) for m, s in _ordered_series(main, pal) if m != ref_method]
    styles = _styles(pal, drawn)
    fig, axes = figure(10.0, 4.0, 1, 2)
    handles: dict = {}
    for ax, col, name, unit in ((axes[0, 0], "tokens_per_s", "training throughput", "tokens/s"),
                                (axes[0, 1], "median_step_time_s", "median step time", "s")):
        ref = ft[col] if ft is not None and np.isfinite(ft[col]) and ft[col] > 0 else None
        scale = ref if ref else 1.0
        for k, (method, series) in enumerate(drawn):
            c = main[main["series"] == series].sort_values("budget_fraction")
            x = c["trainable_pct"].to_numpy() * dodge(k, len(drawn))
            h = _errorbar(ax, x, c[col].to_numpy() / scale, c[f"{col}_ci"].to_numpy() / scale, pal.color(method),
                          *styles[series], short(series))
            handles.setdefault(series, h)
        if ref:
            h = ax.axhline(1.0, color=pal.color(ft["method"]), ls="--", lw=1.2, label=f"{ft['series']} = 1")
            handles.setdefault("\0ref", h)
        elif ft is not None:
            h = ax.axhline(ft[col], color=pal.color(ft["method"]), ls="--", lw=1.2, label=ft["series"])
            handles.setdefault("\0ref", h)
        if drawn:
            _logx(ax)
        elif ft is None:
            note(ax, "no finished runs in this setting")
        ax.set_xlabel("trainable parameters (% of model, log scale)")
        ax.set_ylabel(f"{name} ÷ full FT's (ratio of {unit})" if ref else f"{name} ({unit})")
    hs = list(handles.values())
    fig_legend(fig, hs, [h.get_label() for h in hs])
    fig.suptitle(fit(f"{title}: each method at its main settings (mean ± 95% CI over seeds)", fig.get_figwidth()),
                 fontsize=10)
    return fig


# --- 4. Pareto --------------------------------------------------------------------------------
def pareto(cells: pd.DataFrame, pal: Palette, title: str):
    c = _bar_cells(main_cells(cells[cells["n"] > 0]), pal)
    fig, axes = figure(7.6, 4.6)
    ax = axes[0, 0]
    use_ratio = c["mem_ratio"].notna().any() if len(c) else False
    xcol = "mem_ratio" if use_ratio else "peak_memory_bytes"
    x = c[xcol].to_numpy(dtype=float) / (1.0 if use_ratio else GIB)
    y = c["acc_mean"].to_numpy(dtype=float)
    front = pareto_front(x, y)
    seen = set()
    styles = _styles(pal, _ordered_series(c, pal))
    for xi, yi, m, s in zip(x, y, c["method"], c["series"]):
        ax.plot([xi], [yi], marker=styles[s][0], color=pal.color(m), ls="none", ms=7,
                label=short(s) if s not in seen else None, zorder=3)
        seen.add(s)
    pts = sorted((xi, yi, b) for xi, yi, b, f in zip(x, y, c["budget_fraction"], front) if f)
    if pts:
        px, py, _ = zip(*pts)
        ax.step(px, py, where="post", color="black", lw=0.8, ls=":", label="Pareto front")
        ax.plot(px, py, ls="none", marker="o", ms=13, mfc="none", mec="black", mew=0.6,
                label="on the front (budget labelled)")
    else:
        note(ax, "no evaluated runs with a measured peak in this setting")
    ax.set_xlabel("peak memory ÷ full FT's measured peak" if use_ratio else "peak memory (GiB; no full-FT run)")
    ax.set_ylabel("mean accuracy (%)")
    legend(ax)
    fig.suptitle(fit(f"{title}: each method at its main settings", fig.get_figwidth()), fontsize=10)
    if pts:
        place_labels(ax, [(xi, yi, fmt_budget(b)) for xi, yi, b in pts])
    return fig


# --- 4b. forgetting beside accuracy -------------------------------------------------------------
def forgetting(cells: pd.DataFrame, pal: Palette, title: str):
    """Left: the held-out NLL change per budget (as accuracy_vs_params draws accuracy). Right: accuracy
    against that change, one point per budget, each series joined in budget order. None without forgetting."""
    ev = cells[(cells["n"] > 0) & (cells["forget_n"] > 0)] if "forget_n" in cells.columns else cells.iloc[:0]
    if not len(ev):
        return None
    fig, axes = figure(11.0, 4.4, 1, 2)
    left, right = axes[0, 0], axes[0, 1]
    main = main_cells(ev)
    ft = _ft(ev)
    ref = _reference_method(ev)
    drawn = [(m, s) for m, s in _ordered_series(main, pal) if m != ref]
    styles = _styles(pal, drawn)
    for k, (method, series) in enumerate(drawn):
        c = main[main["series"] == series].sort_values("budget_fraction")
        col = pal.color(method)
        x = c["trainable_pct"].to_numpy() * dodge(k, len(drawn))
        _errorbar(left, x, c["forget_mean"].to_numpy(), c["forget_ci"], col, *styles[series], short(series),
                  zorder=3)
        fx = c["forget_mean"].to_numpy(dtype=float)
        fy = c["acc_mean"].to_numpy(dtype=float)
        right.errorbar(fx, fy, xerr=np.nan_to_num(c["forget_ci"].to_numpy(dtype=float)),
                       yerr=np.nan_to_num(c["acc_ci"].to_numpy(dtype=float)), color=col, marker=styles[series][0],
                       ls=styles[series][1] if len(fx) > 1 else "none", lw=0.9, mfc=col, mec=col,
                       ecolor=to_rgba(col, 0.4), elinewidth=0.8, capsize=2, zorder=3)
    if ft is not None:
        col = pal.color(ft["method"])
        left.axhline(ft["forget_mean"], color=col, ls="--", lw=1.2, label=f"{ft['series']} (n={ft['forget_n']})")
        if np.isfinite(ft["forget_ci"]):
            left.axhspan(ft["forget_mean"] - ft["forget_ci"], ft["forget_mean"] + ft["forget_ci"], color=col,
                         alpha=0.10, lw=0)
        right.errorbar([ft["forget_mean"]], [ft["acc_mean"]], xerr=[np.nan_to_num(ft["forget_ci"])],
                       yerr=[np.nan_to_num(ft["acc_ci"])], color=col, marker="*", ms=11, ls="none",
                       ecolor=to_rgba(col, 0.5), elinewidth=0.8, capsize=2, zorder=4)
    for ax in (left, right):
        ax.axhline(0, color="#999999", lw=0.6, zorder=0) if ax is left else ax.axvline(0, color="#999999", lw=0.6,
                                                                                      zorder=0)
    _logx(left)
    # NLL changes span 1e-3 .. several nats across methods: linear within ±0.01, logarithmic beyond
    left.set_yscale("symlog", linthresh=0.01, linscale=0.5)
    right.set_xscale("symlog", linthresh=0.01, linscale=0.5)
    top = float(np.nanmax(ev["forget_mean"] + np.nan_to_num(ev["forget_ci"].to_numpy(dtype=float))))
    if top > 0.01:  # room above the largest interval (a symlog axis adds no margin of its own)
        left.set_ylim(top=top * 2)
        right.set_xlim(right=top * 2)
    left.set_xlabel("trainable parameters (% of model, achieved; log scale)")
    left.set_ylabel("held-out NLL change (nats; + = forgot; symlog)")
    left.set_title("forgetting per budget", fontsize=9)
    right.set_xlabel("held-out NLL change (nats; + = forgot; symlog)")
    right.set_ylabel("mean accuracy (%)")
    right.set_title("accuracy vs forgetting (each series joined in budget order)", fontsize=9)
    handles, labels = left.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: not isinstance(handles[i], ErrorbarContainer))
    fig_legend(fig, [handles[i] for i in order], [labels[i] for i in order])
    fig.suptitle(fit(f"{title}: each method at its main settings (mean ± 95% CI over seeds)", fig.get_figwidth()),
                 fontsize=10)
    return fig


# --- 5. published numbers ---------------------------------------------------------------------
def published_overlay(groups: list[dict], pal: Palette):
    """groups: [{'title', 'published': DataFrame, 'cells': DataFrame of matching cells, 'note'}]."""
    n = max(len(groups), 1)
    fig, axes = figure(8.4 * n, 4.8, 1, n)
    if not groups:
        note(axes[0, 0], "no published numbers")
    labels = []
    for ax, g in zip(axes.flat, groups):
        pub = g["published"]
        for method in sorted(set(pub["method"]), key=pal.key):
            p = pub[pub["method"] == method].sort_values("trainable_pct")
            ax.plot(p["trainable_pct"], p["mean_accuracy"], color=pal.color(method), ls="--",
                    marker=pal.method_marker(method), mfc="white", label=f"{method} (published)")
            labels.append((ax, [(r["trainable_pct"], r["mean_accuracy"], f"r={int(r['rank'])}")
                                for _, r in p.iterrows() if pd.notna(r.get("rank"))]))
        c = main_cells(g["cells"])
        if len(c):
            for method, series in _ordered_series(c, pal):
                s = c[c["series"] == series].sort_values("budget_fraction")
                _errorbar(ax, s["trainable_pct"].to_numpy(), s["acc_mean"].to_numpy(), s["acc_ci"], pal.color(method),
                          pal.method_marker(method), "-", f"{short(series, 20)} (this benchmark)")
        _logx(ax)
        ax.set_xlabel("trainable parameters (% of model, log scale)")
        ax.set_ylabel("mean accuracy (%)")
        ax.set_title(fit(g["title"], 5.6, 9), fontsize=9)
        if g.get("note"):  # below the axis label, inside the layout
            ax.annotate(fit(g["note"], 7.6, 7.5), (0, 0), xycoords="axes fraction", xytext=(0, -40),
                        textcoords="offset points", va="top", fontsize=7.5, color="#a00000", annotation_clip=False)
        legend(ax, fontsize=7)
    for ax, items in labels:  # rank labels last: placing them freezes the layout
        place_labels(ax, items, fontsize=6.5)
    return fig


FIGURES = (  # per setting; methods add their own (registry.Contribution.figures)
    registry.Figure(
        "accuracy_vs_params", "Accuracy vs trainable parameters",
        "Each method at its main settings: mean accuracy over seeds against the achieved trainable share of the "
        "model (log scale); bars are 95% t-intervals over seeds (none where a budget has one seed), the series "
        "nudged sideways so they do not hide one another. Full FT is the dashed line with its band; a hollow star "
        "marks each method's plateau start. Other series are in the variants figure.",
        lambda s: accuracy_vs_params(s.cells, s.plateaus, s.palette, s.label)),
    registry.Figure(
        "memory", "Peak memory relative to full FT",
        "Each method at its main settings. Bars: the analytic breakdown (weights, gradients, optimizer state, "
        "activations saved for backward in one step; `train_info.memory_breakdown_bytes`), stacked. Marker: the "
        "measured peak (`peak_memory_bytes`, of the kind named in the title). Both are divided by full FT's "
        "measured peak.",
        lambda s: memory(s.cells, s.palette, s.label)),
    registry.Figure(
        "throughput", "Throughput and step time relative to full FT",
        "Each method at its main settings: training tokens/s and median step time, each divided by full FT's "
        "(mean ± 95% CI over seeds).",
        lambda s: throughput(s.cells, s.palette, s.label)),
    registry.Figure(
        "pareto", "Accuracy vs peak memory (Pareto front)",
        "Each point is one method at its main settings and one budget (mean over seeds); the dotted step line "
        "joins the points no other drawn point beats on both accuracy and peak memory, each labelled with its "
        "budget.",
        lambda s: pareto(s.cells, s.palette, s.label)),
    registry.Figure(
        "forgetting", "Forgetting beside accuracy",
        "Each method at its main settings. Forgetting is the change of the mean token NLL on held-out general "
        "text, tuned minus base model (`eval.forgetting.delta`, nats; positive: the model got worse at it). Left: "
        "that change per trainable budget, full FT dashed with its band. Right: accuracy against it, one point "
        "per budget (each series joined from its smallest budget to its largest), full FT a star; bars are 95% "
        "t-intervals over seeds. The NLL axes are linear within ±0.01 nats and logarithmic beyond.",
        lambda s: forgetting(s.cells, s.palette, s.label)),
    registry.Figure(
        "variants", "Each method's variants against its main series",
        "One panel per series that is not its method's main one (named by what differs from the main series): "
        "its mean accuracy ± 95% t-interval over seeds per budget (filled, solid), the method's main series "
        "beside it (hollow, dashed), full FT dotted.",
        lambda s: variants(s.cells, s.palette, s.label)),
)
