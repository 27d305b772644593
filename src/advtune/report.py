"""Plots (PNG) from results. Figures are drawn on an Agg canvas directly: no global pyplot state,
no display needed, and the caller's matplotlib backend is left alone."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from pathlib import Path
from typing import Mapping

import numpy as np

from . import filenames as files
from .distributed import on_main
from .errors import AdvtuneError
from .frontier import PLATEAU_TOLERANCE, curves, reference_plateau
from .frontier import findings as frontier_findings
from .utils import atomic_write_bytes, atomic_write_text, read_json


def plot_eps_curve(curves, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Robust accuracy against eps as a PNG.

    curves: an `EpsCurve`, or a mapping label -> `EpsCurve` to compare models (e.g. base vs fine-tuned).
    Dashed lines show the raw per-eps accuracies where they differ from the monotone curve.
    """
    if not isinstance(curves, Mapping):
        curves = {"": curves}
    if not curves:
        raise AdvtuneError("plot_eps_curve needs at least one curve")
    fig = _figure(5.0, 3.6)
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
    return _save(fig, path)


def _figure(w: float = 5.0, h: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")  # legends beside the axes stay on the page
    atomic_write_bytes(path, buf.getvalue())  # the one atomic write (utils)
    return path


def plot_concentration(curves: Mapping[str, dict], path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Adversarial errors repaired vs share of components restored: one line per criterion, and the
    random control (mean ± std over seeds) in grey. `curves`: criterion -> ConcentrationCurve.to_json()."""
    if not curves:
        raise AdvtuneError("plot_concentration needs at least one curve")
    fig = _figure(5.4, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    first = next(iter(curves.values()))
    if not first["n_errors"]:
        ax.text(
            0.5, 0.5, "the attack caused no adversarial errors:\nnothing to repair, no curve", ha="center", va="center"
        )
        ax.set_axis_off()
        return _save(fig, path)
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
    return _save(fig, path)


def plot_unit_scores(
    scores: Mapping[str, dict], path: str | os.PathLike, selections: Mapping[str, tuple] | None = None
) -> Path:
    """Per layer, every unit's vulnerability score (one dot per unit, the layer's mean as a bar), one panel
    per criterion; `selections` {variant: (components, colour)} rings the units each variant trains, so the
    figure shows where a selection sits and how a random control spreads. `scores`: criterion -> the
    scores file (components "layer[unit]", scores). A component without "[unit]" is a whole layer."""
    if not scores:
        raise AdvtuneError("plot_unit_scores needs at least one criterion")
    fig = _figure(min(5.0 * len(scores), 12.0), 3.8)
    rng = np.random.default_rng(0)  # the jitter only: the same figure from the same records
    for i, (crit, table) in enumerate(scores.items()):
        ax = fig.add_subplot(1, len(scores), i + 1)
        by_layer: dict[str, list[tuple[str, float]]] = {}
        for comp, sc in zip(table["components"], table["scores"]):
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
    return _save(fig, path)


def short_layer_names(names: list[str]) -> dict[str, str]:
    """Layer names without the dotted prefix they all share ("net.conv1" -> "conv1"): readable labels."""
    parts = [n.split(".") for n in names]
    common = os.path.commonprefix(parts) if len(parts) > 1 else parts[0][:-1] if parts else []
    k = len(common) if all(len(p) > len(common) for p in parts) else 0
    return {n: ".".join(p[k:]) for n, p in zip(names, parts)}


# ---------------------------------------------------------------- experiment report
# One cost basis everywhere (the lead, the table, every axis): `total_cost`. One colour per variant
# across figures: `variant_colors`, by the variant's position in results.json.


def _cost_axis(ax) -> None:
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


def total_cost(r: dict) -> int:
    """Every gradient evaluation behind a final model: its own training and, for fine-tuning, the base
    model's training and the analysis behind its selection (the frontier counts its curves the same way)."""
    return sum(int(r.get(k) or 0) for k in ("grad_evals", "analysis_grad_evals", "base_grad_evals"))


def total_wall(r: dict) -> float:
    """Wall seconds on the same basis as `total_cost`."""
    return sum(float(r.get(k) or 0.0) for k in ("wall_s", "analysis_wall_s", "base_wall_s"))


COST_BASIS = (
    "Costs (lead, table and every figure alike): gradient evaluations = forward+backward passes of one example "
    "(attack steps plus the update); a fine-tuned model's cost includes the base model's training and the "
    "analysis behind its selection, so every variant is counted from scratch."
)


def variant_colors(names: list[str]) -> dict[str, tuple]:
    """One colour per variant, the same in every figure of a report."""
    return dict(zip(names, matplotlib_colors(len(names))))


def describe(r: dict) -> str:
    """What a variant was, in words, from its row: method, selection and where its trained units sit."""
    kind, attack = r["kind"], r.get("attack")
    if kind == "standard":
        return "the base model: standard training"
    if kind == "train":
        what = f"adversarial training from scratch with {attack}" if attack else "standard training from scratch"
    elif r.get("select") == "all":
        what = f"adversarial fine-tuning of all parameters with {attack}"
    else:
        if r.get("select") == "random":
            if r.get("params_like"):
                what = f"control: random units with as many parameters as {r['params_like']}"
            elif r.get("share") is not None:
                what = f"control: a random {100 * r['share']:g}% of the units"
            else:
                what = f"control: random units within {_budget_words(r.get('params_budget'))} of the parameters"
        else:
            crit = r.get("criterion")
            if r.get("granularity") == "layer":
                what = f"whole layers ranked by {crit}"
            elif r.get("share") is not None:
                what = f"the top {100 * r['share']:g}% of units by {crit}"
            else:
                what = f"top units by {crit}"
            if r.get("share") is None and r.get("params_budget") is not None:
                what += f", within {_budget_words(r['params_budget'])} of the parameters"
        what += f"; fine-tuned with {attack}"
    where = where_trained(r.get("selected_by_layer"))
    return what + (f"; trains {where}" if where else "")


def _budget_words(p) -> str:
    if p is None:
        return "?"
    p = float(p)
    return f"{100 * p:g}%" if p <= 1 else f"{int(p):,}"


def where_trained(by_layer: Mapping[str, list] | None) -> str:
    """ "conv1 32/32, conv2 8/64": the layers a selection touches, units trained of units in the layer."""
    if not by_layer:
        return ""
    short = short_layer_names(list(by_layer))
    return ", ".join(f"{short[n]} {u}/{t}" for n, (u, t) in by_layer.items() if u)


def plot_pareto(rows: list[dict], path: str | os.PathLike, colors: Mapping[str, tuple] | None = None) -> Path:
    """Final models: worst-case robust accuracy against total cost (`total_cost`, log scale), one colour
    per variant and a legend instead of labels that overlap."""
    colors = colors or variant_colors([r["variant"] for r in rows])
    fig = _figure(7.0, 4.0)
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
            label=f"{r['variant']} ({100 * r['robust_acc']:.1f}%)" + (" SUSPECT" if r.get("suspect") else ""),
        )
    _cost_axis(ax)
    ax.set_xlabel("total gradient evaluations (log): training + base model + analysis")
    ax.set_ylabel("worst-case robust accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(
        "Final models: robustness vs compute (squares: trained from scratch; diamond: the base model; X: suspect)",
        fontsize=9,
    )
    return _save(fig, path)


