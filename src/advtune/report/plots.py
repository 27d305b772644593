"""Figures (PNG) of one run: robustness against eps, the concentration of adversarial errors, every
unit's vulnerability score, where a selection sits, the training curve; and the figure helpers every
plot of the report uses. Figures are drawn on an Agg canvas directly: no global pyplot state, no
display needed, and the caller's matplotlib backend is left alone."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import AdvtuneError
from ..storage import atomic_write_bytes
from .narrative import short_layer_names


def figure(w: float = 5.0, h: float = 3.6):
    """A w x h inch figure on its own Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write `fig` to `path` as a PNG (atomically); returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")  # legends beside the axes stay on the page
    atomic_write_bytes(path, buf.getvalue())  # the one atomic write (storage)
    return path


def label_bars(ax, bars, labels: list[str], *, fontsize: float, lift: float) -> None:
    """Write each non-empty label centred `lift` points above the top of its bar."""
    for b, label in zip(bars, labels):
        if label:
            ax.annotate(
                label,
                (b.get_x() + b.get_width() / 2, b.get_height()),
                ha="center",
                fontsize=fontsize,
                xytext=(0, lift),
                textcoords="offset points",
            )


def plot_eps_curve(curves, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Robust accuracy against eps as a PNG.

    curves: an `EpsCurve`, or a mapping label -> `EpsCurve` to compare models (e.g. base vs fine-tuned).
    Dashed lines show the raw per-eps accuracies where they differ from the monotone curve.
    """
    if not isinstance(curves, Mapping):
        curves = {"": curves}
    if not curves:
        raise AdvtuneError("plot_eps_curve needs at least one curve")
    fig = figure(5.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for label, c in curves.items():
        if not hasattr(c, "eps") or not hasattr(c, "accuracy"):
            raise AdvtuneError(
                f"plot_eps_curve expects EpsCurve objects (from evaluate.eps_curve), got {type(c).__name__}"
            )
        (line,) = ax.plot(c.eps, c.accuracy, marker="o", label=label or None)
        if list(c.raw_accuracy) != list(c.accuracy):
            ax.plot(c.eps, c.raw_accuracy, ls="--", lw=0.8, color=line.get_color(), alpha=0.7)
    ax.set_xlabel("eps")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    if any(curves):
        ax.legend()
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def plot_concentration(curves: Mapping[str, dict], path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Adversarial errors repaired vs share of components restored: one line per criterion, and the
    random control (mean ± std over seeds) in grey. `curves`: criterion -> ConcentrationCurve.to_json()."""
    if not curves:
        raise AdvtuneError("plot_concentration needs at least one curve")
    fig = figure(5.4, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    first = next(iter(curves.values()))
    if not first["n_errors"]:
        ax.text(
            0.5, 0.5, "the attack caused no adversarial errors:\nnothing to repair, no curve", ha="center", va="center"
        )
        ax.set_axis_off()
        return save_figure(fig, path)
    xs = [100 * s for s in first["shares"]]
    mean = [m if m is not None else float("nan") for m in first["random_mean"]]
    std = [d if d is not None else 0.0 for d in first["random_std"]]
    ax.plot(
        xs,
        [100 * m for m in mean],
        color="grey",
        ls="--",
        marker=".",
        label=f"random ({len(first['random_seeds'])} seeds)",
    )
    ax.fill_between(
        xs,
        [100 * (m - d) for m, d in zip(mean, std)],
        [100 * (m + d) for m, d in zip(mean, std)],
        color="grey",
        alpha=0.2,
    )
    # criteria are not variants: a palette of their own, so no criterion shares a variant's colour
    import matplotlib

    dark = matplotlib.colormaps["Dark2"]
    for i, ((name, c), marker) in enumerate(zip(curves.items(), "osD^v*")):
        ax.plot(
            [100 * s for s in c["shares"]],
            [100 * (r if r is not None else float("nan")) for r in c["repaired"]],
            marker=marker,
            markersize=5,
            alpha=0.85,
            color=dark(i % dark.N),
            label=f"top-p by {name}",
        )
    ax.set_xscale("log")
    ax.set_xlabel("components restored to clean activation (% of all, log scale)")
    ax.set_ylabel("adversarial errors repaired (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(
        title or f"Concentration of adversarial errors ({first['n_errors']} errors, {first['n_samples']} examples)",
        fontsize=9,
    )
    return save_figure(fig, path)


def plot_unit_scores(
    scores: Mapping[str, dict], path: str | os.PathLike, selections: Mapping[str, tuple] | None = None
) -> Path:
    """Per layer, every unit's vulnerability score (one dot per unit, the layer's mean as a bar), one panel
    per criterion; `selections` {variant: (components, colour)} rings the units each variant trains, so the
    figure shows where a selection sits and how a random control spreads. `scores`: criterion -> the
    scores file (components "layer[unit]", scores). A component without "[unit]" is a whole layer."""
    if not scores:
        raise AdvtuneError("plot_unit_scores needs at least one criterion")
    fig = figure(min(5.0 * len(scores), 12.0), 3.8)
    rng = np.random.default_rng(0)  # the jitter only: the same figure from the same records
    for i, (crit, table) in enumerate(scores.items()):
        ax = fig.add_subplot(1, len(scores), i + 1)
        by_layer: dict[str, list[tuple[str, float]]] = {}
        for comp, sc in zip(table["components"], table["scores"]):
            if sc is not None:  # a NaN score (null on file) ranks last and has no place on the axis
                by_layer.setdefault(comp.split("[")[0], []).append((comp, float(sc)))
        names = list(by_layer)
        short = short_layer_names(names)
        labelled: set[str] = set()
        for j, n in enumerate(names):
            units = by_layer[n]
            xs = j + rng.uniform(-0.3, 0.3, len(units))
            ys = np.array([v for _, v in units])
            ax.scatter(xs, ys, s=7, color="0.65", zorder=2)
            ax.hlines(ys.mean(), j - 0.38, j + 0.38, color="k", lw=1.2, zorder=3)
            for k, (variant, (comps, color)) in enumerate((selections or {}).items()):
                chosen = set(comps)
                hit = [m for m, (c, _) in enumerate(units) if c in chosen or n in chosen]
                if hit:
                    ax.scatter(
                        xs[hit] + 0.04 * k,
                        ys[hit],
                        s=26,
                        facecolors="none",
                        edgecolors=[color],
                        lw=1.1,
                        zorder=4,
                        label=None if variant in labelled else variant,
                    )
                    labelled.add(variant)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([f"{short[n]}\n({len(by_layer[n])} units)" for n in names], fontsize=7)
        ax.set_ylabel(f"{crit} score per unit", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        ax.set_title(f"{crit}: every unit's score by layer (bar: mean)", fontsize=8)
        if labelled:
            ax.legend(fontsize=7, title="trained units (rings)", title_fontsize=7, loc="upper right")
    return save_figure(fig, path)


def plot_selection(sel: dict, path: str | os.PathLike, what: str = "units") -> Path:
    """Per layer: the share of its units (or, as `what` says, weight entries or adapter ranks) that the selection
    trains, and its trained parameters."""
    names = list(sel["by_layer"])
    units = [sel["by_layer"][n][0] / max(sel["by_layer"][n][1], 1) for n in names]
    params = [sel.get("params_by_layer", {}).get(n, 0) for n in names]
    fig = figure(6.0, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.bar(range(len(names)), [100 * u for u in units], color="tab:blue")
    label_bars(ax, bars, [f"{n:,}" if n else "" for n in params], fontsize=7, lift=2)
    ax.set_xticks(range(len(names)))
    short = short_layer_names(names)
    ax.set_xticklabels([short[n] for n in names], fontsize=8)
    ax.set_ylabel(f"{what} trained (%)")
    ax.set_ylim(0, 110)
    ax.set_title(f"Trained {what} per layer (labels: trained parameters)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


def plot_training(metrics: list[dict], path: str | os.PathLike) -> Path:
    """Training loss and accuracy (and validation accuracy, when recorded) per epoch."""
    fig = figure(5.5, 3.4)
    ax = fig.add_subplot(111)
    epochs = [m.get("epoch") for m in metrics]
    ax.plot(epochs, [m.get("train_loss") for m in metrics], marker="o", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    acc = ax.twinx()
    for key, style in (("train_acc", "-"), ("val_acc", "--"), ("val_robust_acc", ":")):
        ys = [m.get(key) for m in metrics]
        if any(y is not None for y in ys):
            acc.plot(epochs, ys, linestyle=style, color="tab:orange", label=key.replace("_", " "))
    acc.set_ylabel("accuracy")
    acc.set_ylim(0, 1)
    fig.legend(loc="lower center", ncol=4, fontsize=8)
    return save_figure(fig, path)
