"""The experiment's figures, comparing its variants: robustness against total compute (final models
and the frontier of checkpoints), where each variant's trained units sit, robustness against eps. One
cost basis (`total_cost`) on every axis, one colour per variant across figures (`variant_colors`)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import AdvtuneError
from ..frontier import PLATEAU_TOLERANCE, curves, reference_plateau
from .costs import base_unrecorded, total_cost, total_words
from .narrative import ADAPTER_GRANULARITIES, describe_short, short_layer_names
from .plots import figure, label_bars, save_figure


def matplotlib_colors(n: int) -> list:
    """n distinct colours, stable per position."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def variant_colors(names: list[str]) -> dict[str, tuple]:
    """One colour per variant, the same in every figure of a report."""
    return dict(zip(names, matplotlib_colors(len(names))))


def cost_axis(ax) -> None:
    """A log x axis of gradient evaluations with readable ticks (20k, 150k, 1.2M), no crowded minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))

    def short(v, _pos) -> str:
        for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if v >= div:
                return f"{v / div:g}{suffix}"
        return f"{v:g}"

    ax.xaxis.set_major_formatter(FuncFormatter(short))
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_pareto(rows: list[dict], path: str | os.PathLike, colors: Mapping[str, tuple] | None = None) -> Path:
    """Final models: worst-case robust accuracy against total cost (`total_cost`, log scale), one colour
    per variant and a legend instead of labels that overlap."""
    colors = colors or variant_colors([r["variant"] for r in rows])
    fig = figure(7.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for r in rows:
        marker = "X" if r.get("suspect") else {"train": "s", "standard": "D"}.get(r["kind"], "o")
        ax.scatter(
            [max(1, total_cost(r))],
            [100 * r["robust_acc"]],
            color=colors.get(r["variant"], "k"),
            marker=marker,
            s=55,
            zorder=3,
            label=f"{r['variant']} ({100 * r['robust_acc']:.1f}%)"
            + (" SUSPECT" if r.get("suspect") else "")
            + (f", cost {total_words(r)}" if base_unrecorded(r) else ""),
        )
    cost_axis(ax)
    ax.set_xlabel("total gradient evaluations (log): training + base model + analysis")
    ax.set_ylabel("worst-case robust accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(
        "Final models: robustness vs compute (squares: trained from scratch; diamond: the base model; X: suspect)",
        fontsize=9,
    )
    return save_figure(fig, path)


def plot_trained_units(rows: list[dict], path: str | os.PathLike, colors: Mapping[str, tuple]) -> Path | None:
    """Per layer, the share of its units each fine-tuning variant trains (bar labels: units trained):
    where a selection sits, next to the random control with as many parameters."""
    rs = [r for r in rows if r.get("selected_by_layer")]
    if not rs:
        return None
    names = list(rs[0]["selected_by_layer"])
    short = short_layer_names(names)
    fig = figure(max(5.5, 1.3 * len(names) + 3), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(rs)
    for i, r in enumerate(rs):
        by = r["selected_by_layer"]
        units = [by.get(n, [0, 1])[0] for n in names]
        pct = [100 * u / max(by.get(n, [0, 1])[1], 1) for n, u in zip(names, units)]
        xs = np.arange(len(names)) + i * width - 0.4 + width / 2
        bars = ax.bar(xs, pct, width, color=colors.get(r["variant"], "k"), label=describe_short(r))
        # adapters' counts are ranks (of the layer's largest rank): labelled "r7", a whole layer "all"
        adapters = r.get("granularity") in ADAPTER_GRANULARITIES
        sparse = r.get("granularity") in ("sparse", "probe")  # its counts are single weight entries: labelled "e3245"
        tags = [
            "" if not u else ("all" if p >= 100 else f"r{u}") if adapters else f"e{u}" if sparse else str(u)
            for u, p in zip(units, pct)
        ]
        label_bars(ax, bars, tags, fontsize=6, lift=1)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([short[n] for n in names], fontsize=8)
    ax.set_ylabel("units (adapters: rank; sparse: entries) trained, % of the layer", fontsize=8)
    ax.set_ylim(0, 112)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(
        "Where each fine-tuning variant's trained units sit (labels: units; r: an adapter's rank; e: entries)",
        fontsize=9,
    )
    return save_figure(fig, path)


def plot_frontier(
    points: list[dict],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    colors: Mapping[str, tuple] | None = None,
) -> Path:
    """Worst-case robust accuracy against total gradient evaluations, one curve per variant (from its
    snapshots), with the reference's plateau as a dashed line. The x axis counts every curve the same
    way: fine-tuning curves include the base model's training and the analysis behind a selection."""
    fig = figure(7.0, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    by = curves(points)
    colors = colors or variant_colors(list(by))
    for name, pts in by.items():
        xs = [max(1, p["total_grad_evals"]) for p in pts]
        ys = [100 * p["robust_acc"] for p in pts]
        style = "-" if len(pts) > 1 else ""
        ref = pts[0].get("reference")
        ax.plot(
            xs,
            ys,
            style,
            marker="s" if ref else "o",
            ms=4,
            lw=2.2 if ref else 1.4,
            color=colors.get(name, "k"),
            label=_best_label(name, ys, pts),
        )
        for x, y, p in zip(xs, ys, pts):
            if p.get("suspect"):
                ax.scatter([x], [y], marker="x", color="red", s=50, zorder=4)
    try:
        plat = reference_plateau(points)
        ax.axhline(100 * plat.robust_acc, ls="--", color="grey", lw=1)
        ax.axhline(100 * (plat.robust_acc - 0.02), ls=":", color="grey", lw=1)
        ax.axvline(plat.cost, ls=":", color="grey", lw=1)
        ax.axvline(0.25 * plat.cost, ls=":", color="tab:green", lw=1)
        ax.annotate(
            f"{plat.variant} {'best (still rising)' if plat.still_rising else 'plateau'} {100 * plat.robust_acc:.1f}% "
            f"(reached within {100 * PLATEAU_TOLERANCE:g} pt at {plat.cost:,}); dotted: that - 2 pt",
            (plat.cost, 100 * plat.robust_acc),
            fontsize=7,
            ha="right",
            xytext=(-4, 4),
            textcoords="offset points",
        )
        ax.annotate(
            "25% of that cost",
            (0.25 * plat.cost, 2),
            fontsize=7,
            color="tab:green",
            ha="right",
            xytext=(-3, 0),
            textcoords="offset points",
        )
    except AdvtuneError:
        pass
    cost_axis(ax)
    ax.set_xlabel("total gradient evaluations (log): training + base model + analysis")
    ax.set_ylabel("worst-case robust accuracy (%)")
    # room above the best point for the plateau's label; a low-robustness setting (CIFAR-10) is not squashed
    top = max([100 * p["robust_acc"] for p in points] + [10.0])
    ax.set_ylim(-2, min(102, top * 1.25 + 5))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(title or "Robustness per compute (x: suspect evaluation)", fontsize=9)
    return save_figure(fig, path)


def plot_eps_sweep(rows: list[dict], path: str | os.PathLike, colors: Mapping[str, tuple] | None = None) -> Path | None:
    """Robust accuracy vs eps for each variant family, when the experiment sweeps eps (a family takes
    the colour of its first variant)."""
    fams: dict[str, list[tuple[float, float]]] = {}
    first: dict[str, str] = {}
    for r in rows:
        fams.setdefault(_family(r), []).append((r["eps"], r["robust_acc"]))
        first.setdefault(_family(r), r["variant"])
    if not any(len({e for e, _ in pts}) > 1 for pts in fams.values()):
        return None
    colors = colors or variant_colors([r["variant"] for r in rows])
    fig = figure(6.4, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    for fam, pts in fams.items():
        pts.sort()
        ax.plot([e for e, _ in pts], [100 * a for _, a in pts], marker="o", label=fam, color=colors.get(first[fam]))
    ax.set_xlabel("eps (training and evaluation)")
    ax.set_ylabel("worst-case robust accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return save_figure(fig, path)


def _family(r: dict) -> str:
    """A variant's name without its eps suffix (eps sweeps are drawn as one line per family)."""
    return re.sub(r"-eps[0-9.e-]+", "", r["variant"])


def _best_label(name: str, ys: list[float], pts: list[dict]) -> str:
    """A curve's legend: its best point the gate did not flag (as the findings count it)."""
    ok = [y for y, p in zip(ys, pts) if not p.get("suspect")]
    return f"{name} (best {max(ok):.1f}%)" if ok else f"{name} (every point flagged by the gate)"