def plot_trained_units(rows: list[dict], path: str | os.PathLike, colors: Mapping[str, tuple]) -> Path | None:
    """Per layer, the share of its units each fine-tuning variant trains (bar labels: units trained):
    where a selection sits, next to the random control with as many parameters."""
    rs = [r for r in rows if r.get("selected_by_layer")]
    if not rs:
        return None
    names = list(rs[0]["selected_by_layer"])
    short = short_layer_names(names)
    fig = _figure(max(5.5, 1.3 * len(names) + 3), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(rs)
    for i, r in enumerate(rs):
        by = r["selected_by_layer"]
        units = [by.get(n, [0, 1])[0] for n in names]
        pct = [100 * u / max(by.get(n, [0, 1])[1], 1) for n, u in zip(names, units)]
        xs = np.arange(len(names)) + i * width - 0.4 + width / 2
        bars = ax.bar(xs, pct, width, color=colors.get(r["variant"], "k"), label=describe_short(r))
        for b, u in zip(bars, units):
            if u:
                ax.annotate(
                    str(u),
                    (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center",
                    fontsize=6,
                    xytext=(0, 1),
                    textcoords="offset points",
                )
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([short[n] for n in names], fontsize=8)
    ax.set_ylabel("units trained (% of the layer)")
    ax.set_ylim(0, 112)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title("Where each fine-tuning variant's trained units sit (labels: units)", fontsize=9)
    return _save(fig, path)


def describe_short(r: dict) -> str:
    n = r.get("trainable_params")
    return f"{r['variant']}: {n:,} params" if n else r["variant"]


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
    fig = _figure(7.0, 4.4)
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
            label=f"{name} (best {max(ys):.1f}%)",
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
            f"{plat.variant} plateau {100 * plat.robust_acc:.1f}% (reached within {100 * PLATEAU_TOLERANCE:g} pt at "
            f"{plat.cost:,}); dotted: plateau - 2 pt",
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
    _cost_axis(ax)
    ax.set_xlabel("total gradient evaluations (log): training + base model + analysis")
    ax.set_ylabel("worst-case robust accuracy (%)")
    # room above the best point for the plateau's label; a low-robustness setting (CIFAR-10) is not squashed
    top = max([100 * p["robust_acc"] for p in points] + [10.0])
    ax.set_ylim(-2, min(102, top * 1.25 + 5))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(title or "Robustness per compute (x: suspect evaluation)", fontsize=9)
    return _save(fig, path)


def matplotlib_colors(n: int) -> list:
    """n distinct colours, stable per position."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


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
    fig = _figure(6.4, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    for fam, pts in fams.items():
        pts.sort()
        ax.plot([e for e, _ in pts], [100 * a for _, a in pts], marker="o", label=fam, color=colors.get(first[fam]))
    ax.set_xlabel("eps (training and evaluation)")
    ax.set_ylabel("worst-case robust accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _save(fig, path)


def _family(r: dict) -> str:
    """A variant's name without its eps suffix (eps sweeps are drawn as one line per family)."""
    return re.sub(r"-eps[0-9.e-]+", "", r["variant"])


def _fmt_int(v) -> str:
    return f"{int(v):,}" if v is not None else "–"


def _table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per variant: what it was (method, selection, trainable parameters, data, budget), its
    accuracies, and its cost on the report's one basis (`total_cost`) next to its own training."""
    attack_cols = []
    for r in rows:
        attack_cols += [k for k in r if k.startswith("acc[") and k not in attack_cols]
    several_eps = len({r["eps"] for r in rows}) > 1
    head = [
        "variant",
        "what it is",
        *(["eps"] if several_eps else []),
        "trainable params",
        "training data",
        "budget",
        "clean",
        *[c[4:-1] for c in attack_cols],
        "worst case",
        "own grad evals",
        "total grad evals",
        "total wall s",
        "gate",
    ]
    body = []
    for r in rows:
        n, share = r.get("trainable_params"), r.get("param_share")
        params = _fmt_int(n) + (f" ({100 * share:.1f}%)" if n and share is not None and share < 0.9995 else "")
        data = f"{int(r['train_examples']):,} images" if r.get("train_examples") else "all training images"
        if r["kind"] == "standard" and not r.get("train_examples") and "train_examples" not in r:
            data = "–"  # a record from before this column existed
        budget = (
            _fmt_int(r["budget"])
            if r.get("budget")
            else (f"{r['epochs']} epoch{'s' * (r['epochs'] != 1)}" if r.get("epochs") else "–")
        )
        body.append(
            [
                r["variant"],
                describe(r),
                *([f"{r['eps']:.4g}"] if several_eps else []),
                params,
                data,
                budget,
                f"{100 * r['clean_acc']:.2f}%",
                *[f"{100 * r[c]:.2f}%" if c in r else "–" for c in attack_cols],
                f"{100 * r['robust_acc']:.2f}%",
                _fmt_int(r["grad_evals"]),
                _fmt_int(total_cost(r)),
                f"{total_wall(r):.0f}",
                "SUSPECT" if r.get("suspect") else "passed",
            ]
        )
    return head, body


def lead(rows: list[dict]) -> list[str]:
    """The report's first lines: what won and at what cost, then selective vs full fine-tuning vs the
    random control vs adversarial training, all on the `total_cost` basis. Computed from the rows; a
    variant that tripped the gradient-masking gate is never called the winner."""
    out = []
    by_eps: dict[float, list[dict]] = {}
    for r in rows:
        by_eps.setdefault(r["eps"], []).append(r)
    for eps, rs in sorted(by_eps.items()):
        at = f"at eps={eps:g}"
        ok = [r for r in rs if not r.get("suspect") and r["kind"] != "standard"]
        if not ok:
            continue
        win = max(ok, key=lambda r: (r["robust_acc"], -total_cost(r)))
        out.append(
            f"**{win['variant']} won** {at}: {100 * win['robust_acc']:.2f}% worst-case robust accuracy (clean "
            f"{100 * win['clean_acc']:.2f}%) for {total_cost(win):,} gradient evaluations in total — {describe(win)}."
        )
        sel = [r for r in ok if r["kind"] == "finetune" and r.get("select") == "top"]
        full = [r for r in ok if r["kind"] == "finetune" and r.get("select") == "all"]
        at_ = [r for r in ok if r["kind"] == "train" and r.get("attack")]
        if not sel:
            continue
        best = max(sel, key=lambda r: r["robust_acc"])
        share = f"{100 * best['param_share']:.1f}% of the parameters" if best.get("param_share") else "a selection"
        parts = [f"Selective fine-tuning of {share} (**{best['variant']}**) reached {100 * best['robust_acc']:.2f}%"]
        if at_:
            ref = max(at_, key=lambda r: r["robust_acc"])
            ratio = total_cost(best) / max(total_cost(ref), 1)
            parts[0] += (
                f" at {100 * ratio:.0f}% of the cost of adversarial training (**{ref['variant']}**: "
                f"{100 * ref['robust_acc']:.2f}%)"
            )
        if full:
            f = max(full, key=lambda r: r["robust_acc"])
            ratio = total_cost(f) / max(total_cost(best), 1)
            parts.append(
                f"full-network fine-tuning (**{f['variant']}**) {100 * f['robust_acc']:.2f}% "
                f"(at {ratio:.2g}x the selective cost)"
            )
        for r in ok:
            if r["kind"] == "finetune" and r.get("select") == "random" and r.get("params_like") == best["variant"]:
                parts.append(
                    f"random units with as many trainable parameters (**{r['variant']}**) {100 * r['robust_acc']:.2f}%"
                )
        out.append("; ".join(parts) + ".")
    return out


def headline(rows: list[dict], frontier: bool = False) -> list[str]:
    """Plain-language findings, computed from the rows (no claim is written that the numbers don't make):
    the lead (what won, at what cost), gate warnings, and each random control against the selection it
    controls. `frontier` is kept for callers; the lead counts costs like the frontier does."""
    out = lead(rows)
    by_eps: dict[float, list[dict]] = {}
    for r in rows:
        by_eps.setdefault(r["eps"], []).append(r)
    for eps, rs in sorted(by_eps.items()):
        sel = [r for r in rs if r["kind"] == "finetune" and r.get("select") == "top" and not r.get("suspect")]
        rnd = [r for r in rs if r["kind"] == "finetune" and r.get("select") == "random" and not r.get("suspect")]
        for r in rs:
            if r.get("suspect"):
                out.append(
                    f"eps={eps:g}: **{r['variant']}** tripped the gradient-masking gate ({r['suspect']}); "
                    "its robust accuracy is not trustworthy and it is not called robust here."
                )
        for r in rnd if sel else []:
            n = r.get("trainable_params") or 0
            if r.get("params_like"):  # the control of one named selection: compare with that one
                same = [s for s in sel if s["variant"] == r["params_like"]]
                what, ctrl = f"with ~{n:,} trainable parameters", "random units with as many parameters"
            elif r.get("share") is not None:  # the same share of components, same attack and budget
                same = [
                    s
                    for s in sel
                    if s.get("share") == r["share"]
                    and s.get("attack") == r.get("attack")
                    and s.get("grad_evals") == r.get("grad_evals")
                ]
                what, ctrl = f"at share {r['share']:g}", "the same share of units chosen at random"
            else:  # the same trainable parameters (within 10%), attack and budget
                same = [
                    s
                    for s in sel
                    if s.get("attack") == r.get("attack")
                    and s.get("trainable_params")
                    and abs(s["trainable_params"] - n) <= 0.1 * s["trainable_params"]
                    and s.get("grad_evals") == r.get("grad_evals")
                ]
                what, ctrl = f"with ~{n:,} trainable parameters", "random units with as many parameters"
            if same:
                s = max(same, key=lambda q: q["robust_acc"])
                matched = ""
                if s.get("trainable_params") and n and abs(s["trainable_params"] - n) > 0.1 * s["trainable_params"]:
                    matched = (
                        f" (not matched on parameters: the control trains {n:,}, the selection "
                        f"{s['trainable_params']:,})"
                    )
                out.append(
                    f"eps={eps:g}: {what}, selected components ({s['variant']}) gave {100 * s['robust_acc']:.2f}% "
                    f"vs {100 * r['robust_acc']:.2f}% for {ctrl} "
                    f"({100 * (s['robust_acc'] - r['robust_acc']):+.1f} points){matched}."
                )
    return out


def write_report(folder: str | os.PathLike) -> dict[str, Path]:
    """report.html (self-contained: plots embedded) and report.md (+ PNGs) from an experiment folder's
    records; a partial or corrupt record is a one-line error naming the folder."""
    return _guarded(_write_report, folder, "advtune experiment CONFIG --out")


def _guarded(fn, folder, how: str) -> dict[str, Path]:
    """Write a report: rank 0 alone under torchrun (it reads back the figures it wrote), a corrupt
    record as a one-line error on every rank; every rank gets the report's paths."""

    def write() -> None:
        try:
            fn(folder)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise AdvtuneError(
                f"{folder}: its records are incomplete or corrupt ({type(e).__name__}: {e}); "
                f"re-run `{how} {folder}` to complete them"
            ) from None

    on_main(write)
    return {"html": Path(folder) / files.REPORT_HTML, "md": Path(folder) / files.REPORT_MD}


def _selections(folder: Path, rows: list[dict], eps: float | None, colors: Mapping[str, tuple]) -> dict:
    """{variant: (its selected components, its colour)} for the fine-tuning variants at `eps` that chose
    components (a selection or a random control), from their selection.json."""
    out = {}
    for r in rows:
        if r["kind"] != "finetune" or r.get("select") == "all" or (eps is not None and r["eps"] != eps):
            continue
        p = folder / r["variant"] / files.SELECTION
        if p.is_file():
            out[r["variant"]] = (read_json(p, "selection")["components"], colors.get(r["variant"], "k"))
    return out


def _write_report(folder: str | os.PathLike) -> dict[str, Path]:
    """report.html (self-contained: plots embedded) and report.md (+ PNGs) from an experiment folder's
    records. Every number comes from results.json and the analysis files; nothing is recomputed."""
    folder = Path(folder)
    res = folder / files.RESULTS
    if not res.is_file():
        raise AdvtuneError(f"{folder} has no results.json; run `advtune experiment CONFIG --out {folder}` first")

    rows = read_json(res, "results")["rows"]
    if not rows:
        raise AdvtuneError(f"{folder}/results.json holds no finished variant yet; run the experiment first")
    exp = read_json(folder / files.EXPERIMENT, "experiment record") if (folder / files.EXPERIMENT).is_file() else {}
    cfg = exp.get("config", {})
    colors = variant_colors([r["variant"] for r in rows])
    figs: list[tuple[str, Path]] = []
    frontier_notes: list[str] = []
    if (folder / files.FRONTIER).is_file():
        points = read_json(folder / files.FRONTIER, "frontier")["points"]
        figs.append(
            (
                "Robustness per compute: each variant's checkpoints (the frontier)",
                plot_frontier(points, folder / "frontier.png", title=cfg.get("name"), colors=colors),
            )
        )
        frontier_notes = frontier_findings(points)
    figs.append(("Final models: robustness vs total compute", plot_pareto(rows, folder / "pareto.png", colors)))
    units_png = plot_trained_units(rows, folder / "trained-units.png", colors)
    if units_png:
        figs.append(("Where the trained units sit, per layer", units_png))
    eps_png = plot_eps_sweep(rows, folder / "eps-sweep.png", colors)
    if eps_png:
        figs.append(("Robust accuracy vs eps", eps_png))
    analysis_notes = []
    for a in sorted(folder.glob("analysis*")):
        a_eps = None
        if (a / files.CONFIG).is_file():
            a_eps = read_json(a / files.CONFIG, "analysis config").get("run", {}).get("eps")
        score_files = sorted(a.glob("scores-*.json"))
        if score_files:
            scores = {p.stem[len("scores-") :]: read_json(p, "scores") for p in score_files}
            figs.append(
                (
                    f"Per-unit vulnerability scores by layer, and the units each variant trains ({a.name})",
                    plot_unit_scores(
                        scores, folder / f"{a.name}-unit-scores.png", _selections(folder, rows, a_eps, colors)
                    ),
                )
            )
        if (a / files.CONCENTRATION).is_file():
            curves_ = read_json(a / files.CONCENTRATION, "concentration")
            figs.append(
                (
                    f"Concentration of adversarial errors ({a.name})",
                    plot_concentration(curves_, folder / f"{a.name}-concentration.png"),
                )
            )
            for name, c in curves_.items():
                pts = {round(s, 4): (r, m) for s, r, m in zip(c["shares"], c["repaired"], c["random_mean"])}
                for share in (0.01, 0.05, 0.1):
                    if share in pts and pts[share][0] is not None:
                        analysis_notes.append(
                            f"{a.name}: restoring the top {100 * share:g}% of components by {name} repairs "
                            f"{100 * pts[share][0]:.1f}% of {c['n_errors']} adversarial errors "
                            f"(random {100 * (pts[share][1] or 0):.1f}%)."
                        )
        summ = a / files.SUMMARY
        if summ.is_file():
            agree = read_json(summ, "analysis summary").get("rank_agreement_with_restoration", {})
            for k, v in agree.items():
                analysis_notes.append(
                    f"{a.name}: rank agreement (Spearman) of {k} with the restoration ground truth: {v:.3f}."
                )
    head, body = _table(rows)
    first_lines = lead(rows)
    findings = frontier_notes + [f for f in headline(rows) if f not in first_lines]
    ev = cfg.get("evaluation", {})
    protocol = (
        f"Threat model {cfg.get('threat', {}).get('norm', 'linf')}, eps {cfg.get('threat', {}).get('eps')}. "
        f"Evaluation: {ev.get('suite') or ev.get('attacks')} on the first {rows[0].get('eval_examples')} test images; "
        "worst case per example over the attacks; the gradient-masking gate ran on every model."
    )
    base = cfg.get("base", {})
    setup = (
        f"Base: {base.get('pretrained') or (str(base.get('model')) + ' on ' + str(base.get('dataset')))}"
        + (f", training subset {base['limit']}" if base.get("limit") else "")
        + "."
    )
    notes = cfg.get("notes")
    title = f"advtune report: {cfg.get('name', folder.name)}"

    md = [f"# {title}", ""]
    for line in first_lines:  # the lead: what won and at what cost, before anything else
        md += [line, ""]
    md += [setup, "", protocol, "", COST_BASIS, ""]
    if notes:
        md += [f"> {notes}", ""]
    if findings:
        md += ["## Findings", ""] + [f"- {f}" for f in findings] + [""]
    md += ["## Results", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(r) + " |" for r in body]
    md += [""]
    if analysis_notes:
        md += ["## Vulnerability analysis", ""] + [f"- {n}" for n in analysis_notes] + [""]
    for caption, p in figs:
        md += [f"### {caption}", "", f"![{caption}]({p.name})", ""]
    atomic_write_text(folder / files.REPORT_MD, "\n".join(md) + "\n")

    esc = html.escape
    cells = "".join(f"<th>{esc(h)}</th>" for h in head)
    trs = "".join(
        "<tr"
        + (' class="suspect"' if r[-1] == "SUSPECT" else "")
        + ">"
        + "".join(f"<td>{esc(c)}</td>" for c in r)
        + "</tr>"
        for r in body
    )
    blocks = [
        f"<h1>{esc(title)}</h1>",
        "<div class='lead'>" + "".join(f"<p>{_bold(esc(line))}</p>" for line in first_lines) + "</div>",
        f"<p>{esc(setup)} {esc(protocol)}</p><p class='note'>{esc(COST_BASIS)}</p>",
    ]
    if notes:
        blocks.append(f"<p class='note'>{esc(str(notes))}</p>")
    if findings:
        blocks.append("<h2>Findings</h2><ul>" + "".join(f"<li>{_bold(esc(f))}</li>" for f in findings) + "</ul>")
    blocks.append(
        f"<h2>Results</h2><div class='scroll'><table><thead><tr>{cells}</tr></thead><tbody>{trs}</tbody></table></div>"
        "<p class='note'>A red row tripped the gradient-masking gate and is not called robust. Own grad evals: the "
        "variant's own training; total: with the base model's training and the analysis, as everywhere else.</p>"
    )
    if analysis_notes:
        blocks.append(
            "<h2>Vulnerability analysis</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in analysis_notes) + "</ul>"
        )
    blocks.append("<h2>Figures</h2>" + _figures_html(figs))
    atomic_write_text(folder / files.REPORT_HTML, _page(title, blocks))
    return {"html": folder / files.REPORT_HTML, "md": folder / files.REPORT_MD}


def _bold(escaped: str) -> str:
    """Markdown **bold** in an already escaped line -> <b>."""
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", escaped)


def _figures_html(figs: list[tuple[str, Path]]) -> str:
    esc = html.escape
    return (
        "<div class='figs'>"
        + "".join(
            f"<figure><img src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}' alt='{esc(c)}'>"
            f"<figcaption>{esc(c)}</figcaption></figure>"
            for c, p in figs
        )
        + "</div>"
    )


def _page(title: str, blocks: list[str]) -> str:
    """The one HTML page of every report: the lead in a box, a table that scrolls instead of squeezing,
    figures in a grid that uses the width of the page."""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:1500px;margin:1.5em auto;padding:0 1.5em;color:#222}"
        ".lead{background:#eef5ff;border-left:4px solid #3b7dd8;padding:.4em 1em;font-size:16px}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child,td:nth-child(2),th:nth-child(2){text-align:left}"
        "td:nth-child(2){min-width:18em;max-width:32em}tr.suspect{background:#fde2e2}.scroll{overflow-x:auto}"
        ".figs{display:grid;grid-template-columns:repeat(auto-fit,minmax(560px,1fr));gap:1em}"
        "figure{margin:0}figure img{width:100%;height:auto}figcaption{font-size:13px;color:#555}"
        ".note{color:#555;font-size:13px}pre{background:#f6f6f6;padding:1em;font-size:13px;overflow-x:auto}"
        "</style></head><body>" + "".join(blocks) + "</body></html>"
    )


# ---------------------------------------------------------------- harden report


def write_harden_report(folder: str | os.PathLike) -> dict[str, Path]:
    """report.html (self-contained) and report.md of an `advtune harden` folder, from its records:
    before/after robustness, what was trained and where it sits, what every stage cost."""
    return _guarded(_write_harden_report, folder, "advtune harden BASE --resume --out")


def _write_harden_report(folder: str | os.PathLike) -> dict[str, Path]:
    folder = Path(folder)
    if not (folder / files.SUMMARY).is_file():
        raise AdvtuneError(f"{folder} has no summary.json; run `advtune harden ... --out {folder}` first")
    s = read_json(folder / files.SUMMARY, "harden summary")
    c = s["cost"]
    sel = s.get("selection") or {}
    figs: list[tuple[str, Path]] = []
    conc = folder / files.ANALYSIS / files.CONCENTRATION
    if conc.is_file():
        figs.append(
            (
                "Concentration of adversarial errors (the vulnerability map)",
                plot_concentration(json.loads(conc.read_text()), folder / "concentration.png"),
            )
        )
    score_files = sorted((folder / files.ANALYSIS).glob("scores-*.json"))
    if score_files and (folder / files.SELECTION).is_file():
        chosen = read_json(folder / files.SELECTION, "selection")["components"]
        figs.append(
            (
                "Every unit's vulnerability score by layer; rings: the units this run trained",
                plot_unit_scores(
                    {p.stem[len("scores-") :]: read_json(p, "scores") for p in score_files},
                    folder / "unit-scores.png",
                    {"hardened": (chosen, "tab:orange")},
                ),
            )
        )
    if sel.get("by_layer"):
        figs.append(("Where the trained parameters sit", plot_selection(sel, folder / "selection.png")))
    share = 100 * (s.get("param_share") or 0)
    headline_ = (
        f"Selective adversarial fine-tuning of {sel.get('trainable_params', 0):,} parameters ({share:.2f}% of the "
        "model) "
        f"took worst-case robust accuracy at {s['norm']} eps={s['eps']:g} from {100 * s['before']['robust_acc']:.2f}% "
        f"to {100 * s['after']['robust_acc']:.2f}% (clean {100 * s['before']['clean_acc']:.2f}% -> "
        f"{100 * s['after']['clean_acc']:.2f}%), for {c['harden_grad_evals']:,} gradient evaluations "
        f"(analysis {c['analysis_grad_evals']:,} + fine-tuning {c['finetune_grad_evals']:,}); the base model's own "
        f"training took {c['base_training_grad_evals'] or 0:,}."
    )
    rows = [
        ("", "clean", "worst-case robust", "gate"),
        (
            "before (base model)",
            f"{100 * s['before']['clean_acc']:.2f}%",
            f"{100 * s['before']['robust_acc']:.2f}%",
            "SUSPECT" if s["before"].get("suspect") else "passed",
        ),
        (
            "after (hardened)",
            f"{100 * s['after']['clean_acc']:.2f}%",
            f"{100 * s['after']['robust_acc']:.2f}%",
            "SUSPECT" if s["after"].get("suspect") else "passed",
        ),
    ]
    recipe = s.get("recipe", {})
    recipe_line = (
        f"Recipe: whole {recipe.get('granularity')}s ranked by {recipe.get('criterion')} "
        f"(analysis: {recipe.get('analysis_attack')} on {s.get('analysis_examples') or recipe.get('analysis_limit')} "
        "training images) within "
        f"{recipe.get('params')} of the parameters; fine-tuning with {recipe.get('attack')}, eps ramped over "
        f"{100 * float(recipe.get('eps_warmup', 0)):g}% of the budget, {recipe.get('optimizer')} lr "
        f"{recipe.get('lr')}, "
        f"{recipe.get('schedule')} schedule, batch {recipe.get('batch_size')}; budget {s['budget']:,} gradient "
        "evaluations."
    )
    protocol = (
        f"Evaluation: worst case per example of {s['evaluation']} on the first {s['test_examples']} test images "
        "(the same images before and after), gradient-masking gate on."
    )
    layer_lines = [
        f"{n}: {u}/{t} units, {sel.get('params_by_layer', {}).get(n, 0):,} parameters"
        for n, (u, t) in sel.get("by_layer", {}).items()
        if u
    ]
    md = [
        f"# advtune harden: {s['architecture']} at {s['norm']} eps={s['eps']:g}",
        "",
        headline_,
        "",
        "| " + " | ".join(rows[0]) + " |",
        "|---|---|---|---|",
    ] + ["| " + " | ".join(r) + " |" for r in rows[1:]]
    md += ["", recipe_line, "", protocol, "", "## Trained components", ""] + [f"- {x}" for x in layer_lines] + [""]
    for caption, p in figs:
        md += [f"### {caption}", "", f"![{caption}]({p.name})", ""]
    atomic_write_text(folder / files.REPORT_MD, "\n".join(md) + "\n")
    esc = html.escape
    table = (
        "<table>"
        + "".join(
            "<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{esc(x)}</{'th' if i == 0 else 'td'}>" for x in r) + "</tr>"
            for i, r in enumerate(rows)
        )
        + "</table>"
    )
    title = f"advtune harden: {s['architecture']} at {s['norm']} eps={s['eps']:g}"
    blocks = [
        f"<h1>{esc(title)}</h1>",
        f"<div class='lead'><p>{esc(headline_)}</p></div>",
        table,
        f"<p class='note'>{esc(recipe_line)}</p><p class='note'>{esc(protocol)}</p>",
        "<h2>Trained components</h2><ul>" + "".join(f"<li>{esc(x)}</li>" for x in layer_lines) + "</ul>",
        _figures_html(figs),
    ]
    atomic_write_text(folder / files.REPORT_HTML, _page(title, blocks))
    return {"html": folder / files.REPORT_HTML, "md": folder / files.REPORT_MD}


def plot_selection(sel: dict, path: str | os.PathLike) -> Path:
    """Per layer: the share of its units that the selection trains, and its trained parameters."""
    names = list(sel["by_layer"])
    units = [sel["by_layer"][n][0] / max(sel["by_layer"][n][1], 1) for n in names]
    params = [sel.get("params_by_layer", {}).get(n, 0) for n in names]
    fig = _figure(6.0, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.bar(range(len(names)), [100 * u for u in units], color="tab:blue")
    for b, n in zip(bars, params):
        if n:
            ax.annotate(
                f"{n:,}",
                (b.get_x() + b.get_width() / 2, b.get_height()),
                ha="center",
                fontsize=7,
                xytext=(0, 2),
                textcoords="offset points",
            )
    ax.set_xticks(range(len(names)))
    short = short_layer_names(names)
    ax.set_xticklabels([short[n] for n in names], fontsize=8)
    ax.set_ylabel("units trained (%)")
    ax.set_ylim(0, 110)
    ax.set_title("Selected units per layer (labels: trained parameters)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def write_run_report(folder: str | os.PathLike, info_text: str, metrics: list[dict]) -> dict[str, Path]:
    """report.html (self-contained) and report.md of one run folder (train, finetune, analyze): what
    it recorded (`info_text`, from the run's records), its training curve, and every plot it holds."""
    on_main(lambda: _write_run_report(Path(folder), info_text, metrics))  # torchrun: rank 0 writes
    return {"html": Path(folder) / files.REPORT_HTML, "md": Path(folder) / files.REPORT_MD}


def _write_run_report(folder: Path, info_text: str, metrics: list[dict]) -> None:
    figs: list[tuple[str, Path]] = []
    if metrics:
        figs.append(("Training: loss and accuracy per epoch", plot_training(metrics, folder / "training.png")))
    for p in sorted(folder.glob("*.png")):
        if p.name != "training.png":
            figs.append((p.stem.replace("-", " "), p))
    md = [f"# advtune run: {folder.name}", "", "```", info_text, "```", ""]
    for caption, p in figs:
        md += [f"### {caption}", "", f"![{caption}]({p.name})", ""]
    atomic_write_text(folder / files.REPORT_MD, "\n".join(md) + "\n")
    esc = html.escape
    title = f"advtune run: {folder.name}"
    blocks = [f"<h1>{esc(title)}</h1><pre>{esc(info_text)}</pre>", _figures_html(figs)]
    atomic_write_text(folder / files.REPORT_HTML, _page(title, blocks))


def plot_training(metrics: list[dict], path: str | os.PathLike) -> Path:
    """Training loss and accuracy (and validation accuracy, when recorded) per epoch."""
    fig = _figure(5.5, 3.4)
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
    return _save(fig, path)
